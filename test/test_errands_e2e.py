"""Barge-in interrupts speech, not errands (issue 15), end to end on a real graph.

Real parts: the SDK over HTTP/2 to the Bedrock stand-in, the sonic_session node with the
shipped config/tools.yaml, the simulated base (``SimBaseNode``, a NavigateToPose server
that drives) or a Fibonacci action server, and a microphone feeder publishing 32 ms frames
in real time. Tool calls in these scenarios are asynchronous (``wait: false``): the
stand-in, like Nova 2 Sonic, goes on talking while a tool runs and answers its result when
it comes (an ``on: tool_result`` turn, or an ``on: text`` turn for a result sent as text
after a rotation).

- speech during navigation (and a second tool) does not cancel the goal: the base arrives;
- the stop tool cancels it (the base sees the cancel within a generous bound of the
  toolUse here; bench/tool_latency.py measures it);
- a result that lands during a barge-in is held until the visitor's turn is over, then
  reaches the stand-in and is answered; one that lands after a rotation goes to the new
  stream as text and is answered there;
- the local safety stop (topic or Trigger service) cancels motion with no model involved.
"""

from __future__ import annotations

import math
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from test.harness.ros import wait_for
from test.harness.signals import speech_like
from test.test_sonic_session_node import (
    MIC,
    OUT_RATE,
    RATE,
    TIMEOUT,
    Probe,
    first_stream,
    session_node,
    stand_in,
    tagged,
    utterance,
)
from test.test_tools_e2e import (
    FIB_TOOLS,
    LOCATIONS_YAML,
    TOOLS_YAML,
    MicFeeder,
    sim_base,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sonic(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Any:
    with stand_in(request, monkeypatch) as emu:
        yield emu


@pytest.fixture
def rig(sonic: Any, ros_graph: Any) -> tuple[Any, Any]:
    """Stand-in first, graph second: the node closes its stream before the stand-in stops."""
    return sonic, ros_graph


NAV_TOOLS = {"tools_file": TOOLS_YAML, "locations_file": LOCATIONS_YAML}


def _nav() -> None:
    pytest.importorskip("nav2_msgs.action", reason="nav2_msgs fixture: scripts/build_interfaces.sh")


def _results(rec: Any, name: str) -> list[Any]:
    return [r for r in rec.tool_results if r.tool_name == name]


def _watch_cancels(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """perf_counter_ns of each cancel request the simulated base's server takes."""
    from sonic_voice.nodes.sim_base import SimBaseNode

    seen: list[int] = []
    original = SimBaseNode._on_cancel

    def on_cancel(self: Any, handle: Any) -> Any:
        seen.append(time.perf_counter_ns())
        return original(self, handle)

    monkeypatch.setattr(SimBaseNode, "_on_cancel", on_cancel)
    return seen


NAVIGATE_ASYNC = {
    "on": "speech",
    "user": "take me to the kitchen",
    "tool": {"name": "navigate_to", "input": {"location": "kitchen"}, "wait": False},
    "say": "Follow me, please.",
    "audio": "none",
}


@pytest.mark.scenario(
    {
        "turns": [
            NAVIGATE_ASYNC,
            {
                "on": "speech",
                "user": "what time does the cafeteria open?",
                "tool": {"name": "knowledge", "input": {"query": "cafeteria opening hours"}},
                "say": "It opens at eight.",
                "audio": "none",
            },
            {
                "on": "tool_result",
                "match": "navigate_to",
                "say": "Here is the kitchen.",
                "audio": {"tone": {"freq": 500, "duration_s": 0.3}},
            },
        ]
    }
)
def test_talk_and_a_second_tool_while_the_base_drives_then_it_arrives(rig: Any) -> None:
    _nav()
    emu, graph = rig
    base = sim_base(graph, linear_speed=1.0, angular_speed=3.0)
    probe = Probe(graph)
    node = session_node(graph, emu, **NAV_TOOLS)
    probe.connected(node)
    rec = first_stream(emu)
    feeder = MicFeeder(probe).start()
    try:
        feeder.say(tagged(utterance(seed=21), MIC))
        assert wait_for(lambda: base._run is not None, TIMEOUT), "no goal reached the base"
        feeder.say(tagged(utterance(seed=22), MIC, 1000))  # a question while driving
        assert emu.wait_for(lambda: _results(rec, "knowledge"), TIMEOUT)
        # The second tool finished while the first still ran: the base is on its way.
        assert base._run is not None and base.counts["succeeded"] == 0
        assert not _results(rec, "navigate_to")
        assert "It opens at eight." in wait_and_finals(probe, "It opens at eight.")
        assert emu.wait_for(lambda: _results(rec, "navigate_to"), 30.0)
        assert wait_for(lambda: "Here is the kitchen." in probe.finals("ASSISTANT"), TIMEOUT)
    finally:
        feeder.stop()
    knowledge = _results(rec, "knowledge")[0].parsed
    assert knowledge["status"] == "ok", knowledge
    nav = _results(rec, "navigate_to")[0]
    assert nav.parsed["status"] == "ok" and nav.parsed["outcome"] == "succeeded"
    assert base.counts == {"succeeded": 1, "canceled": 0, "aborted": 0, "rejected": 0}
    assert math.hypot(base.x - 4.0, base.y - 2.5) <= 0.1, (base.x, base.y)
    # The first tool's progress reached the session while it ran.
    with probe.lock:
        progress = [e for e in probe.tool_events
                    if e["event"] == "progress" and e["tool"] == "navigate_to"]  # fmt: skip
    assert progress and "distance_remaining" in progress[0]["data"]["feedback"]
    assert rec.tool_results.index(_results(rec, "knowledge")[0]) < rec.tool_results.index(nav)


def spoken_after(probe: Probe, t_ns: int) -> int:
    """Bytes of audio/out that reached the probe after ``t_ns`` (perf_counter_ns)."""
    with probe.lock:
        return sum(len(d) for d, t in probe.out if t > t_ns)


def wait_and_finals(probe: Probe, text: str) -> list[str]:
    wait_for(lambda: text in probe.finals("ASSISTANT"), TIMEOUT)
    return probe.finals("ASSISTANT")


@pytest.mark.scenario(
    {
        "turns": [
            NAVIGATE_ASYNC,
            {
                "on": "speech",
                "user": "¡para!",
                "tool": {"name": "stop", "input": {}},
                "say": "Vale, me detengo.",
                "audio": "none",
            },
        ]
    }
)
def test_the_stop_tool_cancels_the_goal_at_once(rig: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    _nav()
    emu, graph = rig
    cancels = _watch_cancels(monkeypatch)
    base = sim_base(graph)  # 0.5 m/s: the kitchen is ~10 s away
    probe = Probe(graph)
    node = session_node(graph, emu, **NAV_TOOLS)
    probe.connected(node)
    rec = first_stream(emu)
    specs = {t["toolSpec"]["name"]: t["toolSpec"]["description"]
             for t in rec.prompt_start["toolConfiguration"]["tools"]}  # fmt: skip
    assert all(w in specs["stop"] for w in ("stop", "wait", "never mind", "any language"))
    feeder = MicFeeder(probe).start()
    try:
        feeder.say(tagged(utterance(seed=23), MIC))
        assert wait_for(lambda: base._run is not None, TIMEOUT), "no goal reached the base"
        time.sleep(1.0)
        feeder.say(tagged(utterance(0.5, seed=24), MIC, 1000))  # "¡para!"
        assert emu.wait_for(lambda: _results(rec, "stop"), TIMEOUT)
        assert wait_for(lambda: base.counts["canceled"] == 1, TIMEOUT), base.counts
        assert wait_for(lambda: "Vale, me detengo." in probe.finals("ASSISTANT"), TIMEOUT)
    finally:
        feeder.stop()
    stop_use = next(u for u in rec.tool_uses if u["name"] == "stop")
    t_use = [t for n, t in rec.output_events if n == "toolUse"][1]
    assert len(cancels) == 1
    took_ms = (cancels[0] - t_use) / 1e6
    assert 0 < took_ms < 1000, f"the base saw the cancel {took_ms:.0f} ms after the toolUse"
    stop = _results(rec, "stop")[0]
    assert stop.tool_use_id == stop_use["toolUseId"]
    assert stop.parsed == {"status": "ok", "outcome": "stopped", "cancelled_calls": 1,
                           "message": "Stopped 1 running task(s)."}  # fmt: skip
    nav = _results(rec, "navigate_to")[0].parsed
    assert nav["status"] == "cancelled" and "the stop tool" in nav["error"], nav
    assert nav.get("cancel_accepted") is True, nav
    assert base.v == 0.0 and base.w == 0.0 and base.counts["succeeded"] == 0
    assert math.hypot(base.x - 4.0, base.y - 2.5) > 1.0


COUNT_ASYNC = {
    "on": "speech",
    "user": "count for me",
    "tool": {"name": "count", "input": {"order": 9}, "wait": False},
}


@pytest.mark.scenario(
    {
        "turns": [
            {
                **COUNT_ASYNC,
                "say": "I am counting now, this takes a moment, bear with me please.",
                "audio": {"tone": {"freq": 450, "duration_s": 6.0}},
            },
            {
                "on": "speech",
                "user": "how long will it take?",
                "say": "Almost done.",
                "audio": {"tone": {"freq": 300, "duration_s": 0.4}},
            },
            {
                "on": "tool_result",
                "match": "count",
                "say": "The count is done.",
                "audio": {"tone": {"freq": 600, "duration_s": 0.4}},
            },
        ]
    },
    realtime=True,
)
def test_a_result_during_a_barge_in_waits_for_the_turn_then_is_answered(
    rig: Any, tmp_path: Path
) -> None:
    from test.harness.servers import fibonacci_server

    emu, graph = rig
    tools = tmp_path / "tools.yaml"
    tools.write_text(textwrap.dedent(FIB_TOOLS))
    server = fibonacci_server(graph.node("fib_server"), steps=10, step_s=0.3)  # ~3 s
    probe = Probe(graph)
    node = session_node(graph, emu, tools_file=str(tools))
    probe.connected(node)
    rec = first_stream(emu)
    feeder = MicFeeder(probe).start()
    try:
        feeder.say(tagged(utterance(seed=25), MIC))
        assert server.goal_received.wait(TIMEOUT)
        assert wait_for(lambda: len(probe.out_pcm()) > OUT_RATE, TIMEOUT)  # > 0.5 s spoken
        # The visitor talks over the robot for 3 s: the result lands meanwhile.
        talk = tagged(speech_like(3.0, RATE, seed=26), MIC, 2000)
        feeder.say(talk)
        assert wait_for(lambda: probe.flushes, TIMEOUT)
        assert server.finished.wait(TIMEOUT)
        assert emu.wait_for(lambda: _results(rec, "count"), TIMEOUT)
        assert wait_for(lambda: "The count is done." in probe.finals("ASSISTANT"), TIMEOUT)
    finally:
        feeder.stop()
    assert rec.barge_ins == 1 and len(probe.flushes) == 1
    result = _results(rec, "count")[0]
    assert result.parsed["status"] == "ok", result.parsed  # a barge-in did not cancel it
    # Held while the visitor talked: it reached the stand-in after their last loud frame.
    last_talk = max(t for tag, t in zip(feeder.tags, feeder.times, strict=True)
                    if tag[0] == MIC and 2000 <= tag[1] < 2000 + len(talk))  # fmt: skip
    assert result.t_ns > last_talk, "the result was sent while the visitor was talking"
    assert node.session is not None and node.session.results_held == 1
    # ... and answered after the visitor's turn: the scenario's turns fired in order.
    assert rec.turns_fired == [0, 1, 2], rec.turns_fired
    finals = probe.finals("ASSISTANT")
    assert finals.index("Almost done.") < finals.index("The count is done.")
    # ... and spoken: the answer's audio (0.4 s) reached audio/out after the result.
    assert wait_for(lambda: spoken_after(probe, result.t_ns) >= 0.4 * OUT_RATE * 2, TIMEOUT)


@pytest.mark.scenario(
    {
        "turns": [
            {**COUNT_ASYNC, "say": "Counting.", "audio": "none"},
            {
                "on": "text",
                "match": "Result of the earlier count",
                "say": "The count is done.",
                "audio": {"tone": {"freq": 600, "duration_s": 0.3}},
            },
        ]
    }
)
def test_a_result_after_a_rotation_is_heard_on_the_new_stream(rig: Any, tmp_path: Path) -> None:
    from test.harness.servers import fibonacci_server

    emu, graph = rig
    tools = tmp_path / "tools.yaml"
    tools.write_text(textwrap.dedent(FIB_TOOLS))
    server = fibonacci_server(graph.node("fib_server"), steps=10, step_s=0.3)
    probe = Probe(graph)
    node = session_node(graph, emu, tools_file=str(tools))
    probe.connected(node)
    rec = first_stream(emu)
    feeder = MicFeeder(probe).start()
    try:
        feeder.say(tagged(utterance(seed=27), MIC))
        assert server.goal_received.wait(TIMEOUT)
        assert wait_for(lambda: "Counting." in probe.finals("ASSISTANT"), TIMEOUT)
        session = node.session
        node.bridge.submit(session.rotate()).result(TIMEOUT)
        assert session.rotations == 1 and not server.finished.is_set(), "rotate sooner"
        assert emu.wait_for(lambda: len(emu.records) == 2 and emu.records[1].audio_started, 10)
        assert server.finished.wait(TIMEOUT)
        assert wait_for(lambda: "The count is done." in probe.finals("ASSISTANT"), TIMEOUT)
    finally:
        feeder.stop()
    new = emu.records[1]
    assert not rec.tool_results, "the old stream got a result it cannot answer"
    texts = [e.body.get("content", "") for e in new.events if e.name == "textInput"]
    heard = [t for t in texts if "Result of the earlier count" in t]
    assert heard and '"status": "ok"' in heard[0]
    assert "[0, 1, 1, 2, 3, 5, 8, 13, 21, 34]" in heard[0]
    assert new.turns_fired == [1], new.turns_fired  # the new stream answered it
    sent = next(
        e.t_ns for e in new.events if e.name == "textInput" and e.body.get("content") == heard[0]
    )
    assert wait_for(lambda: spoken_after(probe, sent) >= 0.3 * OUT_RATE * 2, TIMEOUT)  # spoken


@pytest.mark.parametrize("how", ["topic", "service"])
@pytest.mark.scenario({"turns": [NAVIGATE_ASYNC]})
def test_the_safety_stop_cancels_motion_without_the_model(
    rig: Any, how: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    _nav()
    from std_msgs.msg import Bool
    from std_srvs.srv import Trigger

    emu, graph = rig
    cancels = _watch_cancels(monkeypatch)
    base = sim_base(graph)
    probe = Probe(graph)
    node = session_node(
        graph, emu, **NAV_TOOLS, safety_stop_topic="estop", safety_stop_type="std_msgs/msg/Bool"
    )
    probe.connected(node)
    rec = first_stream(emu)
    estop = probe.node.create_publisher(Bool, "estop", 10)
    client = probe.node.create_client(Trigger, "/sonic_session/safety_stop")
    assert client.wait_for_service(TIMEOUT)
    assert wait_for(lambda: estop.get_subscription_count() > 0, TIMEOUT)
    feeder = MicFeeder(probe).start()
    answer = None
    try:
        feeder.say(tagged(utterance(seed=28), MIC))
        assert wait_for(lambda: base._run is not None, TIMEOUT), "no goal reached the base"
        time.sleep(0.5)
        estop.publish(Bool(data=False))  # released: nothing happens
        time.sleep(0.3)
        assert not cancels and base._run is not None
        t0 = time.perf_counter_ns()
        if how == "topic":
            estop.publish(Bool(data=True))
        else:
            fut = client.call_async(Trigger.Request())
            assert wait_for(fut.done, TIMEOUT)
            answer = fut.result()
        assert wait_for(lambda: base.counts["canceled"] == 1, TIMEOUT), base.counts
        assert emu.wait_for(lambda: _results(rec, "navigate_to"), TIMEOUT)
    finally:
        feeder.stop()
    assert len(cancels) == 1 and (cancels[0] - t0) / 1e6 < 1000
    assert [u["name"] for u in rec.tool_uses] == ["navigate_to"], "the model was not involved"
    nav = _results(rec, "navigate_to")[0].parsed
    assert nav["status"] == "cancelled" and "by the safety stop" in nav["error"], nav
    assert base.v == 0.0 and base.counts["succeeded"] == 0
    assert node.safety_stops == 1
    if answer is not None:
        assert answer.success and "1 running motion" in answer.message, answer
