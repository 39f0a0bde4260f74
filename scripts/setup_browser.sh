#!/usr/bin/env bash
# Headless Chromium and its WebDriver for the page test (tests/test_page.py): Debian's
# chromium + chromium-driver, installed with apt-get when missing. Used by `make test`.
set -uo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  exit 0
fi
sudo=""
[ "$(id -u)" -eq 0 ] || sudo="sudo -n"
if command -v apt-get >/dev/null; then
  echo "[setup] installing chromium + chromium-driver (apt-get) for the page test"
  $sudo apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 \
    || { $sudo apt-get update -q >/dev/null 2>&1 && $sudo apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; } \
    || echo "[setup] apt-get could not install chromium; tests/test_page.py will fail: install chromium and chromedriver"
else
  echo "[setup] no apt-get: install chromium and chromedriver for tests/test_page.py"
fi
