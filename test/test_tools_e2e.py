"""Tool calls end to end: the Bedrock stand-in's toolUse -> sonic_session -> a ROS action
server -> the toolResult back at the stand-in, while audio keeps flowing both ways.

Real parts throughout: the SDK over HTTP/2 to the stand-in, the session node, the YAML
tools layer, rclpy action clients and servers (test_msgs Fibonacci; Nav2's NavigateToPose
fixture served by sim_base, with the shipped config/tools.yaml and config/locations.yaml).
A microphone feeder publishes tagged 32 ms frames on ``audio/mic`` in real time all along;
the stand-in's arrival times show whether the uplink ever stalled while a tool ran.
"""

from __future__ import annotations

import math
import textwrap
import threading
import time
import warnings
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rclpy.parameter import Parameter

from sonic_voice.ros.topics import pcm_msg

from test.harness.ros import wait_for
from test.harness.signals import speech_like
from test.test_sonic_session_node import (
    FRAME,
    MIC,
    OUT_RATE,
    RATE,
    TIMEOUT,
    OutputLog,
    Probe,
    first_stream,
    frames_at,
    quiet,
    read_tag,
    session_node,
    stand_in,
    tagged,
    tags_at,
    utterance,
)

ROOT = Path(__file__).resolve().parent.parent
TOOLS_YAML = str(ROOT / "config" / "tools.yaml")
LOCATIONS_YAML = str(ROOT / "config" / "locations.yaml")
MAX_GAP_MS = 200.0

FIB_TOOLS = """
defaults: {timeout_s: 30, server_wait_s: 5}
tools:
  - name: count
    description: Fibonacci numbers (a long-running action).
    input:
      type: object
      properties: {order: {type: integer, minimum: 1, maximum: 40}}
      required: [order]
    action:
      type: test_msgs/action/Fibonacci
      server: fibonacci
      goal: {order: {input: order}}
      feedback: {fields: [sequence], every_s: 0}
      result: [sequence]
"""


