#!/usr/bin/env bash
# The test command: set-up, ruff, then the whole test suite inside a private network
# namespace (scripts/isolated.sh), so no packet can leave the machine whatever a test does.
# Extra arguments go to pytest (e.g. `make test ARGS="-k audio"`).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${SONIC_VOICE_VENV:-$PWD/.venv}
export PATH="$VENV/bin:$PATH"
ruff check .
ruff format --check . >/dev/null || { echo "ruff format: files need formatting (run 'make format')" >&2; exit 1; }
set +e
bash scripts/isolated.sh python -m pytest "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then echo "test: pytest collected no tests; that is a failure" >&2; exit 1; fi
exit "$rc"
