#!/usr/bin/env bash
# First ingest benchmark: wall time, frames/s, videos/s and peak RSS of one cold ingest of the
# bundled sample corpus (12 clips, 63 s of video) with the bundled tiny CLIP.
# Usage: bash benchmarks/ingest_sample.sh [RUNS]   (builds the binary first; PROFILE=dev for the
# debug build, whose dependencies are optimised but vtr-index's own code is not; BIN=PATH runs
# a binary built elsewhere, an earlier commit's say, instead)
set -euo pipefail
cd "$(dirname "$0")/.."
runs="${1:-3}"
profile="${PROFILE:-release}"
if [ -n "${BIN:-}" ]; then
  bin="$BIN"
else
  cargo build --profile "$profile" --quiet
  bin="./target/$([ "$profile" = dev ] && echo debug || echo "$profile")/vtr-index"
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
echo "binary: $bin"
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
for i in $(seq "$runs"); do
  rm -rf "$work/index"
  /usr/bin/time -f "peak_rss_kib=%M wall_s=%e" "$bin" ingest sample/videos \
    --index "$work/index" --model sample/model 2>&1 | grep -E "ingest:|peak_rss" | sed 's/^vtr-index: //'
done
