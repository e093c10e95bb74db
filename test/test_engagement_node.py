"""The conversation lifecycle of sonic_session on a real ROS graph, against the Bedrock
stand-in (real SDK, HTTP/2, SigV4), with published, tagged microphone audio.

Each trigger engages (speech, a presence topic of std_msgs/Bool or a configured type and
field, the ~/engage service, a viewer joining, a typed line); an utterance that began while
idle reaches the stand-in from its first syllable, with no frame lost or sent twice;
silence, stationary noise and the robot's own voice do not engage; the idle timeout closes
the stream politely; a running tool keeps it open; coming back within ``memory_s`` replays
the conversation; usage is summed per conversation and per hour. Frame tags and helpers:
test_sonic_session_node.py.
"""

from __future__ import annotations

import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rclpy.parameter import Parameter
from std_msgs.msg import Bool, Int32, String
from std_srvs.srv import Trigger

from sonic_voice import contracts as c
from sonic_voice.nodes.sonic_session import SonicSessionNode
from sonic_voice.ros.topics import EVENT_QOS, LATCHED_QOS

from test.harness.ros import wait_for
from test.harness.signals import speech_like
from test.test_sonic_session_node import (
    FRAME,
    MIC,
    RATE,
    TIMEOUT,
    TURN,
    Probe,
    quiet,
    stand_in,
    tagged,
    tags_at,
)

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def sonic(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    with stand_in(request, monkeypatch) as emu:
        yield emu


@pytest.fixture
def rig(sonic: Any, ros_graph: Any) -> tuple[Any, Any]:
    """Stand-in first, graph second: the node closes its stream before the stand-in stops."""
    return sonic, ros_graph


class LifecycleProbe(Probe):
    """Probe + the lifecycle's outputs (conversation, usage/hourly) and its services."""

    def __init__(self, graph: Any, name: str = "probe") -> None:
        super().__init__(graph, name)
        self.conversations: list[dict] = []
        self.hourly: list[dict] = []
        n = self.node
        n.create_subscription(
            String, c.CONVERSATION.name, self._json_cb(self.conversations), EVENT_QOS
        )
        n.create_subscription(String, c.USAGE_HOURLY.name, self._json_cb(self.hourly), LATCHED_QOS)
        self._clients: dict[str, Any] = {}

    @property
    def engage_cli(self) -> Any:
        return self._client("/sonic_session/engage")

    @property
    def release_cli(self) -> Any:
        return self._client("/sonic_session/release")

    def _client(self, name: str) -> Any:
        """Made when first used (a test that calls no service has no client)."""
        if name not in self._clients:
            self._clients[name] = self.node.create_client(Trigger, name)
        return self._clients[name]

    def phases(self) -> list[str]:
        with self.lock:
            return [s.get("engagement", "") for s in self.states]

    def phase(self) -> str:
        with self.lock:
            return self.states[-1].get("engagement", "") if self.states else ""

    def ready(self) -> None:
        """The node is active, idle, and has matched our publishers."""
        pubs = (self.mic, self.remote, self.text, self.viewer_text)
        assert wait_for(lambda: all(p.get_subscription_count() > 0 for p in pubs), TIMEOUT)
        assert wait_for(lambda: self.phase() == "idle", TIMEOUT), self.states

    def call(self, client: Any) -> Any:
        assert client.wait_for_service(timeout_sec=TIMEOUT)
        fut = client.call_async(Trigger.Request())
        assert wait_for(fut.done, TIMEOUT)
        return fut.result()


def lifecycle_node(graph: Any, emu: Any, **params: Any) -> SonicSessionNode:
    values = {
        "endpoint_uri": emu.endpoint_uri,
        "ca_bundle": emu.ca_file,
        "check_on_start": False,  # records[0] is then the first conversation's stream
        **params,
    }
    node = SonicSessionNode(
        context=graph.context,
        parameter_overrides=[Parameter(k, value=v) for k, v in values.items()],
    )
    graph.add(node)
    return node


def wait_stream(emu: Any, index: int) -> Any:
    assert emu.wait_for(
        lambda: len(emu.records) > index and emu.records[index].audio_started, TIMEOUT
    ), len(emu.records)
    return emu.records[index]


def noise(seconds: float, dbfs: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * RATE)) * 10 ** (dbfs / 20) * 32767).astype(np.int16)


