#!/usr/bin/env bash
# The GPU path on the emulated CUDA device (cuda-emulator/README.md), in every test run: builds
# the stand-in for libcuda under "${CARGO_TARGET_DIR:-target}/cuda-emulator", once with
# AddressSanitizer and once with ThreadSanitizer (make rebuilds whatever a changed kernel source
# or emulator file touches), then runs against it, and it alone:
#   AddressSanitizer: every device test of tests/gpu.rs but the 48,000² one, the CLI comparison
#     (scoring_on_cuda_matches_the_cpu) and the emulator's own tests (tests/emulated_device.rs);
#   ThreadSanitizer: the edge-shape tests and the race checker's test.
# The two runs go side by side (a launch runs on one core). Exits non-zero if a test fails or
# none ran. VTR_INDEX_EMULATOR_SEED repeats a run's thread order (each run prints its seed).
set -euo pipefail
cd "$(dirname "$0")/.."
target=${CARGO_TARGET_DIR:-$PWD/target}
nvrtc=$(bash scripts/fetch-nvrtc.sh)
emulator="$target/cuda-emulator"
# The constants the kernels share with the host, as NVRTC gets them (gpu::score::kernel_defines).
defines=$(cargo run --quiet --locked --features cuda --example kernel_constants | tr '\n' ' ')
for sanitizer in address thread; do
  make -s -C cuda-emulator OUT="$emulator/$sanitizer" SANITIZER="$sanitizer" DEFINES="$defines" \
    "$emulator/$sanitizer/libcuda.so.1"
done
# The test binaries, built here: cargo itself must not run under a sanitizer.
built=$(cargo test --locked --features cuda --no-run --test gpu --test emulated_device --test integration 2>&1) ||
  { echo "$built"; exit 1; }
binary() { sed -n "s|.*Executable tests/$1 (\(.*\))|\1|p" <<<"$built"; }
gpu_tests=$(binary gpu.rs)
emulator_tests=$(binary emulated_device.rs)
integration_tests=$(binary tests.rs)

seed=${VTR_INDEX_EMULATOR_SEED:-$(od -An -N6 -tu8 /dev/urandom | tr -d ' ')}
echo "emulated device: thread order seed $seed (VTR_INDEX_EMULATOR_SEED=$seed repeats it)"
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
# Three devices: a full Ampere; a Turing with a small grid, memory and shared memory for the
# limit tests, whose driver takes no cubin (the PTX fallback); an Ampere with 7 MiB for the
# memory budget's test.
# The test harness's channel (Rust's std is not instrumented, so its atomics look like races).
echo "race:library/std/src/sync/mpmc/" >"$logs/suppressions"
export VTR_INDEX_EMULATED_DEVICES="sm_80;sm_75,memory_mib=256,grid_y=4,shared_kib=16,cubin=refuse;sm_80,memory_kib=7168" VTR_INDEX_EMULATOR_SEED="$seed"

# AddressSanitizer goes on after a report (the launch fails, as on a card), so a store past an
# allocation lands in its redzone: 512 bytes keep the next chunk's header out of reach.
on_device() { # sanitizer, then the command
  local sanitizer=$1
  shift
  env LD_LIBRARY_PATH="$nvrtc:$emulator/$sanitizer" \
    LD_PRELOAD="$(gcc -print-file-name="lib${sanitizer:0:1}san.so")" \
    VTR_INDEX_EMULATOR_SANITIZER="$sanitizer" \
    ASAN_OPTIONS="detect_leaks=0:halt_on_error=0:redzone=512" \
    TSAN_OPTIONS="log_path=$logs/tsan halt_on_error=0 exitcode=0 suppressions=$logs/suppressions" \
    "$@"
}

address_run() {
  # Not the 48,000² test: the device check runs it on a card (benchmarks/device_check/).
  on_device address "$gpu_tests" --ignored --skip device_scoring_past_2_pow_31_elements_matches_the_cpu_path
  on_device address "$emulator_tests" --ignored --skip a_shared_memory_race_is_caught
  on_device address "$integration_tests" --ignored scoring_on_cuda_matches_the_cpu
}
# One test at a time: ThreadSanitizer's report of a launch is read from its log as it runs.
thread_run() {
  on_device thread "$gpu_tests" --ignored --test-threads 1 device_edge_shapes_equal_the_cpu_path \
    f16_inputs_at_the_edges_of_the_tiles
  on_device thread "$emulator_tests" --ignored --exact a_shared_memory_race_is_caught
}
address_run >"$logs/address.out" 2>&1 &
address=$!
thread_run >"$logs/thread.out" 2>&1 &
thread=$!
status=0
wait $address || status=1
wait $thread || status=1
for run in address thread; do
  echo "== the emulated device with the $run sanitizer"
  grep -v "^emulated CUDA device: threads run in the order" "$logs/$run.out"
  # Every binary's summary must show tests that ran, and no failure.
  if grep -q "^test result: FAILED" "$logs/$run.out" || grep -Eq "^test result: ok\. 0 passed" "$logs/$run.out" ||
    ! grep -q "^test result: ok" "$logs/$run.out"; then
    status=1
  fi
done
if [ $status -ne 0 ]; then
  cat "$logs"/tsan.* 2>/dev/null || true
  echo "the GPU path failed on the emulated device (seed $seed)" >&2
fi
exit $status
