"""The README's main job: ``sonic-voice`` with no AWS configuration runs the offline demo
conversation end to end (its own virtual devices, stand-in, simulated base) and exits 0."""

from __future__ import annotations

import math
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
    going = out.index("robot  : ¡Claro! Te llevo a la cafetería")
    # ... on the way the visitor talked and the robot answered, still driving (issue 15) ...
    asked = out.index("visitor: Gracias. ¿Es lejos?")
    answered = out.index("robot  : No, está muy cerca")
    # ... until "¡para!": the stop tool cancelled the goal, and the robot said so.
    stop = out.index("visitor: ¡Para!")
    stopped = re.search(r"tool   : navigate_to -> cancelled .*the stop tool", out)
    assert stopped, out[-3000:]
    assert re.search(r"tool   : stop -> ok .*\"cancelled_calls\": 1", out), out[-3000:]
    said = out.index("robot  : Vale, me detengo aquí.")
    assert going < asked < answered < stop < stopped.start() < said
    assert "tool   : navigate_to -> ok" not in out
    # The base drove part of the way and stopped short of the kitchen (4.0, 2.5 in
    # config/locations.yaml): the visitor's question did not stop it, "¡para!" did.
    m = re.search(r"base at \(([-\d.]+), ([-\d.]+)\), drove ([\d.]+) m", out)
    assert m, out[-2000:]
    x, y, dist = map(float, m.groups())
    assert dist > 1.0 and math.hypot(x - 4.0, y - 2.5) > 0.5, (x, y, dist)
    # The knowledge question was answered in Spanish after that.
    assert "robot   [es]: La cafetería abre de lunes a viernes" in out
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
