#!/usr/bin/env bash
# First ingest benchmark: wall time, frames/s, videos/s and peak RSS of one cold ingest of the
# bundled sample corpus (12 clips, 63 s of video) with the bundled tiny CLIP.
# Usage: bash benchmarks/ingest_sample.sh [RUNS]   (builds the release binary first)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
cargo build --release --quiet
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
for i in $(seq "$runs"); do
  rm -rf "$work/index"
  /usr/bin/time -f "peak_rss_kib=%M wall_s=%e" ./target/release/vtr-index ingest sample/videos \
    --index "$work/index" --model sample/model 2>&1 | grep -E "ingest:|peak_rss" | sed 's/^vtr-index: //'
done
