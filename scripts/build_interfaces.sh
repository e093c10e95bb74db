#!/usr/bin/env bash
# Build the interface fixtures (fixtures/nav2_msgs: Nav2's NavigateToPose action, which is
# not on PyPI) with CMake from the PyPI rosidl wheels and install them into the venv prefix,
# so `import nav2_msgs.action` works with no extra environment.
#
# Cached: the installed build carries a stamp (hash of the fixture sources, this script and
# the interpreter); when it matches, nothing is rebuilt (a second run takes ~0 s).
# Called from scripts/setup.sh; run it by hand with: bash scripts/build_interfaces.sh
# Set SONIC_VOICE_REBUILD_INTERFACES=1 to force a rebuild.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${SONIC_VOICE_VENV:-$ROOT/.venv}
PY=$VENV/bin/python
PKGS=(nav2_msgs)

# One build at a time (several shells may run setup.sh at once).
exec 9>"$VENV/.build_interfaces.lock"
flock 9

sources_hash() {
  # Everything that decides the build's output: fixture sources, this script, Python.
  { find "fixtures/$1" -type f -print0 | sort -z | xargs -0 sha256sum
    sha256sum < "$ROOT/scripts/build_interfaces.sh"
    "$PY" -c 'import sys; print(sys.version)'
  } | sha256sum | cut -d' ' -f1
}

# The PyPI wheels were built under manylinux: their exported CMake files name that
# interpreter's include dirs (/opt/python/cp312-cp312/...). Point them at this venv's.
fix_cmake_paths() {
  local inc npinc
  inc=$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
  npinc=$("$PY" -c 'import numpy; print(numpy.get_include())')
  { grep -rlZ --include='*.cmake' '/opt/python/cp312-cp312' "$VENV/share" 2>/dev/null || true; } \
    | xargs -0 -r sed -i \
        -e "s#/opt/python/cp312-cp312/lib/python3.12/site-packages/numpy/_core/include#$npinc#g" \
        -e "s#/opt/python/cp312-cp312/include/python3.12#$inc#g"
}

for pkg in "${PKGS[@]}"; do
  want=$(sources_hash "$pkg")
  stamp=$VENV/share/$pkg/.sonic_voice-build.sha256
  if [ -z "${SONIC_VOICE_REBUILD_INTERFACES:-}" ] && [ "$(cat "$stamp" 2>/dev/null)" = "$want" ]; then
    continue
  fi
  if [ ! -d "$VENV/share/rosidl_default_generators" ]; then
    echo "build_interfaces: rosidl build wheels missing in $VENV (pip install -r requirements.lock)" >&2
    exit 1
  fi
  echo "build_interfaces: building $pkg into $VENV"
  fix_cmake_paths
  build=$(mktemp -d "${TMPDIR:-/tmp}/sv-build-$pkg.XXXXXX")
  trap 'rm -rf "$build"' EXIT
  # PATH first: rosidl generators run the venv's python; the prefix path finds the
  # ament/rosidl CMake packages the wheels install under $VENV/share.
  PATH="$VENV/bin:$PATH" cmake -S "fixtures/$pkg" -B "$build" -G "Unix Makefiles" \
    -DCMAKE_BUILD_TYPE=Release \
    -DCMAKE_INSTALL_PREFIX="$VENV" \
    -DCMAKE_PREFIX_PATH="$VENV" \
    -DPython3_EXECUTABLE="$PY" \
    -DPython3_FIND_VIRTUALENV=ONLY \
    -DBUILD_TESTING=OFF >"$build/configure.log" 2>&1 \
    || { cat "$build/configure.log" >&2; exit 1; }
  PATH="$VENV/bin:$PATH" cmake --build "$build" -j "$(nproc)" >"$build/build.log" 2>&1 \
    || { tail -50 "$build/build.log" >&2; exit 1; }
  cmake --install "$build" >"$build/install.log" 2>&1 \
    || { tail -50 "$build/install.log" >&2; exit 1; }
  "$PY" -c "import importlib; m = importlib.import_module('$pkg.action'); print('build_interfaces: $pkg OK:', [n for n in dir(m) if not n.startswith('_')])"
  echo "$want" > "$stamp"
  rm -rf "$build"
  trap - EXIT
done
