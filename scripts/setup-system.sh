#!/usr/bin/env bash
# Installs the system packages vtr-index builds and runs with (Debian/Ubuntu), if missing:
# GStreamer with the demuxers and decoders for common video formats, OpenBLAS (linked statically
# for the matrix products), and pkg-config. With --tests, also ffmpeg, which the tests use to
# build the conformance corpus of real-world files (tests/media/conformance.sh), Chromium and its
# WebDriver, which drive the page tests (tests/browser.rs), and g++ and make,
# which build the emulated CUDA device with its sanitizers (cuda-emulator/).
set -euo pipefail
packages=(pkg-config libgstreamer1.0-dev libgstreamer-plugins-base1.0-dev gstreamer1.0-plugins-base
  gstreamer1.0-plugins-good gstreamer1.0-plugins-bad gstreamer1.0-plugins-ugly gstreamer1.0-libav
  libopenblas-dev)
if [ "${1:-}" = "--tests" ]; then
  packages+=(ffmpeg g++ make chromium chromium-driver fonts-dejavu-core)
fi
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi
