#!/usr/bin/env bash
# Every benchmark in bench/, one after the other, in a private network namespace.
# Each prints its figures last, one per line: `name: value unit (goal ...)`.
# Usage: make bench            (all)      make bench ARGS=audio_flush   (one)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SONIC_VOICE_VENV:-$PWD/.venv}/bin/python
names=("$@")
if [ ${#names[@]} = 0 ]; then
  # mutation.py takes ~30-60 min: `make mutate` runs it.
  for f in bench/[a-z]*.py; do [ "$f" = bench/mutation.py ] || names+=("$(basename "$f" .py)"); done
fi
rc=0
for n in "${names[@]}"; do
  echo "== bench/$n.py"
  bash scripts/isolated.sh "$PY" "bench/$n.py" || { echo "bench/$n.py failed" >&2; rc=1; }
done
exit $rc
