#!/usr/bin/env bash
# System tools vaemo needs, for one make goal (the argument; install when none): FFmpeg (ffmpeg,
# ffprobe: decode/encode) for all, espeak-ng (speech for generated media) for test and demo, and
# Chromium (headless screenshots of the Prefect and MLflow UIs) for test.
# Installs what is missing with apt-get when possible. A tool the goal needs that cannot be installed
# stops make with what to install; `install` also tries the test and demo tools, and skips them
# with one line when it cannot, because only those goals need them.
set -euo pipefail
install_needs="ffmpeg ffprobe"
test_needs="ffmpeg ffprobe espeak-ng chromium"
demo_needs="ffmpeg ffprobe espeak-ng"
goal=${1:-install}
case "$goal" in
  install|test|demo) ;;
  *) echo "system-deps.sh: unknown goal '$goal' (install, test or demo)" >&2; exit 2 ;;
esac
needs_var=${goal}_needs
required=${!needs_var}

# Lists are words in a string (tool names have no spaces), which any bash expands safely under set -u.
missing_of() {
  local tool out=""
  for tool in $1; do
    command -v "$tool" >/dev/null 2>&1 || out+=" $tool"
  done
  echo "${out# }"
}
# ffprobe comes with the ffmpeg package.
packages_of() {
  printf '%s\n' $1 | sed 's/ffprobe/ffmpeg/' | sort -u | tr '\n' ' ' | sed 's/ $//'
}

missing_required=$(missing_of "$required")
missing_optional=""
[ "$goal" = install ] && missing_optional=$(missing_of "espeak-ng chromium")
[ -z "$missing_required$missing_optional" ] && exit 0

# How apt-get can run here, or why it cannot.
sudo="" reason=""
if ! command -v apt-get >/dev/null 2>&1; then
  reason="no apt-get"
elif [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null 2>&1; then sudo=sudo; else reason="not root and no sudo"; fi
fi

if [ -z "$reason" ]; then
  echo "vaemo: installing system packages${sudo:+ with sudo}: $(packages_of "$missing_required $missing_optional")"
  reason="apt-get failed"  # what is still missing afterwards was not installed by it
  if $sudo apt-get update -qq; then
    apt_install() {
      $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >/dev/null
    }
    # The required packages together; the optional ones one by one, so that one a distribution
    # names otherwise (Chromium on some) keeps none of the others out.
    if [ -n "$missing_required" ]; then
      apt_install $(packages_of "$missing_required") || true
    fi
    for package in $(packages_of "$missing_optional"); do
      apt_install "$package" || true
    done
  fi
  missing_required=$(missing_of "$missing_required")
  missing_optional=$(missing_of "$missing_optional")
fi

if [ -n "$missing_optional" ]; then
  # Who needs what was skipped, so that a later `make test` or `make demo` failing is no surprise.
  needed=""
  for other in test demo; do
    needs_var=${other}_needs wanted=""
    for tool in $missing_optional; do
      case " ${!needs_var} " in *" $tool "*) wanted+=" $tool" ;; esac
    done
    if [ -n "$wanted" ]; then needed+=", make $other needs$wanted"; fi
  done
  echo "vaemo: skipped $missing_optional (cannot install: $reason): ${needed#, }" >&2
fi

if [ -n "$missing_required" ]; then
  packages=$(packages_of "$missing_required")
  conda=""  # conda-forge's FFmpeg is a common way without root
  case " $packages " in *" ffmpeg "*) conda="; conda: conda install -c conda-forge ffmpeg" ;; esac
  echo "vaemo: missing system tools: $missing_required (needed by make $goal; cannot install: $reason)" >&2
  echo "  Install them with your package manager (Debian/Ubuntu: apt-get install $packages;" >&2
  echo "  macOS: brew install $packages$conda) and run make again." >&2
  exit 1
fi
