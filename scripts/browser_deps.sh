#!/usr/bin/env bash
# Debian's chromium + chromium-driver for tests/test_viewer_browser.py. Installs them with apt-get
# (from the machine's own apt sources) when they are missing and this runs as root or with sudo;
# otherwise says why and exits 0, and the tests skip with the same reason.
set -euo pipefail
if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then
  echo "browser: $(chromium --version 2>/dev/null | head -1); $(chromedriver --version | head -1)"
  exit 0
fi
if ! command -v apt-get >/dev/null; then
  echo "SKIPPED browser install: no apt-get here; install Chromium and ChromeDriver by hand to run the viewer tests"
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "SKIPPED browser install: not root and no password-less sudo for apt-get"
    exit 0
  fi
fi
export DEBIAN_FRONTEND=noninteractive
if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver; } >/tmp/gemserve-browser-deps.log 2>&1; then
  echo "SKIPPED browser install: apt-get failed (last lines of /tmp/gemserve-browser-deps.log below)"
  tail -5 /tmp/gemserve-browser-deps.log
  exit 0
fi
echo "browser: $(chromium --version 2>/dev/null | head -1); $(chromedriver --version | head -1)"
