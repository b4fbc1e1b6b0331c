#!/usr/bin/env bash
# Builds the conformance corpus of real-world video files at test time (nothing binary is
# committed): the containers users have with their natural codecs, with the extra streams real
# files carry (audio, subtitles, timecode, cover art, a second video stream), each paired with a
# video-only twin that carries the same coded video stream in the same container; odd encodings
# (bit depths, chroma, range, interlacing, intra codecs, MP4 layouts, rotation, sizes); and a few
# hostile files. Needs ffmpeg with libx264, libx265, libvpx, libsvtav1, libtheora, libmp3lame,
# libopus and libvorbis (Debian's ffmpeg package).
#
#   bash tests/media/conformance.sh OUT
#
# writes OUT/good/, OUT/twins/, OUT/odd/, OUT/hostile/ and OUT/corpus.tsv, one line per file:
#   kind <TAB> file <TAB> twin or - <TAB> note
# where kind is good (compare with its twin), odd (compare with ffmpeg's RGB), hostile (a typed
# failure), limit (a real file GStreamer cannot read: a typed failure, never a timeout) or n/a
# (the container cannot hold that combination; file names the cell).
set -euo pipefail
out=${1:?usage: conformance.sh OUT}
mkdir -p "$out/good" "$out/twins" "$out/odd" "$out/hostile" "$out/src"
cd "$out"
: > corpus.tsv
export SVT_LOG=1
ff() { ffmpeg -nostdin -hide_banner -loglevel error -y "$@"; }
row() { printf '%s\t%s\t%s\t%s\n' "$@" >> corpus.tsv; }

size=192x144
dur=3
video="testsrc2=size=$size:rate=25:duration=$dur"
second="smptebars=size=$size:rate=25:duration=$dur"
audio="sine=frequency=440:sample_rate=48000:duration=$dur"
printf '1\n00:00:00,000 --> 00:00:01,500\nfirst line\n\n2\n00:00:01,500 --> 00:00:03,000\nsecond line\n' > src/subs.srt
ff -f lavfi -i "color=c=red:size=64x64" -frames:v 1 src/cover.png

# One good file and its twin: $1 name, $2 muxer, $3… ffmpeg output options (inputs: 0 video,
# 1 audio, 2 subtitles, 3 cover, 4 second video).
good() {
  local name=$1 format=$2
  shift 2
  ff -f lavfi -i "$video" -f lavfi -i "$audio" -i src/subs.srt -i src/cover.png -f lavfi -i "$second" \
    "$@" -f "$format" "good/$name"
  # The chosen stream (the lowest-numbered video stream that is not cover art) alone, copied.
  local chosen
  chosen=$(ffprobe -v error -select_streams v -show_entries stream=index:stream_disposition=attached_pic \
    -of csv=p=0 "good/$name" | awk -F, '$2 == 0 && !found { print $1; found = 1 }')
  ff -i "good/$name" -map "0:$chosen" -c copy -map_metadata -1 -map_chapters -1 -write_tmcd 0 \
    -f "$format" "twins/$name" 2>/dev/null ||
    ff -i "good/$name" -map "0:$chosen" -c copy -map_metadata -1 -map_chapters -1 -f "$format" "twins/$name"
  row good "good/$name" "twins/$name" "stream $chosen"
}
na() { row n/a "$1" - "$2"; }

h264=(-c:v libx264 -preset veryfast -pix_fmt yuv420p -g 25)
hevc=(-c:v libx265 -preset veryfast -pix_fmt yuv420p -x265-params log-level=none:keyint=25)
vp8=(-c:v libvpx -deadline realtime -cpu-used 8 -b:v 300k -g 25)
vp9=(-c:v libvpx-vp9 -deadline realtime -cpu-used 8 -b:v 300k -g 25)
av1=(-c:v libsvtav1 -preset 12 -g 25)

# MP4 and MOV: H.264 and HEVC, with AAC, mov_text subtitles, a timecode track, cover art, a
# second video stream after and before the main one.
for ext in mp4 mov; do
  fmt=$ext
  good "$ext-h264-aac.$ext" "$fmt" -map 0 -map 1 "${h264[@]}" -c:a aac
  good "$ext-hevc-aac.$ext" "$fmt" -map 0 -map 1 "${hevc[@]}" -tag:v hvc1 -c:a aac
  good "$ext-h264-subtitles.$ext" "$fmt" -map 0 -map 2 "${h264[@]}" -c:s mov_text
  good "$ext-h264-timecode.$ext" "$fmt" -map 0 "${h264[@]}" -timecode 01:00:00:00
  good "$ext-h264-cover.$ext" "$fmt" -map 0 -map 1 -map 3 "${h264[@]}" -c:a aac -c:v:1 png -disposition:v:1 attached_pic
  good "$ext-h264-second-after.$ext" "$fmt" -map 0 -map 4 -map 1 "${h264[@]}" -c:a aac
  good "$ext-h264-second-before.$ext" "$fmt" -map 4 -map 0 -map 1 "${h264[@]}" -c:a aac
