"""The edges a robot developer meets first, through the real entry points started as a user
starts them (``python -m`` of the runner and of a node executable, in a subprocess):
signals (bounded, goals cancelled, nothing left running), configuration mistakes (one line,
exit 2, quickly), missing credentials and model access, the demo's private graph."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import wave
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from sonic_voice.emulators.sonic.server import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_SECRET_KEY,
    EmulatorThread,
)

from test.harness.ros import RosGraph, wait_for

ROOT = Path(__file__).resolve().parents[1]
RUNNER = [sys.executable, "-m", "sonic_voice.app.cli"]
SESSION = [sys.executable, "-m", "sonic_voice.nodes.sonic_session"]
# How fast a configuration mistake is reported is measured by bench/edges.py (goal 5 s on
# a quiet machine); here only a bound that catches a hang (it once waited 180 s).
CONFIG_EXIT_S = 15.0
STOP_S = 2.0  # SIGINT/SIGTERM to exit: the bound, held even on a loaded machine

FIB_TOOLS = """
tools:
  - name: count
    description: Fibonacci numbers (a long-running action).
    input: {properties: {order: {type: integer, minimum: 1}}, required: [order]}
    action:
      type: test_msgs/action/Fibonacci
      server: fibonacci
      goal: {order: {input: order}}
      result: [sequence]
"""
FIB_SCENARIO = {
    "turns": [
        {
            "on": "speech",
            "user": "count for me",
            "tool": {"name": "count", "input": {"order": 6}},
            "say": "Done.",
            "audio": "none",
        }
    ]
}


def env(tmp: Path, domain: int | None = None, aws: bool = False, **extra: str) -> dict[str, str]:
    """A user's environment: no AWS configuration (unless the stand-in's keys), its own
    ROS home, temporary directory and domain."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "PULSE_"))}
    e.update(
        AWS_CONFIG_FILE=str(tmp / "aws-none"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "aws-none"),
        AWS_EC2_METADATA_DISABLED="true",
        ROS_HOME=str(tmp / "ros"),
        ROS_LOG_DIR=str(tmp / "ros" / "log"),
        ROS_AUTOMATIC_DISCOVERY_RANGE="LOCALHOST",
        TMPDIR=str(tmp / "tmp"),
        PYTHONUNBUFFERED="1",
    )
    (tmp / "tmp").mkdir(exist_ok=True)
    if domain is not None:
        e["ROS_DOMAIN_ID"] = str(domain)
    if aws:
        e.update(AWS_ACCESS_KEY_ID=DEFAULT_ACCESS_KEY, AWS_SECRET_ACCESS_KEY=DEFAULT_SECRET_KEY)
    e.update(extra)
    return e


def leftovers(tmp: Path) -> list[str]:
    """Processes still running that belong to this run (their command line or environment
    names its temporary directory), and files left in it."""
    mark = str(tmp / "tmp").encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            envb = Path(f"/proc/{pid}/environ").read_bytes()
        except OSError:
            continue
        if mark in cmd or mark in envb:
            found.append(f"pid {pid}: {cmd.replace(b'\0', b' ').decode(errors='replace')[:120]}")
    found += [f"file {p.name}" for p in (tmp / "tmp").iterdir()]
    return found


def run_quick(cmd: list[str], e: dict[str, str]) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=e, cwd=ROOT, capture_output=True, text=True, timeout=60)
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


@pytest.fixture
def tmp(tmp_path: Path) -> Iterator[Path]:
    yield tmp_path


def _wav(path: Path, data: bytes, width: int = 2, rate: int = 16000, frames: int = 1600) -> Path:
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(width)
        w.setframerate(rate)
        w.writeframes(data if data else b"")
    return path


