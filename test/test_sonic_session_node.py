"""sonic_session on a real ROS graph against the Bedrock stand-in (real SDK, HTTP/2, SigV4).

What is checked, at both ends: PCM published on ``audio/mic`` is what the stand-in decodes
(byte for byte, frame order kept); what the stand-in writes is what ``audio/out`` carries;
``transcript``/``state``/``usage`` carry the expected JSON; the input source follows
``input_source`` and ``kvs/viewers``; a barge-in publishes ``audio/flush`` and audio_io
(on the private PulseAudio speaker) drops its queued output; ``text_input`` and
``kvs/viewer_text`` reach the stand-in as cross-modal text; a wrong secret key gives state
``error`` with a clear reason and no retries; deactivate closes the stream politely and
cancels running tools.

Frames are tagged (two small samples carry a source and sequence number, far below the
stand-in's speech threshold) so each one is recognised where it lands; frames of the
node's silence filler are all zero and are told apart that way.
"""

from __future__ import annotations

import contextlib
import json
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from rclpy.parameter import Parameter
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Empty, Int32, String, UInt8MultiArray

from sonic_voice.contracts import VIEWER_TEXT, VIEWERS
from sonic_voice.emulators.sonic import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, EmulatorThread
from sonic_voice.nodes.sonic_session import SonicSessionNode
from sonic_voice.ros.topics import (
    AUDIO_QOS,
    EVENT_QOS,
    FLUSH_TOPIC,
    LATCHED_QOS,
    MIC_TOPIC,
    OUT_TOPIC,
    REMOTE_TOPIC,
    pcm_msg,
)
from sonic_voice.sonic import transport

from test.harness.ros import wait_for
from test.harness.signals import speech_like

VIEWER_TEXT_TOPIC, VIEWERS_TOPIC = VIEWER_TEXT.name, VIEWERS.name