done
# Matroska: H.264 and VP9, with MP3 / Opus, SRT subtitles, an attached cover, a second video.
good mkv-h264-mp3.mkv matroska -map 0 -map 1 "${h264[@]}" -c:a libmp3lame
good mkv-vp9-opus.mkv matroska -map 0 -map 1 "${vp9[@]}" -c:a libopus
good mkv-h264-subtitles.mkv matroska -map 0 -map 2 "${h264[@]}" -c:s srt
good mkv-h264-cover.mkv matroska -map 0 -map 1 "${h264[@]}" -c:a libmp3lame \
  -attach src/cover.png -metadata:s:t:0 mimetype=image/png -metadata:s:t:0 filename=cover.png
good mkv-h264-second-after.mkv matroska -map 0 -map 4 -map 1 "${h264[@]}" -c:a libopus
good mkv-h264-second-before.mkv matroska -map 4 -map 0 -map 1 "${h264[@]}" -c:a libopus
na mkv-h264-timecode.mkv "Matroska has no timecode track"
# WebM: VP8, VP9 and AV1 with Vorbis / Opus, WebVTT subtitles.
good webm-vp8-vorbis.webm webm -map 0 -map 1 "${vp8[@]}" -c:a libvorbis
good webm-vp9-opus.webm webm -map 0 -map 1 "${vp9[@]}" -c:a libopus
good webm-av1-opus.webm webm -map 0 -map 1 "${av1[@]}" -c:a libopus
good webm-vp9-subtitles.webm webm -map 0 -map 2 "${vp9[@]}" -c:s webvtt
na webm-vp9-cover.webm "WebM allows no attachments"
# AVI: MPEG-4 Part 2 with MP3, MJPEG with PCM.
good avi-mpeg4-mp3.avi avi -map 0 -map 1 -c:v mpeg4 -q:v 4 -c:a libmp3lame
good avi-mjpeg-pcm.avi avi -map 0 -map 1 -c:v mjpeg -q:v 4 -pix_fmt yuvj420p -c:a pcm_s16le
na avi-mpeg4-subtitles.avi "AVI holds no subtitle track"
# MPEG-TS and MPEG-PS: H.264 / MPEG-2 with AAC, MP2 or AC-3.
good ts-h264-aac.ts mpegts -map 0 -map 1 "${h264[@]}" -c:a aac
good ts-mpeg2-ac3.ts mpegts -map 0 -map 1 -c:v mpeg2video -q:v 4 -c:a ac3
good ps-mpeg2-mp2.mpg mpeg -map 0 -map 1 -c:v mpeg2video -q:v 4 -c:a mp2
# ffmpeg writes H.264 into MPEG-PS without a program stream map; GStreamer's mpegpsdemux then
# takes it for MPEG-2 video and finds no frame. Kept as a known limit: a typed failure, fast.
ff -f lavfi -i "$video" -f lavfi -i "$audio" -map 0 -map 1 "${h264[@]}" -c:a ac3 -f mpeg hostile/ps-h264-ac3.mpg
row limit hostile/ps-h264-ac3.mpg - "H.264 in MPEG-PS without a program stream map"
na ts-h264-subtitles.ts "no text subtitle codec for MPEG-TS in ffmpeg"
# Ogg: Theora with Vorbis.
good ogg-theora-vorbis.ogv ogg -map 0 -map 1 -c:v libtheora -q:v 7 -c:a libvorbis

# Video not first: the audio or subtitle track comes before it (as some cameras, editors and
# remuxers write), so the indexed stream's number is not 0.
good mp4-aac-first.mp4 mp4 -map 1 -map 0 "${h264[@]}" -c:a aac
good mov-subtitles-first.mov mov -map 2 -map 0 -map 1 "${h264[@]}" -c:s mov_text -c:a aac
good mkv-opus-first.mkv matroska -map 1 -map 0 "${h264[@]}" -c:a libopus
good mkv-subtitles-audio-first.mkv matroska -map 2 -map 1 -map 0 "${vp9[@]}" -c:s srt -c:a libmp3lame
good webm-opus-first.webm webm -map 1 -map 0 "${vp9[@]}" -c:a libopus
good avi-mp3-first.avi avi -map 1 -map 0 -c:v mpeg4 -q:v 4 -c:a libmp3lame
good ts-aac-first.ts mpegts -map 1 -map 0 "${h264[@]}" -c:a aac
good ogg-vorbis-first.ogv ogg -map 1 -map 0 -c:v libtheora -q:v 7 -c:a libvorbis