def hum(seconds: float, dbfs: float) -> np.ndarray:
    t = np.arange(int(seconds * RATE)) / RATE
    return (np.sin(2 * np.pi * 100 * t) * 10 ** (dbfs / 20) * 32767 * 1.41).astype(np.int16)


# --------------------------------------------------------------------------- speech
@pytest.mark.scenario(TURN)
def test_speech_while_idle_reaches_the_stand_in_from_its_first_syllable(rig: Any) -> None:
    emu, graph = rig
    probe = LifecycleProbe(graph)
    node = lifecycle_node(graph, emu, greeting="A visitor is here. Greet them.")
    probe.ready()
    # Idle: two seconds of (tagged) quiet, and no stream at all.
    before = quiet(60, MIC)
    probe.publish(probe.mic, before, pace_s=0.003)
    time.sleep(0.5)
    assert emu.records == [] and probe.phase() == "idle"
    # The visitor speaks: 0.2 s quiet, 1 s speech, 1 s quiet; frame tags continue.
    speech = tagged(
        np.concatenate([np.zeros(RATE // 5, np.int16), speech_like(1.0, RATE, 3)]), MIC, 60
    )
    after = quiet(40, MIC, 60 + len(speech))
    onset = 60 + next(i for i, f in enumerate(speech) if np.abs(f[2:]).max() > 300)
    probe.publish(probe.mic, speech + after, pace_s=0.003)
    rec = wait_stream(emu, 0)
    last = 60 + len(speech) + len(after) - 1
    assert emu.wait_for(lambda: (tags_at(rec.pcm) or [(0, 0)])[-1][1] == last, TIMEOUT)
    seqs = [s for _k, s in tags_at(rec.pcm)]
    lead = int(0.3 * RATE / FRAME) + 1  # preroll_lead_s, in frames (and the one it starts in)
    # From just before the onset (the pre-roll), then live: no gap, nothing twice.
    assert seqs == list(range(seqs[0], last + 1)), seqs[:20]
    assert onset - lead - 1 <= seqs[0] <= onset, (seqs[0], onset)
    # The stand-in heard the utterance and answered it (not a greeting: speech engaged).
    assert emu.wait_for(lambda: rec.turns_fired == [0], TIMEOUT)
    assert rec.interactive_texts == [] and rec.history == []
    assert wait_for(lambda: "Hello! How can I help?" in probe.finals("ASSISTANT"), TIMEOUT)
    assert subsequence_of(["idle", "engaging", "conversing"], probe.phases())
    with probe.lock:
        conv = [s for s in probe.states if s.get("engagement") == "conversing"]
        assert conv and conv[-1]["trigger"] == "speech"
        assert probe.conversations[0]["event"] == "engaged"
        assert probe.conversations[0]["trigger"] == "speech"
    assert node.session is not None and node.session.frames_dropped == 0


def subsequence_of(needle: list[str], hay: list[str]) -> bool:
    it = iter(hay)
    return all(x in it for x in needle)


# --------------------------------------------------------------------------- triggers
DETECTION = "person_detected"


@pytest.mark.scenario({"turns": [{"on": "text", "say": "Hello there!", "audio": "none"}]})
@pytest.mark.parametrize("trigger", ["topic-bool", "topic-field", "service", "viewer", "text"])
def test_each_trigger_engages(rig: Any, trigger: str) -> None:
    emu, graph = rig
    probe = LifecycleProbe(graph)
    params: dict[str, Any] = {"greeting": "Greet the visitor.", "engage_on_speech": False}
    if trigger == "topic-bool":
        params.update(presence_topic=DETECTION, release_on_absence=True)
    elif trigger == "topic-field":
        params.update(presence_topic=DETECTION, presence_type="std_msgs/msg/Int32")
    lifecycle_node(graph, emu, **params)
    probe.ready()
    time.sleep(0.3)
    assert emu.records == []
    if trigger == "topic-bool":
        pub = probe.node.create_publisher(Bool, DETECTION, 10)
        assert wait_for(lambda: pub.get_subscription_count() > 0, TIMEOUT)
        pub.publish(Bool(data=False))
        time.sleep(0.3)
        assert emu.records == []  # false: nobody there
        pub.publish(Bool(data=True))
    elif trigger == "topic-field":
        pub = probe.node.create_publisher(Int32, DETECTION, 10)  # e.g. a person count
        assert wait_for(lambda: pub.get_subscription_count() > 0, TIMEOUT)
        pub.publish(Int32(data=0))
        time.sleep(0.3)
        assert emu.records == []
        pub.publish(Int32(data=2))
    elif trigger == "service":
        answer = probe.call(probe.engage_cli)
        assert answer.success and "idle" in answer.message
    elif trigger == "viewer":
        probe.viewers.publish(Int32(data=1))
    else:
        probe.text.publish(String(data="Where is the lift?"))
    rec = wait_stream(emu, 0)
    name = "text" if trigger == "text" else trigger.split("-")[0]
    assert wait_for(lambda: probe.phase() == "conversing", TIMEOUT), probe.states
    with probe.lock:
        assert probe.states[-1]["trigger"] == name
    # A person detector, a button and a viewer get a greeting; a typed line is answered.
    want = ["Where is the lift?"] if name == "text" else ["Greet the visitor."]
    assert emu.wait_for(lambda: rec.interactive_texts == want, TIMEOUT), rec.interactive_texts
    assert wait_for(lambda: "Hello there!" in probe.finals("ASSISTANT"), TIMEOUT)
    assert len(emu.records) == 1
    if trigger == "topic-bool":
        # release_on_absence: the detector says nobody is there any more.
        pub.publish(Bool(data=False))
        assert emu.wait_for(lambda: rec.end_reason == "sessionEnd", TIMEOUT), rec.end_reason
        assert wait_for(lambda: probe.phase() == "idle", TIMEOUT)
        with probe.lock:
            assert probe.conversations[-1]["reason"] == "absence"


# --------------------------------------------------------------------------- not engaging
@pytest.mark.scenario(
    {
        "turns": [
            {"on": "text", "say": "Goodbye!", "audio": {"tone": {"freq": 300, "duration_s": 4.0}}}
        ]
    }
)
def test_silence_noise_and_the_robots_own_voice_do_not_engage(rig: Any) -> None:
    emu, graph = rig
    probe = LifecycleProbe(graph)
    node = lifecycle_node(graph, emu, goodbye="Say goodbye.", greet_on=["topic"])
    probe.ready()

    def play(x: np.ndarray, start: int) -> None:
        probe.publish(probe.mic, tagged(x, MIC, start), pace_s=0.002)

    # Silence, then a fan switched on (white noise at -25 dBFS: webrtcvad alone calls
    # every frame of it voiced), silence, a transformer hum (-35 dBFS: the same).
    play(np.zeros(2 * RATE, np.int16), 0)
    play(noise(3.0, -25.0), 100)
    play(np.zeros(2 * RATE, np.int16), 300)
    play(hum(3.0, -35.0), 400)
    time.sleep(0.5)
    assert emu.records == [], "stationary sound engaged the robot"
    assert probe.phase() == "idle" and not node.vad.speaking
    assert node.vad.voiced_frames > 100  # voiced by webrtcvad, rejected as steady

    # The robot says goodbye (4 s of audio, delivered faster than it plays) and the stream
    # closes while it is still playing; its own voice then reaches the microphone.
    assert probe.call(probe.engage_cli).success
    rec = wait_stream(emu, 0)
    assert probe.call(probe.release_cli).success
    assert emu.wait_for(lambda: rec.end_reason == "sessionEnd", TIMEOUT), rec.end_reason
    assert wait_for(lambda: probe.phase() == "idle", TIMEOUT)
    assert node.eng.robot_speaking(), "the goodbye should still be playing"
    echo = speech_like(1.0, RATE, 8)
    play(echo, 600)
    time.sleep(0.5)
    assert len(emu.records) == 1, "the robot's own voice engaged it"
    # Control: once it has finished speaking (and the echo tail), the same sound engages.
    assert wait_for(lambda: not node.eng.robot_speaking(node.params.echo_tail_s), 10)
    play(echo, 700)
    wait_stream(emu, 1)
    with probe.lock:
        assert probe.states[-1].get("trigger") == "speech" or "speech" in [
            s.get("trigger") for s in probe.states
        ]


# --------------------------------------------------------------------------- release
@pytest.mark.scenario(
    {
        "turns": [
            {
                "on": "speech",
                "user": "hello robot",
                "say": "Hello! How can I help?",
                "audio": {"tone": {"freq": 440, "duration_s": 0.6}},
            },
            {"on": "text", "say": "Welcome back!", "audio": "none"},
        ]
    }
)
def test_timeout_releases_politely_and_a_return_within_memory_s_continues(rig: Any) -> None:
    emu, graph = rig
    probe = LifecycleProbe(graph)
    node = lifecycle_node(
        graph, emu, idle_timeout_s=1.5, memory_s=30.0, greeting="Greet the visitor."
    )
    probe.ready()
    probe.publish(
        probe.mic,
        tagged(np.concatenate([speech_like(1.0, RATE, 4), np.zeros(RATE, np.int16)]), MIC),
        pace_s=0.003,
    )
    rec = wait_stream(emu, 0)
    assert wait_for(lambda: "Hello! How can I help?" in probe.finals("ASSISTANT"), TIMEOUT)
    t_answer = time.monotonic()
    # Nobody speaks (the node streams silence meanwhile): released after idle_timeout_s.
    assert emu.wait_for(lambda: rec.end_reason == "sessionEnd", TIMEOUT), rec.end_reason
    took = time.monotonic() - t_answer
    assert 1.5 <= took <= 6.0, took
    assert rec.event_names[-3:] == ["contentEnd", "promptEnd", "sessionEnd"]
    assert wait_for(lambda: probe.phase() == "idle", TIMEOUT)
    assert emu.wait_for(lambda: rec.end_frame_received, TIMEOUT) and rec.signature_chain_ok
    assert subsequence_of(["conversing", "closing", "idle"], probe.phases())
    # Its figures: streamed seconds, tokens (from the usage events), estimated cost.
    assert wait_for(lambda: any(e["event"] == "released" for e in probe.conversations), TIMEOUT)
    with probe.lock:
        released = next(e for e in probe.conversations if e["event"] == "released")
        hourly = probe.hourly[-1]
    assert released["reason"] == "timeout" and released["trigger"] == "speech"
    assert 1.5 <= released["streamed_s"] <= 10.0, released
    assert released["speech_input"] == 25 and released["text_input"] == 2, released
    assert released["output_tokens"] > 0 and released["cost_usd"] > 0
    assert hourly["conversations"] == 1 and hourly["streamed_s"] >= released["streamed_s"]
    assert hourly["cost_usd"] == pytest.approx(released["cost_usd"])
    # Nothing is streamed while idle.
    frames = rec.audio_frames
    time.sleep(1.0)
    assert len(emu.records) == 1 and rec.audio_frames == frames
    # The visitor comes back (a button this time): the conversation goes on.
    assert probe.call(probe.engage_cli).success
    rec2 = wait_stream(emu, 1)
    assert rec2.history == [("USER", "hello robot"), ("ASSISTANT", "Hello! How can I help?")]
    assert emu.wait_for(lambda: rec2.interactive_texts == ["Greet the visitor."], TIMEOUT)
    with probe.lock:
        engaged = [e for e in probe.conversations if e["event"] == "engaged"]
    assert [e["memory"] for e in engaged] == [0, 2]
    assert node.eng.conversations == 2


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


@pytest.mark.scenario(
    {
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
)
def test_a_running_tool_keeps_the_conversation_open(rig: Any, tmp_path: Path) -> None:
    from test.harness.servers import fibonacci_server

    emu, graph = rig
    tools = tmp_path / "tools.yaml"
    tools.write_text(textwrap.dedent(FIB_TOOLS))
    server = fibonacci_server(graph.node("fib_server"), mode="hold")
    probe = LifecycleProbe(graph)
    lifecycle_node(graph, emu, tools_file=str(tools), idle_timeout_s=1.0)
    probe.ready()
    probe.publish(
        probe.mic,
        tagged(np.concatenate([speech_like(1.0, RATE, 6), np.zeros(RATE, np.int16)]), MIC),
        pace_s=0.003,
    )
    assert server.goal_received.wait(TIMEOUT)
    rec = emu.records[0]
    # The robot is "navigating" for 3x the idle timeout: still engaged, stream open.
    time.sleep(3.0)
    assert rec.end_reason == "" and probe.phase() == "conversing", (rec.end_reason, probe.phases())
    assert not server.cancel_received.is_set()
    # The release trigger ends it: the goal is cancelled, then the stream closed politely.
    assert probe.call(probe.release_cli).success
    assert server.cancel_received.wait(TIMEOUT)
    assert emu.wait_for(lambda: rec.end_reason == "sessionEnd", TIMEOUT), rec.end_reason
    assert [r.parsed["status"] for r in rec.tool_results] == ["cancelled"]
    assert wait_for(lambda: probe.phase() == "idle", TIMEOUT)


def test_check_on_start_opens_and_closes_one_stream_then_idles(rig: Any) -> None:
    from test.test_diagnostics import Monitor

    emu, graph = rig
    probe = LifecycleProbe(graph)
    mon = Monitor(graph)
    lifecycle_node(graph, emu, check_on_start=True)
    probe.ready()
    rec = wait_stream(emu, 0)
    assert emu.wait_for(lambda: rec.end_reason == "sessionEnd", TIMEOUT), rec.end_reason
    assert rec.audio_frames == 0 and rec.interactive_texts == []
    probe.publish(probe.mic, quiet(30, MIC), pace_s=0.003)
    time.sleep(1.0)
    assert len(emu.records) == 1 and probe.phase() == "idle"
    # The state never claimed a conversation for the check.
    assert "conversing" not in probe.phases() and "listening" not in probe.state_names()
    # /diagnostics: idle is healthy (no stream on purpose), and says so with the hour's sums.
    stream, conversation = "sonic_session: bedrock stream", "sonic_session: conversation"
    assert wait_for(lambda: mon.get(stream) and mon.get(conversation), TIMEOUT)
    level, message, values = mon.get(stream)
    assert level == 0 and message.startswith("idle") and values["engagement"] == "idle"
    level, message, values = mon.get(conversation)
    assert level == 0 and values["engagement"] == "idle"
    assert values["hour_conversations"] == "0" and float(values["hour_cost_usd"]) == 0
    # Engaged (a button): the diagnostics follow.
    assert probe.call(probe.engage_cli).success
    wait_stream(emu, 1)
    assert wait_for(lambda: mon.get(conversation)[2]["engagement"] == "conversing", TIMEOUT)
    assert wait_for(lambda: mon.get(conversation)[2]["hour_conversations"] == "1", TIMEOUT)
    assert mon.get(conversation)[2]["trigger"] == "service"