@pytest.fixture
def sonic(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with stand_in(request, monkeypatch) as emu:
        yield emu


@pytest.fixture
def rig(sonic: Any, ros_graph: Any) -> tuple[Any, Any]:
    """Stand-in first, graph second: the node closes its stream before the stand-in stops."""
    return sonic, ros_graph


class MicFeeder:
    """Publishes 32 ms frames on ``audio/mic`` in real time: queued ones (``say``) first,
    tagged quiet frames otherwise, as a microphone in a quiet room would."""

    def __init__(self, probe: Probe) -> None:
        self.probe = probe
        self.queue: deque[np.ndarray] = deque()
        self.sent = 0
        self.tags: list[tuple[int, int]] = []  # in publication order
        self.times: list[int] = []  # perf_counter_ns at publication
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mic-feeder", daemon=True)

    def say(self, frames: list[np.ndarray]) -> None:
        self.queue.extend(frames)

    def start(self) -> MicFeeder:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def delivered(self, rec: Any) -> bool:
        """Wait until the stand-in has as many tagged frames as were published."""
        n = len(self.tags)
        return wait_for(lambda: len(tags_at(rec.pcm)) >= n, TIMEOUT)

    def _run(self) -> None:
        period = FRAME / RATE
        t0 = time.perf_counter()
        while not self._stop.is_set():
            frame = self.queue.popleft() if self.queue else quiet(1, MIC, 3000 + self.sent)[0]
            self.times.append(time.perf_counter_ns())
            self.probe.mic.publish(pcm_msg(frame))
            self.tags.append(read_tag(frame))
            self.sent += 1
            delay = t0 + self.sent * period - time.perf_counter()
            if delay > 0:
                self._stop.wait(delay)


def output_time(rec: Any, name: str) -> int:
    return next(t for n, t in rec.output_events if n == name)


def assert_uplink_never_stalled(
    rec: Any, feeder: MicFeeder, t_from: int, t_to: int, what: str = "the tool ran"
) -> None:
    """Frames published between ``t_from`` and ``t_to`` all reached the stand-in, and the
    session never waited on the tool.

    A session that waits on its tool holds every frame until the tool ends: the typical
    frame is late and the latest one by about the tool's run time (1.8 s and more here).
    A loaded 2-core machine instead parks the feeder, the executor or the stand-in for a
    moment: one frame took 226 ms in a full run (a flake under the old "every frame within
    200 ms" rule). So: the median frame within MAX_GAP_MS, none late by half the tool's
    run time; the latencies are reported (a warning when any frame exceeded MAX_GAP_MS)."""
    assert feeder.delivered(rec), "frames published on audio/mic never reached the stand-in"
    arrivals = {
        read_tag(f): t
        for f, t in zip(frames_at(rec.pcm), list(rec.audio_input_ns), strict=False)
        if read_tag(f) is not None
    }
    window = [(tag, t) for tag, t in zip(feeder.tags, feeder.times, strict=True)
              if t_from <= t <= t_to]  # fmt: skip
    span_s = (t_to - t_from) / 1e9
    assert len(window) >= 0.7 * span_s * RATE / FRAME, f"{len(window)} frames in {span_s:.2f} s"
    missing = [tag for tag, _ in window if tag not in arrivals]
    assert not missing, f"{len(missing)} frames published while {what} never arrived"
    late_ms = np.array([(arrivals[tag] - t) / 1e6 for tag, t in window])
    p50, p99, worst = np.percentile(late_ms, 50), np.percentile(late_ms, 99), late_ms.max()
    over = int((late_ms > MAX_GAP_MS).sum())
    figures = (
        f"uplink latency while {what} ({span_s:.1f} s, {len(window)} frames): p50 {p50:.0f} "
        f"ms, p99 {p99:.0f} ms, max {worst:.0f} ms; {over} over {MAX_GAP_MS:.0f} ms"
    )
    print(figures)
    if over:
        warnings.warn(figures, stacklevel=2)
    assert p50 <= MAX_GAP_MS, f"the uplink lagged while {what}: {figures}"
    assert worst < 500 * span_s, f"the session waited on the tool: {figures}"


@pytest.mark.scenario(
    {
        "turns": [
            {
                "on": "speech",
                "user": "count for me",
                "tool": {"name": "count", "input": {"order": 7}},
                "say": "Here is the sequence.",
                "audio": {"tone": {"freq": 350, "duration_s": 0.4}},
            }
        ]
    }
)
def test_fibonacci_tool_round_trip_while_audio_flows(rig: Any, tmp_path: Path) -> None:
    from test.harness.servers import fibonacci_server

    emu, graph = rig
    tools = tmp_path / "tools.yaml"
    tools.write_text(textwrap.dedent(FIB_TOOLS))
    server = fibonacci_server(graph.node("fib_server"), steps=12, step_s=0.15)
    out_log = OutputLog(emu)
    probe = Probe(graph)
    node = session_node(graph, emu, tools_file=str(tools))
    probe.connected(node)
    rec = first_stream(emu)
    spec = rec.prompt_start["toolConfiguration"]["tools"][0]["toolSpec"]
    assert spec["name"] == "count"
    feeder = MicFeeder(probe).start()
    try:
        feeder.say(tagged(utterance(seed=7), MIC))
        assert server.goal_received.wait(TIMEOUT)
        assert server.goals[0].order == 7
        # The downlink while the goal runs: audio the stand-in writes now reaches audio/out.
        pushed = [
            (np.full(960, 100 * (i + 1), np.int16) + np.arange(960, dtype=np.int16)).tobytes()
            for i in range(5)
        ]
        for chunk in pushed:
            emu.push_audio_output(chunk)
        assert wait_for(lambda: b"".join(pushed) in probe.out_pcm(), TIMEOUT)
        assert not server.finished.is_set(), "the tool ended before the check: make it longer"
        emu.call(emu.emulator.end_audio_output)
        # The result goes back to the stand-in, as the session's toolResult.
        assert emu.wait_for(lambda: rec.tool_results, TIMEOUT)
        result = rec.tool_results[0]
        assert result.tool_name == "count"
        assert result.tool_use_id == rec.tool_uses[0]["toolUseId"]
        assert result.parsed == {
            "status": "ok",
            "outcome": "succeeded",
            "result": {"sequence": [0, 1, 1, 2, 3, 5, 8, 13]},
        }
        assert wait_for(lambda: "Here is the sequence." in probe.finals("ASSISTANT"), TIMEOUT)
        assert wait_for(lambda: len(probe.out_pcm()) == len(out_log.pcm()), TIMEOUT)
        time.sleep(0.3)
    finally:
        feeder.stop()
    # The uplink never stalled while the tool ran (toolUse written -> toolResult read).
    assert_uplink_never_stalled(rec, feeder, output_time(rec, "toolUse"), result.t_ns)
    # Every frame the feeder published reached the stand-in, in order.
    assert feeder.delivered(rec)
    assert tags_at(rec.pcm) == feeder.tags
    # Everything the stand-in said (pushed + the turn's answer) is on audio/out, exactly.
    assert probe.out_pcm() == out_log.pcm()
    assert len(out_log.pcm()) == 5 * 1920 + int(0.4 * OUT_RATE) * 2
    # tool_events: start (with the decoded input), feedback progress, result.
    with probe.lock:
        events = [e["event"] for e in probe.tool_events]
        start = probe.tool_events[0]
        end = probe.tool_events[-1]
    assert events[0] == "start" and events[-1] == "result" and "progress" in events
    assert start["tool"] == "count" and start["input"] == {"order": 7}
    assert end["status"] == "ok" and end["result"]["result"]["sequence"][-1] == 13


def sim_base(graph: Any, **params: Any) -> Any:
    from sonic_voice.nodes.sim_base import SimBaseNode

    values = {"locations_file": LOCATIONS_YAML, "rate_hz": 50.0, **params}
    node = SimBaseNode(
        context=graph.context,
        parameter_overrides=[Parameter(k, value=v) for k, v in values.items()],
    )
    graph.add(node)
    return node


@pytest.mark.scenario(
    {
        "turns": [
            {
                "on": "speech",
                "user": "take me to the lift",
                "tool": {"name": "navigate_to", "input": {"location": "lift"}},
                "say": "Here is the lift.",
                "audio": "none",
            }
        ]
    }
)
def test_navigate_to_named_location_with_the_shipped_config(rig: Any) -> None:
    pytest.importorskip("nav2_msgs.action", reason="nav2_msgs fixture: scripts/build_interfaces.sh")
    emu, graph = rig
    base = sim_base(graph, linear_speed=5.0, angular_speed=10.0)
    probe = Probe(graph)
    node = session_node(graph, emu, tools_file=TOOLS_YAML, locations_file=LOCATIONS_YAML)
    probe.connected(node)
    rec = first_stream(emu)
    specs = {
        t["toolSpec"]["name"]: t["toolSpec"] for t in rec.prompt_start["toolConfiguration"]["tools"]
    }
    assert {"navigate_to", "stop", "turn", "go_charge"} <= set(specs)
    assert "lift" in specs["navigate_to"]["inputSchema"]["json"]  # names and aliases offered
    feeder = MicFeeder(probe).start()
    try:
        feeder.say(tagged(utterance(seed=8), MIC))
        assert emu.wait_for(lambda: rec.tool_results, 30.0)
        assert wait_for(lambda: "Here is the lift." in probe.finals("ASSISTANT"), TIMEOUT)
    finally:
        feeder.stop()
    result = rec.tool_results[0]
    assert result.tool_name == "navigate_to"
    assert result.parsed == {
        "status": "ok",
        "outcome": "succeeded",
        "result": {"error_code": 0, "error_msg": ""},
    }
    # "lift" is an alias of the elevator: the base drove there (config/locations.yaml).
    assert base.counts["succeeded"] == 1
    assert math.hypot(base.x - 6.0, base.y + 2.0) <= 0.1, (base.x, base.y)
    assert abs(base.yaw - math.radians(-90)) <= 0.1
    assert_uplink_never_stalled(rec, feeder, output_time(rec, "toolUse"), result.t_ns)


@pytest.mark.parametrize("cancel_on_barge_in", [False, True])
@pytest.mark.scenario(
    {
        # The stand-in stops waiting for the toolResult and talks while the robot drives.
        "tool_timeout_s": 0.3,
        "turns": [
            {
                "on": "speech",
                "user": "take me to the kitchen",
                "tool": {"name": "navigate_to", "input": {"location": "kitchen"}},
                "say": "On my way to the kitchen, please follow me.",
                "audio": {"tone": {"freq": 450, "duration_s": 6.0}},
            }
        ],
    },
    realtime=True,
)
def test_barge_in_flushes_speech_and_the_goal_goes_on(
    rig: Any, tmp_path: Path, cancel_on_barge_in: bool
) -> None:
    """Issue 15: the visitor's "great, thanks!" over "follow me" flushes the robot's speech
    and nothing else: the base arrives. A tool with ``cancel_on_barge_in: true`` keeps the
    old behaviour: its goal is cancelled and the base stops short."""
    pytest.importorskip("nav2_msgs.action", reason="nav2_msgs fixture: scripts/build_interfaces.sh")
    emu, graph = rig
    tools = TOOLS_YAML
    if cancel_on_barge_in:
        text = Path(TOOLS_YAML).read_text()
        marker = "  - name: navigate_to\n"
        assert marker in text
        tools = str(tmp_path / "tools.yaml")
        Path(tools).write_text(text.replace(marker, marker + "    cancel_on_barge_in: true\n"))
        (tmp_path / "knowledge").symlink_to(Path(TOOLS_YAML).parent / "knowledge")
    base = sim_base(graph, linear_speed=1.0)  # the kitchen is ~6 s away
    probe = Probe(graph)
    node = session_node(graph, emu, tools_file=tools, locations_file=LOCATIONS_YAML)
    probe.connected(node)
    rec = first_stream(emu)
    feeder = MicFeeder(probe).start()
    try:
        feeder.say(tagged(utterance(seed=9), MIC))
        assert wait_for(lambda: base._run is not None, TIMEOUT), "no goal reached the base"
        assert wait_for(lambda: len(probe.out_pcm()) > OUT_RATE, TIMEOUT)  # > 0.5 s spoken
        assert base.counts["canceled"] == 0 and base._run is not None
        feeder.say(tagged(speech_like(0.8, RATE, seed=10), MIC, 2000))  # "great, thanks!"
        assert wait_for(lambda: probe.flushes, TIMEOUT)
        done = "canceled" if cancel_on_barge_in else "succeeded"
        assert wait_for(lambda: base.counts[done] == 1, 30.0), base.counts
        assert emu.wait_for(lambda: rec.tool_results, TIMEOUT)
    finally:
        feeder.stop()
    assert rec.barge_ins == 1 and len(probe.flushes) == 1
    assert base.v == 0.0 and base.w == 0.0
    status = rec.tool_results[0].parsed["status"]
    with probe.lock:
        end = [e for e in probe.tool_events if e["event"] == "result"]
    assert end and end[0]["tool"] == "navigate_to" and end[0]["status"] == status
    if cancel_on_barge_in:
        # The base stopped where it was, short of the kitchen.
        assert math.hypot(base.x - 4.0, base.y - 2.5) > 1.0
        assert base.counts["succeeded"] == 0 and status == "cancelled"
        assert "barge-in" in rec.tool_results[0].parsed["error"]
    else:
        assert math.hypot(base.x - 4.0, base.y - 2.5) <= 0.1, (base.x, base.y)
        assert base.counts["canceled"] == 0 and status == "ok"
