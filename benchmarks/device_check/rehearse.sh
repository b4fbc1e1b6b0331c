#!/usr/bin/env bash
# The device check rehearsed here, on the emulated CUDA device (cuda-emulator/): packs the
# package as for a GPU machine (pack.sh; its arguments pass on), then runs run.py --rehearsal on
# it with the emulated device in place of the driver, so that everything up to the hardware runs:
# the package, the library search, the probe, every device test, the 48,000² test's comparison
# (at 1,500²), the PyTorch comparisons (PyTorch on the CPU) and the tower's harness (on the CPU).
# compute-sanitizer is stood in for by a script that runs the program under no sanitizer (the
# command lines and verdicts are what is rehearsed; the emulated device's own sanitizers run in
# scripts/test-gpu-emulated.sh); nvidia-smi and ncu are skipped. Needs benchmarks/.venv (torch,
# transformers, numpy). Writes target/device-check-rehearsal/device-check.{json,log.xz}.
set -euo pipefail
cd "$(dirname "$0")/../.."
bash benchmarks/device_check/pack.sh "$@"
nvrtc=$(bash scripts/fetch-nvrtc.sh)
rehearsal=$PWD/target/device-check-rehearsal
rm -rf "$rehearsal" && mkdir -p "$rehearsal/bin" "$rehearsal/cuda-libraries"
defines=$(CARGO_TARGET_DIR=target/device-check-build cargo run --quiet --release --locked --no-default-features \
  --features cuda --example kernel_constants | tr '\n' ' ')
make -s -C cuda-emulator OUT="$rehearsal/emulator" SANITIZER=none DEFINES="$defines" "$rehearsal/emulator/libcuda.so.1"
cat >"$rehearsal/bin/compute-sanitizer" <<'SHIM'
#!/bin/sh
# Stands in for compute-sanitizer: drops its options and runs the program.
while [ $# -gt 0 ]; do
  case $1 in
    --tool | --error-exitcode | --print-limit) shift 2 ;;
    -*) shift ;;
    *) break ;;
  esac
done
exec "$@"
SHIM
chmod +x "$rehearsal/bin/compute-sanitizer"
# The toolkit's libraries the tower links, without its link stub for libcuda (the emulated
# device is the driver here).
toolkit=target/cuda-13.0/nvidia/cu13/lib
if [ -d "$toolkit" ]; then
  for library in "$toolkit"/lib*.so.*; do
    case $(basename "$library") in libcuda.*) ;; *) ln -s "$PWD/$library" "$rehearsal/cuda-libraries/" ;; esac
  done
fi
PATH="$rehearsal/bin:$PATH" LD_LIBRARY_PATH="$rehearsal/emulator:$nvrtc:$rehearsal/cuda-libraries" \
  VTR_INDEX_EMULATED_DEVICES="sm_80" \
  benchmarks/.venv/bin/python benchmarks/device_check/run.py --rehearsal --budget 1500 \
  --out "$rehearsal" --work "$rehearsal/work"
