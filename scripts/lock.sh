#!/usr/bin/env bash
# Regenerate requirements.lock from the current .venv (after adding a dependency there).
# ROS 2 wheels install a second distribution name for each package (ros-rclpy also
# registers "rclpy"); only the ros-* names exist on the index, so the aliases are dropped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${SONIC_VOICE_VENV:-$PWD/.venv}/bin/python
"$PY" - <<'PY'
import re, subprocess, sys
lines = subprocess.run([sys.executable, "-m", "pip", "freeze", "--exclude-editable"],
                       capture_output=True, text=True, check=True).stdout.split("\n")
norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
names = {norm(l.split("==")[0]) for l in lines if "==" in l}
keep = [l for l in lines if "==" in l and f"ros-{norm(l.split('==')[0])}" not in names]
with open("requirements.lock", "w") as f:
    f.write("# Exact pins for every Python dependency (ROS 2 Kilted wheels, AWS SDKs, WebRTC,\n"
            "# audio, test tools). Regenerate with scripts/lock.sh after changing the venv.\n")
    f.write("\n".join(sorted(keep, key=str.lower)) + "\n")
print(f"requirements.lock: {len(keep)} pins")
PY
