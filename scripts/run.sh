#!/usr/bin/env bash
# The main job: set-up, then the stack. Extra arguments go to the runner.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${SONIC_VOICE_VENV:-$PWD/.venv}
exec "$VENV/bin/sonic-voice" "$@"