# --------------------------------------------------------------------------- the runner
def _bad_inputs(tmp: Path) -> list[tuple[str, list[str], str]]:
    bad_yaml = tmp / "bad.yaml"
    bad_yaml.write_text("tools:\n  - name: x\n    description: [unclosed\n")
    unknown_type = tmp / "unknown_type.yaml"
    unknown_type.write_text(
        textwrap.dedent(
            """
            tools:
              - name: go
                description: go
                action: {type: nope_msgs/action/Go, server: go}
            """
        )
    )
    missing_field = tmp / "missing_field.yaml"
    missing_field.write_text("tools:\n  - name: go\n    action: {server: go}\n")
    wrong_type = tmp / "wrong_type.yaml"
    wrong_type.write_text("/**:\n  ros__parameters:\n    max_tokens: many\n")
    bad_voice = tmp / "bad_voice.yaml"
    bad_voice.write_text("/**:\n  ros__parameters:\n    voice_id: nobody\n")
    not_wav = tmp / "not.wav"
    not_wav.write_text("hello")
    float_wav = tmp / "float.wav"
    float_wav.write_bytes(
        b"RIFF" + (36 + 8).to_bytes(4, "little") + b"WAVEfmt " + (16).to_bytes(4, "little")
        + (3).to_bytes(2, "little") + (1).to_bytes(2, "little") + (16000).to_bytes(4, "little")
        + (64000).to_bytes(4, "little") + (4).to_bytes(2, "little") + (32).to_bytes(2, "little")
        + b"data" + (8).to_bytes(4, "little") + np.zeros(2, np.float32).tobytes()
    )  # fmt: skip
    empty_wav = _wav(tmp / "empty.wav", b"")
    return [
        ("tools YAML syntax", ["--tools-file", str(bad_yaml)], "bad.yaml"),
        ("unknown interface type", ["--tools-file", str(unknown_type)], "nope_msgs"),
        ("missing required field", ["--tools-file", str(missing_field)], "missing_field.yaml"),
        ("missing tools file", ["--tools-file", str(tmp / "nope.yaml")], "nope.yaml"),
        ("invalid voice", ["--voice", "nobody"], "nobody"),
        ("invalid voice in params", ["--params-file", str(bad_voice)], "nobody"),
        ("missing params file", ["--params-file", str(tmp / "none.yaml")], "none.yaml"),
        ("wrong parameter type", ["--params-file", str(wrong_type)], "max_tokens"),
        ("not a WAV", ["--wav", str(not_wav)], "not.wav"),
        ("float WAV", ["--wav", str(float_wav)], "float.wav"),
        ("empty WAV", ["--wav", str(empty_wav)], "empty.wav"),
    ]


BAD_INPUTS = [
    "tools YAML syntax",
    "unknown interface type",
    "missing required field",
    "missing tools file",
    "invalid voice",
    "invalid voice in params",
    "missing params file",
    "wrong parameter type",
    "not a WAV",
    "float WAV",
    "empty WAV",
]


@pytest.mark.timeout(60)
@pytest.mark.parametrize("case", BAD_INPUTS)
def test_runner_refuses_bad_input_in_one_line(tmp: Path, case: str) -> None:
    cases = {name: (args, what) for name, args, what in _bad_inputs(tmp)}
    args, what = cases[case]
    code, out, took = run_quick([*RUNNER, "--offline", *args], env(tmp))
    assert code == 2, f"{case}: exit {code}\n{out[-3000:]}"
    assert took <= CONFIG_EXIT_S, f"{case}: {took:.1f} s to say so"
    assert "Traceback" not in out, out[-3000:]
    lines = [ln for ln in out.splitlines() if what in ln]
    assert lines, f"{case}: no line names {what!r}:\n{out[-2000:]}"
    assert leftovers(tmp) == []


@pytest.mark.timeout(60)
def test_runner_online_without_credentials(tmp: Path) -> None:
    code, out, took = run_quick([*RUNNER, "--online"], env(tmp))
    assert code == 2 and took <= CONFIG_EXIT_S, (code, took, out)
    assert "no AWS credentials found" in out
    assert "Traceback" not in out


@pytest.mark.timeout(60)
def test_runner_online_without_model_access(tmp: Path) -> None:
    """The service refuses the model (AccessDeniedException): one clear line, exit 2."""
    from sonic_voice.emulators.sonic.faults import Fault

    with EmulatorThread() as emu:
        emu.inject(Fault(kind="accessDenied", count=5))
        params = tmp / "online.yaml"
        params.write_text(
            "/**:\n  ros__parameters:\n"
            f"    endpoint_uri: {emu.endpoint_uri}\n    ca_bundle: {emu.ca_file}\n"
            f"    region: {emu.emulator.region}\n"
        )
        code, out, took = run_quick(
            [*RUNNER, "--online", "--no-local-audio", "--params-file", str(params)],
            env(tmp, domain=_domain(), aws=True),
        )
    assert code == 2 and took <= CONFIG_EXIT_S, (code, took, out[-3000:])
    assert "access" in out.lower(), out[-2000:]
    assert "Traceback" not in out, out[-3000:]
    assert leftovers(tmp) == []


def _domain() -> int:
    from test.harness.ros import next_domain_id

    return next_domain_id()


