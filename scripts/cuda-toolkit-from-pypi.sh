#!/usr/bin/env bash
# Assembles the CUDA 13.0 toolkit that `--features cuda-encoder` builds with (candle compiles its
# CUDA kernels with nvcc and links cudart, cuBLAS, cuRAND, NVRTC and the driver) from NVIDIA's
# PyPI wheels, for machines with no CUDA install and no GPU, such as this project's build
# machines. Prints the folder; build with
#   export CUDA_PATH=$(bash scripts/cuda-toolkit-from-pypi.sh) PATH=$CUDA_PATH/bin:$PATH CUDA_COMPUTE_CAP=90
#   cargo build --release --features cuda-encoder
# The wheels carry no libcuda (that is the driver's): a link stub is made from the driver
# functions candle and cudarc call; at run time the real driver is loaded. About 700 MB.
set -euo pipefail
cd "$(dirname "$0")/.."
dir="$PWD/target/cuda-13.0"
toolkit="$dir/nvidia/cu13"
if [ ! -e "$toolkit/lib/libcuda.so" ]; then
  wheels=$(mktemp -d)
  trap 'rm -rf "$wheels"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$wheels" \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-nvvm==13.0.88" "nvidia-cuda-runtime==13.0.96" \
    "nvidia-cuda-cccl==13.0.85" "nvidia-cuda-nvrtc==13.0.88" "nvidia-cublas==13.0.2.14" "nvidia-curand==10.4.0.35" >&2
  mkdir -p "$dir"
  for wheel in "$wheels"/*.whl; do python3 -m zipfile -e "$wheel" "$dir"; done
  chmod +x "$toolkit"/bin/* "$toolkit"/nvvm/bin/*
  (cd "$toolkit/lib" && for lib in *.so.*; do ln -sf "$lib" "${lib%%.so.*}.so"; done)
  # The driver functions cudarc's bindings declare, as empty functions in libcuda.so.1.
  candidates=$(grep -ho 'pub unsafe fn cu[A-Z][A-Za-z0-9_]*' ~/.cargo/registry/src/*/cudarc-0.19.*/src/driver/sys/mod.rs | sort -u | cut -c15-)
  for f in $candidates; do echo "void $f(void) {}"; done > "$dir/libcuda_stub.c"
  gcc -shared -fPIC -o "$toolkit/lib/libcuda.so" -Wl,-soname,libcuda.so.1 "$dir/libcuda_stub.c"
fi
echo "$toolkit"
