#!/usr/bin/env bash
# System tools vaemo needs: FFmpeg (decode/encode), espeak-ng (speech for generated media) and
# Chromium (headless screenshots of the Prefect and MLflow UIs in the tests).
# Installs them with apt-get when possible; otherwise says exactly what is missing.
set -euo pipefail
missing=()
for tool in ffmpeg ffprobe espeak-ng chromium; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
[ ${#missing[@]} -eq 0 ] && exit 0
packages=$(printf '%s\n' "${missing[@]}" | sed 's/ffprobe/ffmpeg/' | sort -u | tr '\n' ' ')
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  echo "vaemo: installing system packages: $packages"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >/dev/null
elif command -v apt-get >/dev/null 2>&1 && command -v sudo >/dev/null 2>&1; then
  echo "vaemo: installing system packages with sudo: $packages"
  sudo apt-get update -qq
  sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $packages >/dev/null
else
  echo "vaemo: missing system tools: ${missing[*]}" >&2
  echo "  Install them with your package manager (Debian/Ubuntu: apt-get install $packages;" >&2
  echo "  macOS: brew install ffmpeg espeak-ng chromium; conda: conda install -c conda-forge ffmpeg) and run make again." >&2
  exit 1
fi