def _stop_runner_mid_trip(tmp: Path, sig: int) -> tuple[int, str, float]:
    proc = subprocess.Popen(
        [*RUNNER, "--offline"],
        env=env(tmp),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out: list[str] = []
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if "goal accepted" in line:
                break
        else:
            pytest.fail("the demo never sent a goal:\n" + "".join(out)[-3000:])
        time.sleep(0.5)  # driving
        t0 = time.monotonic()
        proc.send_signal(sig)
        try:
            rest, _ = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGUSR1)  # the runner prints its threads' stacks
            time.sleep(1.0)
            proc.kill()
            rest, _ = proc.communicate(timeout=10)
            pytest.fail("no exit 30 s after the signal:\n" + ("".join(out) + rest)[-12000:])
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, "".join(out) + rest, took


@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_runner_stops_on_signal_cancelling_the_trip(tmp: Path, sig: int) -> None:
    code, out, took = _stop_runner_mid_trip(tmp, sig)
    assert took <= STOP_S, f"{took:.2f} s from {signal.Signals(sig).name} to exit\n{out[-2000:]}"
    assert code == 130, (code, out[-3000:])
    # The conversation let go of the errand: the base saw the cancel, not an abort.
    assert "goal canceled" in out, out[-3000:]
    assert "Traceback" not in out and "Task exception" not in out, out[-4000:]
    assert leftovers(tmp) == []


