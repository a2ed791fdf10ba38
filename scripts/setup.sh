#!/usr/bin/env bash
# Create the virtual environment and install everything cohortflow needs (idempotent).
# Debian packages are installed when run as root; Python packages come from PyPI, pinned by
# requirements.lock. Nothing else is downloaded, now or at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

# Debian packages the project needs (none yet beyond Python; later stages add Orthanc here).
DEBIAN_PACKAGES="$(grep -v '^#' scripts/debian-packages.txt | xargs || true)"
if [ -n "$DEBIAN_PACKAGES" ]; then
  missing=""
  for p in $DEBIAN_PACKAGES; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
  if [ -n "$missing" ]; then
    if [ "$(id -u)" = "0" ]; then
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing
    else
      echo "setup: please install the Debian packages:$missing (needs root)" >&2
      exit 2
    fi
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q -c requirements.lock -e '.[dev,postgres]'
touch "$VENV/.installed"
echo "setup: $VENV ready" >&2
