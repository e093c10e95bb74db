"""Edges as a user meets them, timed: how long the runner and a node executable take to
say "fix this" (exit 2) for a bad input, and to stop on SIGINT with a running trip.

    .venv/bin/python bench/edges.py [--runs 3]

t0: the process is started (config errors) or the signal is sent (stop); t1: it exited.
Goals (issue 10): a configuration mistake reported within 5 s; SIGINT/SIGTERM to exit
within 2 s. test/test_entry_points.py checks what is said and that nothing is left
running; this measures how fast.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common

_common.isolate()
_common.setup_path()

RUNNER = [sys.executable, "-m", "sonic_voice.app.cli"]
SESSION = [sys.executable, "-m", "sonic_voice.nodes.sonic_session"]


def _env(tmp: Path) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PULSE_"))}
    e.update(
        AWS_CONFIG_FILE=str(tmp / "none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "none"),
        AWS_EC2_METADATA_DISABLED="true",
        ROS_HOME=str(tmp / "ros"),
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        ROS_DOMAIN_ID=str(150 + os.getpid() % 50),
        PYTHONUNBUFFERED="1",
    )
    return e


def time_exit(cmd: list[str], env: dict[str, str]) -> tuple[float, int]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, timeout=120)
    return time.monotonic() - t0, proc.returncode


def time_stop(env: dict[str, str]) -> float:
    proc = subprocess.Popen(
        [*RUNNER, "--offline"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    for line in proc.stdout:
        if "goal accepted" in line:
            break
    time.sleep(0.5)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    return time.monotonic() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="sv-bench-edges-"))
    env = _env(tmp)
    bad_voice = tmp / "voice.yaml"
    bad_voice.write_text("/**:\n  ros__parameters:\n    voice_id: nobody\n")
    bad_tools = tmp / "tools.yaml"
    bad_tools.write_text("tools: [\n")
    cases = {
        "runner_bad_tools_yaml": [*RUNNER, "--offline", "--tools-file", str(bad_tools)],
        "runner_bad_voice_in_params": [*RUNNER, "--offline", "--params-file", str(bad_voice)],
        "runner_online_no_credentials": [*RUNNER, "--online"],
        "node_no_credentials": [*SESSION],
    }
    results: dict[str, list[float]] = {}
    for name, cmd in cases.items():
        for _ in range(args.runs):
            took, code = time_exit(cmd, env)
            assert code == 2, f"{name}: exit {code}"
            results.setdefault(name, []).append(took)
    stops = [time_stop(env) for _ in range(max(1, args.runs // 2))]
    for name, values in results.items():
        _common.figure(f"{name}_exit_p50", _common.pct(values, 50), "s", "<= 5 s")
        _common.figure(f"{name}_exit_max", max(values), "s", "<= 5 s")
    _common.figure("runner_sigint_mid_trip_to_exit_p50", _common.pct(stops, 50), "s", "<= 2 s")
    _common.figure("runner_sigint_mid_trip_to_exit_max", max(stops), "s", "<= 2 s")


if __name__ == "__main__":
    main()