# --------------------------------------------------------------------------- a node
@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    "args, aws, what",
    [
        ([], False, "no AWS credentials found"),
        (["-p", "max_tokens:=many"], True, "max_tokens"),
        (["-p", "voice_id:=nobody"], True, "nobody"),
        (["-p", "endpointing:=SOMETIMES"], True, "endpointing"),
        (["-p", "region:=us_east_1"], True, "not an AWS region name"),
        (["-p", "tools_file:=/nowhere/tools.yaml"], True, "/nowhere/tools.yaml"),
        (["--params-file", "/nowhere/params.yaml"], True, "/nowhere/params.yaml"),
    ],
    ids=["no-credentials", "param-type", "voice", "choice", "region", "tools-file", "params-file"],
)
def test_node_executable_refuses_bad_configuration(
    tmp: Path, args: list[str], aws: bool, what: str
) -> None:
    code, out, took = run_quick(
        [*SESSION, "--ros-args", *args], env(tmp, domain=_domain(), aws=aws)
    )
    assert code == 2, (code, out[-3000:])
    assert took <= CONFIG_EXIT_S, f"{took:.1f} s"
    assert what in out, out[-2000:]
    assert "Traceback" not in out, out[-3000:]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_node_executable_signal_cancels_running_goal(tmp: Path, sig: int) -> None:
    """``sonic_session`` as ``ros2 run`` starts it, a goal running: the signal cancels it
    (the server sees the cancel), closes the stream, and the process exits in time."""
    from std_msgs.msg import UInt8MultiArray

    from sonic_voice.ros.topics import AUDIO_QOS, MIC_TOPIC, pcm_msg

    from test.harness.servers import fibonacci_server
    from test.harness.signals import speech_like

    tools = tmp / "tools.yaml"
    tools.write_text(textwrap.dedent(FIB_TOOLS))
    scenario = tmp / "scenario.yaml"
    import yaml

    scenario.write_text(yaml.safe_dump(FIB_SCENARIO))
    graph = RosGraph()
    proc = None
    try:
        with EmulatorThread(scenario=str(scenario)) as emu:
            server = fibonacci_server(graph.node("fib_server"), mode="hold")
            probe = graph.node("probe")
            mic = probe.create_publisher(UInt8MultiArray, MIC_TOPIC, AUDIO_QOS)
            proc = subprocess.Popen(
                [
                    *SESSION,
                    "--ros-args",
                    "-p",
                    f"endpoint_uri:={emu.endpoint_uri}",
                    "-p",
                    f"ca_bundle:={emu.ca_file}",
                    "-p",
                    f"region:={emu.emulator.region}",
                    "-p",
                    f"tools_file:={tools}",
                    "-p",
                    "always_on:=true",
                ],
                env=env(tmp, domain=graph.domain_id, aws=True),
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            assert wait_for(lambda: mic.get_subscription_count() > 0, 20), "node never came up"
            assert emu.wait_for(lambda: emu.records and emu.records[0].audio_started, 20)
            rate = 16000
            audio = np.concatenate(
                [np.zeros(rate // 5, np.int16), speech_like(1.0, rate, 3), np.zeros(rate, np.int16)]
            )
            for i in range(0, len(audio) - 511, 512):
                mic.publish(pcm_msg(audio[i : i + 512]))
                time.sleep(0.004)
            assert server.goal_received.wait(20), "no goal reached the server"
            t0 = time.monotonic()
            proc.send_signal(sig)
            out, _ = proc.communicate(timeout=30)
            took = time.monotonic() - t0
            assert server.cancel_received.wait(1), "the running goal was not cancelled"
            rec = emu.records[0]
            assert emu.wait_for(lambda: rec.end_reason, 5)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        graph.close()
    assert took <= STOP_S, f"{took:.2f} s to exit\n{out[-2000:]}"
    assert proc.returncode == 0, (proc.returncode, out[-3000:])
    assert rec.end_reason == "sessionEnd", (rec.end_reason, out[-2000:])
    assert "Traceback" not in out, out[-3000:]


# --------------------------------------------------------------------------- private graph
@pytest.mark.timeout(60)
def test_demo_refuses_a_graph_where_another_base_answers(tmp: Path) -> None:
    """Without a network namespace (``SONIC_VOICE_DEMO_NETNS=0``) on a domain where a
    navigation server answers, the demo refuses to start: its goals would drive that base."""
    from test.harness.servers import navigate_server

    graph = RosGraph()
    try:
        server = navigate_server(graph.node("real_robot"))
        code, out, took = run_quick(
            [*RUNNER, "--offline", "--no-local-audio"],
            env(tmp, domain=graph.domain_id, SONIC_VOICE_DEMO_NETNS="0"),
        )
    finally:
        graph.close()
    assert code == 2, (code, out[-3000:])
    # The start check names the server; were it discovered after the check (once in a
    # fresh-clone CI run), the graph watch stops the demo instead: a refusal either way.
    assert (
        "another navigate_to_pose server answers" in out
        or "another navigate_to_pose server joined the demo's graph" in out
    ), out[-2000:]
    assert server.goals == []
    assert took <= CONFIG_EXIT_S
    assert leftovers(tmp) == []


@pytest.mark.timeout(120)
def test_demo_stops_when_a_base_joins_its_graph_later(tmp: Path) -> None:
    """The check at start is not the end of it: in a shared domain, while the demo drives
    its base, a plain node joining (``ros2 topic echo``) is only logged and the demo goes
    on; a navigation server coming up (or discovered late) stops the demo within seconds,
    exit 2 with one line naming it; the demo's own goal is cancelled and the newcomer
    gets no goal."""
    from test.harness.servers import navigate_server

    domain = _domain()
    proc = subprocess.Popen(
        [*RUNNER, "--offline"],
        env=env(tmp, domain=domain, SONIC_VOICE_DEMO_NETNS="0"),
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    out: list[str] = []

    def read_until(text: str) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if text in line:
                return
        pytest.fail(f"the demo never printed {text!r}:\n" + "".join(out)[-3000:])

    graph = None
    try:
        read_until("goal accepted")
        graph = RosGraph(domain_id=domain)
        graph.node("echo_like")
        read_until("another node in the demo's graph: /echo_like")
        time.sleep(1.0)
        assert proc.poll() is None, "".join(out)[-3000:]  # a plain node: the demo goes on
        server = navigate_server(graph.node("late_robot"))
        t0 = time.monotonic()
        rest, _ = proc.communicate(timeout=30)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if graph is not None:
            graph.close()
    text = "".join(out) + rest
    assert proc.returncode == 2, (proc.returncode, text[-3000:])
    said = "another navigate_to_pose server joined the demo's graph"
    assert said in text and "/late_robot" in text, text[-2000:]
    assert took <= 10, f"{took:.1f} s"
    assert "goal canceled" in text, text[-3000:]  # the demo's own base saw the cancel
    assert server.goals == []
    assert "Traceback" not in text, text[-3000:]
    assert leftovers(tmp) == []


def test_leftovers_sees_a_process_of_this_run(tmp: Path) -> None:
    """The orphan check above can fail: a process started with this run's TMPDIR is found."""
    e = env(tmp)
    p = subprocess.Popen(["sleep", "30"], env=e)
    try:
        # Popen returns when the exec has closed its error pipe, a moment before the
        # kernel lays out the new environment: /proc/<pid>/environ may still read empty.
        assert wait_for(lambda: any(f"pid {p.pid}" in x for x in leftovers(tmp)), 5)
    finally:
        p.kill()
        p.wait()
    tempfile.mkdtemp(dir=tmp / "tmp")
    assert any(x.startswith("file ") for x in leftovers(tmp))
