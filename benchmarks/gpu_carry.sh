#!/usr/bin/env bash
# Prepares target/gpu-carry/ for a GPU machine (no Rust, no GStreamer, no network there): the GPU
# test binary and the gpu_score benchmark (both built with --features cuda, stripped, linking
# only libc as OpenBLAS is static, and compressed, being mostly OpenBLAS's kernels for every
# CPU), NVRTC 13.0 compressed (in case the machine's CUDA lacks it), the scoring fixtures the
# tests read, and the image-tower benchmark built with --features cuda-encoder (candle's CUDA
# kernels for sm_90, with the toolkit from scripts/cuda-toolkit-from-pypi.sh; it links the
# machine's CUDA 13 libraries). About 40 MB. On the GPU machine, from the repository root:
#   bash target/gpu-carry/run.sh          # GPU tests, then the benchmarks (needs PyTorch)
set -euo pipefail
cd "$(dirname "$0")/.."
nvrtc=$(bash scripts/fetch-nvrtc.sh)
out=target/gpu-carry
rm -rf "$out" && mkdir -p "$out/nvrtc" "$out/fixtures/reference"
cargo build --release --locked --features cuda --example gpu_score
test_binary=$(cargo test --release --locked --features cuda --test gpu --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "gpu" and m.get("executable"):
        print(m["executable"])')
strip -o "$out/gpu_score" target/release/examples/gpu_score
(
  CUDA_PATH=$(bash scripts/cuda-toolkit-from-pypi.sh)
  export CUDA_PATH PATH="$CUDA_PATH/bin:$PATH" CUDA_COMPUTE_CAP=90
  cargo build --release --locked --features cuda-encoder --target-dir target/cuda-encoder --example tower_throughput
)
strip -o "$out/tower_throughput" target/cuda-encoder/release/examples/tower_throughput
strip -o "$out/gpu_tests" "$test_binary"
xz -T2 -6 "$out/tower_throughput" "$out/gpu_score" "$out/gpu_tests"
for lib in libnvrtc.so.13 libnvrtc-builtins.so.13.0; do xz -T2 -6 -c "$nvrtc/$lib" > "$out/nvrtc/$lib.xz"; done
cp -r tests/fixtures/reference/score "$out/fixtures/reference/"
cat > "$out/run.sh" <<'RUN'
#!/usr/bin/env bash
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
for f in "$here"/*.xz "$here"/nvrtc/*.xz; do [ -e "${f%.xz}" ] || xz -dk "$f"; done
export LD_LIBRARY_PATH="$here/nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" VTR_INDEX_FIXTURES="$here/fixtures"
"$here/gpu_tests" --include-ignored --nocapture --test-threads 1
python3 benchmarks/gpu_vs_pytorch.py --bin "$here/gpu_score" "$@"
python3 benchmarks/tower_vs_pytorch.py --device cuda --dtype f16 --frames 2048 --batch 256 --bin "$here/tower_throughput"
RUN
chmod +x "$out/run.sh"
du -sh "$out"
