#!/usr/bin/env bash
# Makes the device check's package, target/device-check (run.py says what runs it): the device
# binaries, built here with --no-default-features (no OpenBLAS, no GStreamer) and stripped, then
# xz-compressed, with a MANIFEST. The GPU machine has no Rust, so they travel with the tree.
#   gpu_tests         the GPU test binary (tests/gpu.rs), feature `cuda`
#   gpu_score         examples/gpu_score.rs: the probe and the figures against PyTorch, feature `cuda`
#   tower_throughput  the image tower on the device through candle (feature `cuda-encoder`; its
#                     CUDA kernels need nvcc, taken from NVIDIA's wheels by
#                     scripts/cuda-toolkit-from-pypi.sh, and it links the machine's cuBLAS);
#                     left out with --no-tower
# Fails if the package is over 22 MiB: with the tree (about 35 MiB) it must stay under the 64 MiB
# that travels. NVRTC does not travel: the GPU machine has it. Then, through the device tool:
#   run(command="python3 benchmarks/device_check/run.py", carry=["target/device-check"], timeout_s=420)
set -euo pipefail
cd "$(dirname "$0")/../.."
limit_mib=22
tower=1
[ "${1:-}" = "--no-tower" ] && tower=0
out=target/device-check
build=target/device-check-build
rm -rf "$out" && mkdir -p "$out"

artifact() { # cargo's JSON messages on stdin, a target name: the executable built for it
  python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == sys.argv[1] and m.get("executable"):
        print(m["executable"])' "$1"
}
cuda=(--release --locked --no-default-features --features cuda)
gpu_tests=$(CARGO_TARGET_DIR=$build cargo test "${cuda[@]}" --test gpu --no-run --message-format=json | artifact gpu)
gpu_score=$(CARGO_TARGET_DIR=$build cargo build "${cuda[@]}" --example gpu_score --message-format=json |
  artifact gpu_score)
strip -o "$out/gpu_tests" "$gpu_tests"
strip -o "$out/gpu_score" "$gpu_score"
if [ $tower = 1 ]; then
  tower_throughput=$(
    CUDA_PATH=$(bash scripts/cuda-toolkit-from-pypi.sh)
    export CUDA_PATH PATH="$CUDA_PATH/bin:$PATH" CUDA_COMPUTE_CAP=90
    CARGO_TARGET_DIR=target/cuda-encoder cargo build --release --locked --no-default-features \
      --features cuda-encoder --example tower_throughput --message-format=json | artifact tower_throughput
  )
  strip -o "$out/tower_throughput" "$tower_throughput"
fi

for binary in "$out"/*; do
  if ldd "$binary" | grep -q 'libgst'; then
    echo "$binary links GStreamer, which the GPU machines lack" >&2
    exit 1
  fi
done
manifest="commit $(git rev-parse --short HEAD)"
git diff --quiet HEAD -- src kernels tests examples Cargo.toml Cargo.lock || manifest+=" with uncommitted changes"
for binary in "$out"/*; do
  manifest+=$'\n'"$(basename "$binary") $(($(stat -c %s "$binary") >> 20)) MiB unpacked"
done
xz -T2 -9e "$out"/*
echo "$manifest" >"$out/MANIFEST"
du -b "$out"/* | awk '{printf "%8.1f MiB  %s\n", $1 / 1048576, $2}'
bytes=$(du -cb "$out" | tail -1 | cut -f1)
echo "package: $(awk -v b="$bytes" 'BEGIN {printf "%.1f", b / 1048576}') MiB of at most $limit_mib MiB"
if [ "$bytes" -gt $((limit_mib << 20)) ]; then
  echo "the package is over $limit_mib MiB" >&2
  exit 1
fi
