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
# uv (pinned) installs the locked packages in parallel: on a fresh machine pip took about 90 s
# of `make demo`'s set-up. Where uv cannot be had or fails, pip installs the same lock.
# --native-tls: the system's certificate store, as pip uses (a registry mirror may need it).
UV_VERSION=0.13.10
if "$VENV/bin/python" -m pip install -q --disable-pip-version-check "uv==$UV_VERSION" &&
  "$VENV/bin/uv" pip install -q --native-tls --python "$VENV/bin/python" \
    -c requirements.lock -e '.[dev,postgres]'; then
  :
else
  echo "setup: uv $UV_VERSION could not install the lock; installing with pip" >&2
  "$VENV/bin/python" -m pip install -q --upgrade pip
  "$VENV/bin/python" -m pip install -q -c requirements.lock -e '.[dev,postgres]'
fi
touch "$VENV/.installed"
echo "setup: $VENV ready" >&2
