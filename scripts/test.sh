#!/usr/bin/env bash
# The test command (README, CI): builds the default configuration, then runs every test with the
# `cuda` feature, so the GPU path is built too and its kernels are compiled for sm_80 and sm_90
# through NVRTC (fetched by fetch-nvrtc.sh; no GPU or CUDA install needed). Tests that need a
# CUDA device print SKIPPED where there is none.
set -euo pipefail
cd "$(dirname "$0")/.."
# ffmpeg builds the conformance corpus at test time (installed only if missing).
bash scripts/setup-system.sh --tests
nvrtc=$(bash scripts/fetch-nvrtc.sh)
cargo build --locked
LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" cargo test --locked --features cuda "$@"
# The tests that need a device pass without checking anything where there is none; say so.
gpu=$(LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" cargo run --quiet --locked --features cuda -- info --gpu)
echo "$gpu"
grep -q "^cuda: *ready" <<<"$gpu" || echo "SKIPPED: the tests that need a CUDA device (tests/gpu.rs) ran nothing on this machine"
