#!/usr/bin/env bash
# Every benchmark in bench/, one after the other, in a private network namespace.
# Each prints its figures last, one per line: `name: value unit (goal ...)`; the latency
# benchmarks measure quiet and under the standard background load (bench/_common.py) and
# print both (`name`, `name_loaded`). On a machine shared with others the figures are
# noisy (each prints the load average it ran under): rerun at a quiet moment.
# Usage: make bench            (all)      make bench ARGS=audio_flush   (one)
#        BENCH_ARGS="--load off" make bench ARGS=sonic_latency   (options for each one run)
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
  # shellcheck disable=SC2086  # BENCH_ARGS is split on purpose
  bash scripts/isolated.sh "$PY" "bench/$n.py" ${BENCH_ARGS:-} || { echo "bench/$n.py failed" >&2; rc=1; }
done
exit $rc
