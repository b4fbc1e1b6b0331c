#!/usr/bin/env bash
# Puts NVIDIA's runtime compiler (NVRTC 13.0, from its PyPI wheel) under target/nvrtc and prints
# its lib folder. The `cuda` feature loads NVRTC at run time to compile kernels/*.cu; the tests
# use it to compile every kernel for sm_80 and sm_90 with no GPU and no CUDA installed.
# 13.0 matches the driver of the GPU machines we run on (CUDA 13.0), which rejects newer PTX.
set -euo pipefail
cd "$(dirname "$0")/.."
version=13.0.88
dir="$PWD/target/nvrtc/$version"
if [ ! -e "$dir/lib/libnvrtc.so.13" ]; then
  tmp=$(mktemp -d)
  trap 'rm -rf "$tmp"' EXIT
  python3 -m pip download --quiet --no-deps --dest "$tmp" "nvidia-cuda-nvrtc==$version" >&2
  mkdir -p "$dir/lib"
  python3 - "$tmp"/*.whl "$dir/lib" <<'PY'
import sys, zipfile, os
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ("libnvrtc.so.13", "libnvrtc-builtins.so.13.0"):
        with z.open("nvidia/cu13/lib/" + name) as src, open(os.path.join(dest, name), "wb") as dst:
            dst.write(src.read())
PY
fi
echo "$dir/lib"
