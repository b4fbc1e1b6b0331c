#!/usr/bin/env bash
# The test command (README, CI): builds the default configuration, then runs every test with the
# `cuda` feature, so the GPU path is built too and its kernels are compiled for every architecture
# CUDA 13 supports through NVRTC (fetched by fetch-nvrtc.sh; no GPU or CUDA install needed). Tests
# that need a CUDA device are reported as ignored there; they then run on the emulated CUDA device
# (test-gpu-emulated.sh, cuda-emulator/), and on a real one where `info --gpu` finds it; the Slurm
# tests likewise with VTR_INDEX_SLURM=1 (CI starts a cluster, .ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
# ffmpeg builds the conformance corpus at test time (installed only if missing).
bash scripts/setup-system.sh --tests
nvrtc=$(bash scripts/fetch-nvrtc.sh)
# The build without default features (no OpenBLAS), kept aside for the test that compares it
# with the default build (ignored by a plain `cargo test`, run below).
cargo build --locked --no-default-features
# Its unit tests too: the products' bit-for-bit properties must hold on the `gemm` crate as well.
cargo test --locked --no-default-features --lib
mkdir -p target/no-default-features
cp target/debug/vtr-index target/no-default-features/vtr-index
cargo build --locked
# --no-fail-fast: a failing test binary must not hide the others' results.
LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" cargo test --locked --features cuda --no-fail-fast "$@"
VTR_INDEX_NO_DEFAULT_FEATURES_BIN="$PWD/target/no-default-features/vtr-index" \
  LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
  cargo test --locked --features cuda --test integration -- --ignored the_build_without_default_features
# The tests that need a CUDA device are ignored above: they run on the emulated device, always,
# and on a real device where there is one.
bash scripts/test-gpu-emulated.sh
gpu=$(LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" cargo run --quiet --locked --features cuda -- info --gpu)
echo "$gpu"
if grep -q "^cuda: *ready" <<<"$gpu"; then
  LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" cargo test --locked --features cuda --test gpu -- --ignored
  LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" cargo test --locked --features cuda --test integration -- --ignored scoring_on_cuda
else
  echo "not run on a real GPU (they ran on the emulated device above): no device here"
fi
# Tests that need a service CI starts are ignored above; each set runs here when its variable is 1
# (.ci/run sets them), and the run fails if none of its tests ran.
run_ignored_when() {
  local variable=$1 filter=$2 what=$3 out
  if [ "${!variable:-}" = 1 ]; then
    out=$(LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" \
      cargo test --locked --features cuda --test integration -- --ignored "$filter" 2>&1) || { echo "$out"; exit 1; }
    echo "$out"
    grep -Eq "test result: ok\. [1-9][0-9]* passed" <<<"$out" || { echo "the tests that need $what did not run" >&2; exit 1; }
  else
    echo "not run: the tests that need $what (reported as ignored): $variable is not 1"
  fi
}
# The page's tests drive Chromium through chromedriver (setup-system.sh --tests installs both).
run_ignored_when VTR_INDEX_BROWSER browser:: "Chromium"
# The tests that submit pipelines/slurm/ to a real cluster (scripts/slurm-cluster.sh starts one).
run_ignored_when VTR_INDEX_SLURM slurm:: "a Slurm cluster"
