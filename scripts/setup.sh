#!/usr/bin/env bash
# One-time (idempotent) set-up: Debian packages, a Python 3.12 venv in .venv with the
# exact pins of requirements.lock, and this package installed editable.
# A second run only compares stamps and returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${SONIC_VOICE_VENV:-$ROOT/.venv}

# Debian packages the tests and the run command need (audio devices, namespaces, speech,
# and Debian's chromium for the browser viewer test).
APT_PKGS=(libportaudio2 libopus0 pulseaudio pulseaudio-utils libasound2-plugins iproute2 util-linux
          espeak-ng sox make cmake g++ chromium nftables coturn)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    # coturn is for the NAT tests only (each starts its own, inside private namespaces).
    # Debian enables and starts its system service on install: a relay on every interface.
    if [[ " ${missing[*]} " == *" coturn "* ]] && command -v systemctl >/dev/null; then
      systemctl disable --now coturn.service >/dev/null 2>&1 || true
    fi
  else
    echo "setup: missing Debian packages; run:" >&2
    echo "  sudo apt-get update && sudo apt-get install -y ${missing[*]}" >&2
    if [[ " ${missing[*]} " == *" coturn "* ]]; then
      echo "  sudo systemctl disable --now coturn.service   # the tests start their own" >&2
    fi
    exit 1
  fi
fi

# Python 3.12: on PATH, or under pyenv.
find_python() {
  local c
  for c in "${PYTHON:-}" python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12; do
    [ -n "$c" ] || continue
    if command -v "$c" >/dev/null 2>&1 && "$c" -c 'import sys, venv; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
      command -v "$c"; return 0
    fi
  done
  return 1
}
if [ ! -x "$VENV/bin/python" ]; then
  if ! PY=$(find_python); then
    echo "setup: Python 3.12 not found. Install it (Debian/Ubuntu: 'apt-get install python3.12 python3.12-venv'," >&2
    echo "       or 'pyenv install 3.12'), or point PYTHON=/path/to/python3.12 at one." >&2
    exit 1
  fi
  echo "setup: creating $VENV with $PY"
  "$PY" -m venv "$VENV"
fi

# Python dependencies: exact pins, reinstalled only when the lock file changes.
stamp="$VENV/.sonic_voice-lock.sha256"
want=$(cat requirements.lock setup.py | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "setup: installing Python dependencies from requirements.lock (about a minute)"
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements.lock
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
  echo "$want" > "$stamp"
fi

# Interface fixtures (nav2_msgs' NavigateToPose for the tools tests and the offline demo's
# simulated base): built with CMake into the venv, cached by a stamp of their sources.
bash "$ROOT/scripts/build_interfaces.sh"
