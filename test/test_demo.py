"""The README's main job: ``sonic-voice`` with no AWS configuration runs the offline demo
conversation end to end (its own virtual devices, stand-in, simulated base) and exits 0."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from sonic_voice.app.demo import guess_language

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(sys.executable).with_name("sonic-voice")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    for var in list(env):
        if var.startswith(("AWS_", "PULSE_")):
            env.pop(var)
    home = tempfile.mkdtemp(prefix="sv-demo-home-")
    # No AWS configuration at all: the runner must choose offline by itself.
    env.update(
        AWS_CONFIG_FILE=os.path.join(home, "none"),
        AWS_SHARED_CREDENTIALS_FILE=os.path.join(home, "none"),
        AWS_EC2_METADATA_DISABLED="true",
        ROS_HOME=home,
        ROS_LOG_DIR=os.path.join(home, "log"),
        ROS_DOMAIN_ID=str(100 + os.getpid() % 100),
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
    )
    return env


@pytest.mark.timeout(240)
@pytest.mark.skipif(not shutil.which("espeak-ng"), reason="espeak-ng gives the visitor a voice")
def test_offline_demo_runs_the_whole_conversation() -> None:
    assert RUNNER.exists(), f"{RUNNER} missing: run scripts/setup.sh"
    proc = subprocess.run(
        [str(RUNNER)],
        env=_env(),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=220,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out[-4000:]}\n{proc.stderr[-3000:]}"
    assert "offline demo: no AWS configuration" in out
    # The robot waited idle (no Bedrock stream); the visitor's hello engaged it (the
    # stand-in heard the utterance from its start) and the robot introduced itself.
    idle = out.index("robot idle: no Bedrock stream")
    assert idle < out.index("visitor: Hello!") < out.index("robot  : Hello! I am the help robot")
    # The visitor asked in Spanish; the tool was called with the named place...
    assert re.search(r"visitor: Hola, ¿me puedes llevar a la cafetería", out)
    assert re.search(r'tool   : navigate_to \{"location": "kitchen"\}', out)
    assert re.search(r"tool   : navigate_to -> ok .*\"error_code\": 0", out)
    # ... the base drove there (kitchen is at (4.0, 2.5) in config/locations.yaml) ...
    m = re.search(r"base at \(([-\d.]+), ([-\d.]+)\), drove ([\d.]+) m", out)
    assert m, out[-2000:]
    x, y, dist = map(float, m.groups())
    assert abs(x - 4.0) < 0.1 and abs(y - 2.5) < 0.1 and dist > 4.0
    # ... and the robot said it was going and reported the arrival in Spanish, in that order.
    going = out.index("robot  : ¡Claro! Te llevo a la cafetería")
    arrived = out.index("robot  : Ya hemos llegado a la cafetería")
    assert going < out.index("tool   : navigate_to -> ok") < arrived
    assert "robot   [es]: Ya hemos llegado" in out
    # Nobody spoke any more: released, and the summary says what it streamed and cost.
    assert re.search(r"conversation released after \d+ s without speech", out), out[-2000:]
    m = re.search(r"cost: 1 conversation\(s\), ([\d.]+) s streamed, (\d+) input", out)
    assert m and float(m[1]) > 5 and int(m[2]) > 0, out[-2000:]
    assert "demo completed" in out
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def test_language_guess_used_by_the_summary() -> None:
    assert guess_language("Ya hemos llegado a la cafetería") == "es"
    assert guess_language("Hello! How can I help you?") == "en"
    assert guess_language("12345") == ""
