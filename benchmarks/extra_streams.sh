#!/usr/bin/env bash
# What the streams a video does not index cost: ingest wall time of clips that carry audio and
# subtitles beside their video (MP4: AAC + mov_text; Matroska: Opus + SRT) against their
# video-only twins (the same coded video, copied with `-an -sn -c copy` into the same container).
# Each corpus is N distinct 20 s 640x360 25 fps H.264 clips; the rounds alternate the two
# corpora, each into a fresh index, and the medians are compared (goal: ≤ 1.10×).
# Usage: bash benchmarks/extra_streams.sh [CLIPS] [ROUNDS]   (needs ffmpeg; builds the binary)
set -euo pipefail
cd "$(dirname "$0")/.."
clips="${1:-8}"
rounds="${2:-5}"
cargo build --release --quiet
bin=./target/release/vtr-index
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
ff() { ffmpeg -nostdin -hide_banner -loglevel error -y "$@"; }
printf '1\n00:00:00,000 --> 00:00:10,000\nfirst line\n\n2\n00:00:10,000 --> 00:00:20,000\nsecond line\n' > "$work/subs.srt"
for format in mp4 mkv; do
  mkdir -p "$work/$format/streams" "$work/$format/twins"
done
for i in $(seq "$clips"); do
  inputs=(-f lavfi -i "testsrc2=size=640x360:rate=25:duration=20,hue=h=$((i * 40))"
    -f lavfi -i "sine=frequency=$((220 * i)):sample_rate=48000:duration=20" -i "$work/subs.srt")
  video=(-c:v libx264 -preset veryfast -pix_fmt yuv420p -g 50)
  ff "${inputs[@]}" -map 0 -map 1 -map 2 "${video[@]}" -c:a aac -ac 2 -c:s mov_text "$work/mp4/streams/clip$i.mp4"
  ff "${inputs[@]}" -map 0 -map 1 -map 2 "${video[@]}" -c:a libopus -ac 2 -c:s srt "$work/mkv/streams/clip$i.mkv"
  for format in mp4 mkv; do
    ff -i "$work/$format/streams/clip$i.$format" -map 0:v -c copy "$work/$format/twins/clip$i.$format"
  done
done

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ *//')"
echo "corpus: $clips clips of 20 s per corpus, $rounds rounds"
ingest_seconds() {
  rm -rf "$work/index"
  local start end
  start=$(date +%s.%N)
  "$bin" ingest "$1" --index "$work/index" --model sample/model 2> "$work/stderr" ||
    { cat "$work/stderr" >&2; exit 1; }
  end=$(date +%s.%N)
  grep -q "ingest: $clips new" "$work/stderr" || { cat "$work/stderr" >&2; exit 1; }
  awk -v a="$start" -v b="$end" 'BEGIN { print b - a }'
}
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
for format in mp4 mkv; do
  : > "$work/streams.s"
  : > "$work/twins.s"
  for _ in $(seq "$rounds"); do
    ingest_seconds "$work/$format/streams" >> "$work/streams.s"
    ingest_seconds "$work/$format/twins" >> "$work/twins.s"
  done
  with=$(median < "$work/streams.s")
  without=$(median < "$work/twins.s")
  printf '%s: with audio + subtitles %.2f s, video only %.2f s (medians), ratio %.3f; runs: %s | %s\n' \
    "$format" "$with" "$without" "$(awk -v a="$with" -v b="$without" 'BEGIN { print a / b }')" \
    "$(tr '\n' ' ' < "$work/streams.s")" "$(tr '\n' ' ' < "$work/twins.s")"
done