RATE = 16000
FRAME = 512  # the mic block and the session's 32 ms chunk: frames keep their identity
OUT_RATE = 24000
TIMEOUT = 20.0
MIC, REMOTE_SRC = 1, 2  # tag "kinds"
# The state topic is latched (depth 1 for late joiners); a recorder keeps every change.
STATE_RECORD_QOS = QoSProfile(
    depth=100,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


# --------------------------------------------------------------------------- frame tags
def tag(frame: np.ndarray, kind: int, seq: int) -> np.ndarray:
    """Write (kind, seq) into the first two samples (values <= 1000: about -50 dBFS)."""
    f = frame.astype(np.int16, copy=True)
    f[0], f[1] = 1 + seq % 997, 1 + seq // 997 + 100 * kind
    return f


def read_tag(frame: np.ndarray) -> tuple[int, int] | None:
    """(kind, seq) of a tagged frame; None for an untagged (e.g. silence filler) frame."""
    if frame[0] <= 0 or frame[1] <= 0:
        return None
    hi = int(frame[1]) - 1
    return hi // 100, (hi % 100) * 997 + int(frame[0]) - 1


def tagged(pcm: np.ndarray, kind: int, start: int = 0) -> list[np.ndarray]:
    """``pcm`` cut into 512-sample frames, each tagged with its sequence number."""
    n = len(pcm) // FRAME
    return [tag(pcm[i * FRAME : (i + 1) * FRAME], kind, start + i) for i in range(n)]


def quiet(n: int, kind: int, start: int = 0) -> list[np.ndarray]:
    return tagged(np.zeros(n * FRAME, np.int16), kind, start)


def frames_at(pcm: bytes | bytearray) -> list[np.ndarray]:
    a = np.frombuffer(bytes(pcm), "<i2")
    return [a[i : i + FRAME] for i in range(0, len(a) - FRAME + 1, FRAME)]


def tags_at(pcm: bytes | bytearray) -> list[tuple[int, int]]:
    return [t for t in (read_tag(f) for f in frames_at(pcm)) if t is not None]


def utterance(seconds: float = 1.0, seed: int = 1) -> np.ndarray:
    """Quiet, speech, then 1 s of quiet (the stand-in's end of utterance fires on it)."""
    return np.concatenate(
        [np.zeros(RATE // 5, np.int16), speech_like(seconds, RATE, seed), np.zeros(RATE, np.int16)]
    )


# --------------------------------------------------------------------------- fixtures
@contextlib.contextmanager
def stand_in(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    """The stand-in on its own thread, scenario from the test's ``scenario`` mark; the node
    finds the stand-in's test keys in the environment (botocore's default chain), as it
    would find real ones on a robot."""
    marker = request.node.get_closest_marker("scenario")
    scenario = marker.args[0] if marker else {"turns": []}
    kwargs = {"realtime": False, **(marker.kwargs if marker else {})}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DEFAULT_SECRET_KEY)
    # The transport keeps static keys for a while (they are asked for on every signed
    # event); each test starts from a fresh read of its own environment.
    monkeypatch.setattr(transport, "_RESOLVERS", {})
    emu = EmulatorThread(scenario=scenario, **kwargs).start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.fixture
def sonic(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator:
    with stand_in(request, monkeypatch) as emu:
        yield emu


@pytest.fixture
def rig(sonic: EmulatorThread, ros_graph: Any) -> tuple[EmulatorThread, Any]:
    """Stand-in first, graph second: the graph (and the node's polite close) is torn down
    while the stand-in still listens."""
    return sonic, ros_graph


def first_stream(emu: EmulatorThread) -> Any:
    """The first stream's record, once its preamble is in (audio has started)."""
    emu.wait_for(lambda: emu.records and emu.records[0].audio_started, TIMEOUT)
    return emu.records[0]


class OutputLog:
    """Everything the stand-in wrote as audioOutput (hook on the stand-in's thread)."""

    def __init__(self, emu: EmulatorThread) -> None:
        self.lock = threading.Lock()
        self.chunks: list[tuple[bytes, int]] = []
        emu.on_audio_output(self._on)

    def _on(self, rec: Any, pcm: bytes, t_ns: int) -> None:
        with self.lock:
            self.chunks.append((bytes(pcm), t_ns))

    def pcm(self) -> bytes:
        with self.lock:
            return b"".join(c for c, _ in self.chunks)


class Probe:
    """A helper node: publishes the node's inputs, records its outputs."""

    def __init__(self, graph: Any, name: str = "probe") -> None:
        self.node = graph.node(name)
        self.lock = threading.Lock()
        self.out: list[tuple[bytes, int]] = []  # (pcm, perf_counter_ns at arrival)
        self.flushes: list[int] = []
        self.transcripts: list[dict] = []
        self.states: list[dict] = []
        self.usage: list[dict] = []
        self.tool_events: list[dict] = []
        n = self.node
        n.create_subscription(UInt8MultiArray, OUT_TOPIC, self._on_out, AUDIO_QOS)
        n.create_subscription(
            Empty, FLUSH_TOPIC, lambda _m: self.flushes.append(time.perf_counter_ns()), EVENT_QOS
        )
        for topic, store, qos in (
            ("transcript", self.transcripts, EVENT_QOS),
            ("state", self.states, STATE_RECORD_QOS),
            ("usage", self.usage, EVENT_QOS),
            ("tool_events", self.tool_events, EVENT_QOS),
        ):
            n.create_subscription(String, topic, self._json_cb(store), qos)
        self.mic = n.create_publisher(UInt8MultiArray, MIC_TOPIC, AUDIO_QOS)
        self.remote = n.create_publisher(UInt8MultiArray, REMOTE_TOPIC, AUDIO_QOS)
        self.viewers = n.create_publisher(Int32, VIEWERS_TOPIC, LATCHED_QOS)
        self.text = n.create_publisher(String, "text_input", EVENT_QOS)
        self.viewer_text = n.create_publisher(String, VIEWER_TEXT_TOPIC, EVENT_QOS)

    def _json_cb(self, store: list) -> Callable[[String], None]:
        def cb(msg: String) -> None:
            with self.lock:
                store.append(json.loads(msg.data))

        return cb

    def _on_out(self, msg: UInt8MultiArray) -> None:
        t = time.perf_counter_ns()
        data = bytes(msg.data)
        with self.lock:
            self.out.append((data, t))

    def out_pcm(self) -> bytes:
        with self.lock:
            return b"".join(d for d, _ in self.out)

    def state_names(self) -> list[str]:
        with self.lock:
            return [s["state"] for s in self.states]

    def finals(self, role: str) -> list[str]:
        with self.lock:
            return [
                t["text"]
                for t in self.transcripts
                if t.get("role") == role and t.get("stage") == "FINAL"
            ]

    def connected(self, node: SonicSessionNode) -> None:
        """Wait until the session node has matched our publishers and is listening."""
        pubs = (self.mic, self.remote, self.text, self.viewer_text)
        assert wait_for(lambda: all(p.get_subscription_count() > 0 for p in pubs), TIMEOUT)
        assert wait_for(lambda: "listening" in self.state_names(), TIMEOUT), self.states

    def publish(self, pub: Any, frames: list[np.ndarray], pace_s: float = 0.0) -> None:
        for f in frames:
            pub.publish(pcm_msg(f))
            if pace_s:
                time.sleep(pace_s)


def session_node(graph: Any, emu: EmulatorThread, **params: Any) -> SonicSessionNode:
    # always_on: these tests are about the stream itself (the lifecycle that opens and
    # closes it is test_engagement_node.py's).
    values = {
        "endpoint_uri": emu.endpoint_uri,
        "ca_bundle": emu.ca_file,
        "always_on": True,
        **params,
    }
    node = SonicSessionNode(
        context=graph.context,
        parameter_overrides=[Parameter(k, value=v) for k, v in values.items()],
    )
    graph.add(node)
    return node


def subsequence(needle: list[str], hay: list[str]) -> bool:
    it = iter(hay)
    return all(x in it for x in needle)


# --------------------------------------------------------------------------- tests
TURN = {
    "turns": [
        {
            "on": "speech",
            "user": "hello robot",
            "say": "Hello! How can I help?",
            "audio": {"tone": {"freq": 440, "duration_s": 0.6}},
        }
    ]
}


@pytest.mark.scenario(TURN)
def test_turn_audio_both_ways_exact_and_topics(rig: Any) -> None:
    emu, graph = rig
    out_log = OutputLog(emu)
    probe = Probe(graph)
    node = session_node(graph, emu)
    probe.connected(node)
    assert node.fatal_error is None

    # audio/mic -> the stand-in, byte for byte and in order (filler frames are all zero).
    frames = tagged(utterance(seed=3), MIC)
    probe.publish(probe.mic, frames, pace_s=0.004)
    emu.wait_for(lambda: emu.records[0].turns_fired, TIMEOUT)
    rec = first_stream(emu)
    assert rec.signature_chain_ok
    assert emu.wait_for(lambda: len(tags_at(rec.pcm)) >= len(frames), TIMEOUT)
    got = [f for f in frames_at(rec.pcm) if f.any()]
    assert len(got) == len(frames)
    assert all(g.tobytes() == f.tobytes() for g, f in zip(got, frames, strict=True))
    assert rec.audio_bytes == rec.audio_frames * FRAME * 2  # nothing but whole 32 ms frames

    # The stand-in's audioOutput -> audio/out, byte for byte.
    assert wait_for(lambda: "Hello! How can I help?" in probe.finals("ASSISTANT"), TIMEOUT)
    expected_len = int(0.6 * OUT_RATE) * 2
    assert wait_for(lambda: len(probe.out_pcm()) >= expected_len, TIMEOUT)
    assert rec.audio_out_bytes == expected_len
    assert probe.out_pcm() == out_log.pcm()
    assert node.out_chunks == rec.audio_out_frames

    # transcript: the USER final, the ASSISTANT speculative and final, timestamped.
    assert probe.finals("USER") == ["hello robot"]
    with probe.lock:
        spec = [t for t in probe.transcripts if t.get("stage") == "SPECULATIVE"]
        assert spec and spec[0]["role"] == "ASSISTANT" and spec[0]["text"].startswith("Hello!")
        assert all(isinstance(t["t"], float) for t in probe.transcripts)

    # state: listening -> thinking (heard the user) -> speaking -> listening, with context.
    assert wait_for(
        lambda: subsequence(
            ["listening", "thinking", "speaking", "listening"], probe.state_names()
        ),
        TIMEOUT,
    ), probe.state_names()
    with probe.lock:
        last = probe.states[-1]
    assert last == {
        "state": "listening",
        "source": "local",
        "viewers": 0,
        "error": "",
        "engagement": "off",  # always_on
    }

    # usage: the stand-in's counts (25 speech + 2 text input tokens for "hello robot").
    assert wait_for(lambda: len(probe.usage) >= 2, TIMEOUT)
    with probe.lock:
        first, final = probe.usage[0], probe.usage[-1]
    assert first["input_tokens"] == 27 and first["output_tokens"] == 0
    assert final["total_tokens"] == final["input_tokens"] + final["output_tokens"]
    assert final["output_tokens"] > 0
    assert final["details"]["total"]["input"] == {"speechTokens": 25, "textTokens": 2}


@pytest.mark.parametrize(
    ("input_source", "steps"),
    [
        ("auto", [(1, REMOTE_SRC), (0, MIC)]),
        ("local", [(1, MIC)]),
        ("remote", [(0, REMOTE_SRC)]),
    ],
)
def test_source_selection(rig: Any, input_source: str, steps: list[tuple[int, int]]) -> None:
    """Only the selected source reaches the service; ``auto`` follows kvs/viewers."""
    emu, graph = rig
    probe = Probe(graph)
    node = session_node(graph, emu, input_source=input_source)
    probe.connected(node)
    rec = first_stream(emu)
    seq = 0
    for viewers, active in steps:
        probe.viewers.publish(Int32(data=viewers))
        assert wait_for(
            lambda v=viewers: bool(probe.states) and probe.states[-1]["viewers"] == v, TIMEOUT
        ), probe.states
        want = "remote" if active == REMOTE_SRC else "local"
        assert probe.states[-1]["source"] == want
        mic, remote = quiet(15, MIC, seq), quiet(15, REMOTE_SRC, seq)
        idle = remote if active == MIC else mic
        live = mic if active == MIC else remote
        # The unused source first: by the time the live frames are in, it was handled.
        probe.publish(probe.remote if active == MIC else probe.mic, idle)
        probe.publish(probe.mic if active == MIC else probe.remote, live)
        expected = [(active, seq + i) for i in range(15)]
        assert emu.wait_for(
            lambda e=expected: [t for t in tags_at(rec.pcm) if t[1] >= e[0][1]] == e, TIMEOUT
        ), tags_at(rec.pcm)[-20:]
        seq += 15
    seen = tags_at(rec.pcm)
    assert len(seen) == len(set(seen)) == 15 * len(steps)


@pytest.mark.scenario(
    {
        "turns": [
            {
                "on": "speech",
                "user": "tell me a story",
                "say": "Once upon a time there was a robot.",
                "audio": {"tone": {"freq": 500, "duration_s": 12.0, "amp": 0.3}},
            }
        ]
    },
    realtime=3.0,  # the answer arrives 3x faster than it plays: output queues up
)
def test_barge_in_flushes_and_audio_io_drops_queued_output(rig: Any, pulse: Any) -> None:
    from sonic_voice.nodes.audio_io import AudioIONode

    emu, graph = rig
    speaker = AudioIONode(
        context=graph.context,
        parameter_overrides=[Parameter("enable_input", value=False)],
    )
    graph.add(speaker)
    assert speaker.playback is not None
    out_log = OutputLog(emu)
    probe = Probe(graph)
    node = session_node(graph, emu)
    probe.connected(node)
    chunks_at_flush: list[int] = []  # audio/out chunks the node had published at the flush
    publish_flush = node.flush_pub.publish

    published_ns: list[int] = []  # when the node published the flush

    def counting_flush(msg: Empty) -> None:
        chunks_at_flush.append(node.out_chunks)
        published_ns.append(time.perf_counter_ns())
        publish_flush(msg)

    node.flush_pub.publish = counting_flush
    buf = speaker.playback.buffer
    trace: list[tuple[int, int, int, int]] = []  # (ns, played, queued, recorded samples)
    tracing = threading.Event()
    with pulse.record_speaker(OUT_RATE) as room:

        def sample() -> None:
            while not tracing.is_set():
                trace.append(
                    (time.perf_counter_ns(), buf.played_samples, buf.queued_samples,
                     len(room.samples()))
                )  # fmt: skip
                time.sleep(0.002)

        tracer = threading.Thread(target=sample, daemon=True)
        tracer.start()
        probe.publish(probe.mic, tagged(utterance(seed=4), MIC), pace_s=0.002)
        # The answer plays, and more of it waits in audio_io's queue.
        assert wait_for(
            lambda: buf.played_samples > 0.3 * OUT_RATE and buf.queued_samples > OUT_RATE, TIMEOUT
        ), (buf.played_samples, buf.queued_samples)
        # The person talks over it (real time, as a microphone would deliver it).
        talk = threading.Thread(
            target=probe.publish,
            args=(probe.mic, tagged(speech_like(0.8, RATE, seed=5), MIC, 1000), FRAME / RATE),
        )
        talk.start()
        assert wait_for(lambda: probe.flushes, TIMEOUT)
        talk.join()
        assert wait_for(lambda: buf.queued_samples == 0, 2.0), buf.queued_samples
        time.sleep(1.5)
        tracing.set()
        tracer.join()
        heard = room.stop()
    assert emu.records[0].barge_ins == 1
    assert len(probe.flushes) == 1, "one flush per interrupted answer"
    # The reference is the flush's publication: audio_io (its hot path) may act on it
    # before the probe hears it.
    flush_ns = published_ns[0]
    before = [t for t in trace if t[0] <= flush_ns][-1]
    final = trace[-1]
    # Output was queued when the person spoke; the flush dropped it. Chunks still in flight
    # on audio/out when the flush overtook them (it has its own callback group, so it never
    # waits behind audio) are dropped too: they carry the interrupted answer's epoch. What
    # plays after the flush is what the device had already taken (its latency, 15 ms) and
    # the tracer's own 2 ms resolution.
    assert before[2] > 0.5 * OUT_RATE, f"only {before[2] / OUT_RATE:.2f} s queued at the flush"
    after_s = (final[1] - before[1]) / OUT_RATE
    assert after_s < 0.08, f"{after_s:.3f} s played from the queue after the flush"
    # The speaker: the answer was cut, and silence follows (allowing the device path's
    # latency between audio_io's buffer and the recording).
    written_s = len(out_log.pcm()) / 2 / OUT_RATE
    played_s = np.count_nonzero(heard) / OUT_RATE
    assert played_s < written_s - 0.5, (played_s, written_s)
    loud_after = np.count_nonzero(heard[before[3] :]) / OUT_RATE
    assert loud_after < 0.6, f"{loud_after:.2f} s heard after the flush"
    assert np.count_nonzero(heard[-int(0.8 * OUT_RATE) :]) == 0
    # The session published nothing of the interrupted answer after the flush.
    assert node.out_chunks == chunks_at_flush[0], (node.out_chunks, chunks_at_flush)


@pytest.mark.scenario(
    {
        "turns": [
            {"on": "text", "say": "The café is on the second floor.", "audio": "none"},
            {"on": "text", "say": "Follow me to the lift.", "audio": "none"},
        ]
    }
)
def test_text_input_reaches_the_stand_in_as_cross_modal_text(rig: Any) -> None:
    emu, graph = rig
    probe = Probe(graph)
    node = session_node(graph, emu)
    probe.connected(node)
    rec = first_stream(emu)
    probe.text.publish(String(data="Where is the café?"))
    assert emu.wait_for(lambda: rec.interactive_texts == ["Where is the café?"], TIMEOUT)
    assert wait_for(lambda: "The café is on the second floor." in probe.finals("ASSISTANT"))
    # Not a text message: ignored (nothing reaches the service).
    probe.viewer_text.publish(String(data=json.dumps({"type": "mute", "muted": True})))
    probe.viewer_text.publish(String(data=json.dumps({"type": "text", "text": "The lift?"})))
    assert emu.wait_for(lambda: len(rec.interactive_texts) == 2, TIMEOUT)
    assert rec.interactive_texts == ["Where is the café?", "The lift?"]
    assert wait_for(lambda: "Follow me to the lift." in probe.finals("ASSISTANT"))
    with probe.lock:
        typed = [t["text"] for t in probe.transcripts if t.get("interactive")]
    assert typed == ["Where is the café?", "The lift?"]
    # The text went in as its own block, never with an audio frame inside it.
    open_text, inside = None, 0
    for e in rec.events:
        if e.name == "contentStart" and e.body.get("type") == "TEXT":
            open_text = e.body["contentName"]
        elif e.name == "contentEnd" and e.body.get("contentName") == open_text:
            open_text = None
        elif e.name == "audioInput":
            inside += open_text is not None
    assert inside == 0
    assert rec.audio_frames > 0  # the silence filler kept the stream fed meanwhile


def test_wrong_secret_key_is_a_clear_error_without_retries(
    rig: Any, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture
) -> None:
    emu, graph = rig
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    probe = Probe(graph)
    node = session_node(graph, emu)
    assert wait_for(lambda: "error" in probe.state_names(), TIMEOUT), probe.states
    with probe.lock:
        err = next(s for s in probe.states if s["state"] == "error")
    assert "secret key is wrong" in err["error"], err
    assert node.fatal_error and "secret key is wrong" in node.fatal_error
    time.sleep(2.0)  # long enough for a retry storm to show
    assert len(emu.records) == 1, "no retries after an authentication error"
    assert emu.records[0].request_signature_ok is False
    assert probe.state_names()[-1] == "error"
    logged = capfd.readouterr().err
    assert "secret key is wrong" in logged, logged[-2000:]


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
def test_deactivate_ends_the_stream_politely_and_cancels_tools(rig: Any, tmp_path: Path) -> None:
    from test.harness.servers import fibonacci_server

    emu, graph = rig
    tools = tmp_path / "tools.yaml"
    tools.write_text(textwrap.dedent(FIB_TOOLS))
    server = fibonacci_server(graph.node("fib_server"), mode="hold")
    probe = Probe(graph)
    node = session_node(graph, emu, tools_file=str(tools))
    probe.connected(node)
    probe.publish(probe.mic, tagged(utterance(seed=6), MIC), pace_s=0.002)
    assert server.goal_received.wait(TIMEOUT)
    assert server.goals[0].order == 6
    assert wait_for(lambda: "acting" in probe.state_names(), TIMEOUT)

    node.trigger_deactivate()
    assert node._state_machine.current_state[1] == "inactive"
    assert server.cancel_received.wait(TIMEOUT), "the running goal was not cancelled"
    rec = first_stream(emu)
    with contextlib.suppress(TimeoutError):
        # Deactivation returns at once; the polite close follows on the loop.
        emu.wait_for(lambda: rec.end_reason == "sessionEnd" and rec.end_frame_received, TIMEOUT)
    assert rec.end_reason == "sessionEnd", (rec.end_reason, rec.event_names[-4:])
    assert rec.event_names[-3:] == ["contentEnd", "promptEnd", "sessionEnd"]
    assert rec.end_frame_received and rec.signature_chain_ok
    # The call ended with a "cancelled" toolResult, sent before the stream closed.
    assert [r.parsed["status"] for r in rec.tool_results] == ["cancelled"]
    # Deactivation returns at once (the executor keeps spinning for the cancel); the node
    # says "inactive" once the stream is closed.
    assert wait_for(lambda: probe.state_names()[-1] == "inactive", TIMEOUT), probe.state_names()
    # Audio is no longer forwarded while inactive.
    before = rec.audio_frames
    probe.publish(probe.mic, quiet(5, MIC, 500))
    time.sleep(0.3)
    assert rec.audio_frames == before

    # Activate again: a new stream, a live conversation.
    node.trigger_activate()
    assert emu.wait_for(lambda: len(emu.records) == 2 and emu.records[1].audio_started, TIMEOUT)
    probe.publish(probe.mic, quiet(5, MIC, 600))
    assert emu.wait_for(
        lambda: [t[1] for t in tags_at(emu.records[1].pcm)] == list(range(600, 605)), TIMEOUT
    )
