#!/usr/bin/env bash
# System libraries tagray uses beside its Python packages, from Debian/Ubuntu with apt-get when
# missing: libexempi8 (XMP for `tagray import folder`, through python-xmp-toolkit) and exiftool
# (libimage-exiftool-perl: the tests write their photo-library fixtures with it, a client no
# one here wrote). Used by scripts/setup.sh; safe to re-run.
set -uo pipefail
want=()
ldconfig -p 2>/dev/null | grep -q "libexempi.so" || want+=(libexempi8)
command -v exiftool >/dev/null || want+=(libimage-exiftool-perl)
[ ${#want[@]} -eq 0 ] && exit 0
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo -n"
if command -v apt-get >/dev/null; then
  echo "[setup] installing ${want[*]} (apt-get)"
  $sudo apt-get install -y -q "${want[@]}" >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q "${want[@]}" >/dev/null 2>&1; } \
    || echo "[setup] apt-get could not install ${want[*]}: install them (tagray import folder needs libexempi8)"
else
  echo "[setup] no apt-get: install ${want[*]} (exempi, exiftool) yourself"
fi