# Odd encodings, compared with ffmpeg's own RGB conversion (no twin). Note: tolerance class.
odd() {
  local name=$1 note=$2
  shift 2
  ff "$@" "odd/$name"
  row odd "odd/$name" - "$note"
}
src=(-f lavfi -i "$video")
odd h264-10bit-420.mp4 10bit "${src[@]}" -c:v libx264 -preset veryfast -pix_fmt yuv420p10le
odd h264-422.mp4 8bit "${src[@]}" -c:v libx264 -preset veryfast -pix_fmt yuv422p
odd h264-444.mp4 8bit "${src[@]}" -c:v libx264 -preset veryfast -pix_fmt yuv444p
odd hevc-10bit-422.mkv 10bit "${src[@]}" -c:v libx265 -preset veryfast -pix_fmt yuv422p10le -x265-params log-level=none
odd h264-full-range.mp4 8bit "${src[@]}" -c:v libx264 -preset veryfast -pix_fmt yuvj420p
odd h264-interlaced.ts interlaced "${src[@]}" -vf setfield=tff -c:v libx264 -preset veryfast -pix_fmt yuv420p -flags +ilme+ildct -x264-params tff=1
odd mpeg2-interlaced.mpg interlaced "${src[@]}" -vf setfield=tff -c:v mpeg2video -q:v 3 -flags +ilme+ildct -top 1
odd prores.mov 10bit "${src[@]}" -c:v prores_ks -profile:v 2
odd ffv1.mkv 8bit "${src[@]}" -c:v ffv1
odd mjpeg.mov 8bit "${src[@]}" -c:v mjpeg -q:v 3 -pix_fmt yuvj422p
odd h264-fragmented.mp4 8bit "${src[@]}" -c:v libx264 -preset veryfast -pix_fmt yuv420p -g 25 -movflags frag_keyframe+empty_moov
odd h264-faststart.mp4 8bit "${src[@]}" -f lavfi -i "$audio" -c:v libx264 -preset veryfast -pix_fmt yuv420p -c:a aac -movflags +faststart
odd h264-start-offset.mp4 8bit "${src[@]}" -c:v libx264 -preset veryfast -pix_fmt yuv420p -output_ts_offset 1.5
odd h264-negative-cts.mp4 8bit "${src[@]}" -c:v libx264 -preset veryfast -pix_fmt yuv420p -bf 3 -movflags +negative_cts_offsets
odd h264-nonsquare.mp4 8bit -f lavfi -i "testsrc2=size=176x144:rate=25:duration=$dur" -vf setsar=16/11 -c:v libx264 -preset veryfast -pix_fmt yuv420p
# A phone's portrait clip: landscape-coded HEVC with sound and a display matrix. ffmpeg 5 writes
# the matrix only when it copies the stream, so the rotation is set in a second pass, and checked.
ff "${src[@]}" -f lavfi -i "$audio" -c:v libx265 -preset veryfast -pix_fmt yuv420p -x265-params log-level=none \
  -tag:v hvc1 -c:a aac src/phone.mov
odd phone-hevc-rotated.mov 8bit -i src/phone.mov -map 0 -c copy -metadata:s:v:0 rotate=90
# (Read whole before grep: `grep -q` stopping early would fail the pipe under pipefail.)
streams=$(ffprobe -v error -show_streams odd/phone-hevc-rotated.mov)
grep -q '^rotation=' <<<"$streams" ||
  { echo "ffmpeg wrote no display matrix into odd/phone-hevc-rotated.mov" >&2; exit 1; }
odd h264-202x118.mp4 8bit -f lavfi -i "testsrc2=size=202x118:rate=25:duration=$dur" -c:v libx264 -preset veryfast -pix_fmt yuv420p
odd ffv1-161x97.mkv 8bit -f lavfi -i "testsrc2=size=161x97:rate=25:duration=$dur" -c:v ffv1 -pix_fmt yuv444p

# Hostile files: each must become a typed failure while the good files are indexed.
head -c 20000 good/mp4-h264-aac.mp4 > hostile/truncated.mp4
ff -f lavfi -i "$audio" -c:a aac -f mp4 hostile/audio-only.mp4
printf 'not a video at all\n' > hostile/text.mkv
: > hostile/empty.webm
for f in truncated.mp4 audio-only.mp4 text.mkv empty.webm; do row hostile "hostile/$f" - -; done
