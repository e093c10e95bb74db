#!/usr/bin/env bash
# The test command: set-up, then ruff and the whole test suite.
# As root the suite runs inside a private network namespace (only 'lo', plus 127.0.0.2 for
# aiortc), so no packet can leave the machine whatever a test does.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -n "${SONIC_VOICE_NETNS:-}" ] || bash scripts/setup.sh
VENV=${SONIC_VOICE_VENV:-$PWD/.venv}
export PATH="$VENV/bin:$PATH"
if [ -z "${SONIC_VOICE_NETNS:-}" ]; then
  ruff check .
  ruff format --check . >/dev/null || { echo "ruff format: files need formatting (run 'ruff format .')" >&2; exit 1; }
fi
run_suite() {
  set +e
  python -m pytest "$@"
  rc=$?
  set -e
  if [ "$rc" = 5 ]; then echo "test: pytest collected no tests: failing" >&2; exit 1; fi
  exit "$rc"
}
if [ -z "${SONIC_VOICE_NETNS:-}" ]; then
  # root: a plain network namespace; others: a user namespace too, where the kernel allows it.
  if [ "$(id -u)" = 0 ]; then ns=(unshare -n); else ns=(unshare -rn); fi
  if ! "${ns[@]}" true 2>/dev/null; then
    echo "test: cannot make a private network namespace; relying on ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST" >&2
    export SONIC_VOICE_NETNS=0
    run_suite "$@"
  fi
  exec "${ns[@]}" env SONIC_VOICE_NETNS=1 bash -c '
    set -e
    ip link set lo up
    ip addr add 127.0.0.2/8 dev lo
    exec bash scripts/test.sh "$@"' test "$@"
fi
run_suite "$@"
