"""The session engine through the real SDK (awscrt HTTP/2, SigV4, event stream) against the
Bedrock stand-in: turns, tools, barge-in, cross-modal text, rotation, faults, auth."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest

from sonic_voice.emulators.sonic.server import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_SECRET_KEY,
    SonicEmulator,
)
from sonic_voice.sonic import events as ev
from sonic_voice.sonic.session import SessionConfig, SessionListener, SonicSession
from sonic_voice.sonic.tools_seam import ToolResult, ToolUse
from sonic_voice.sonic.transport import BedrockSettings, SonicStreamError

from test.harness.signals import speech_like

RATE = 16000
FRAME = 512  # 32 ms at 16 kHz: the session's chunk, so frames keep their identity


class Recorder(SessionListener):
    def __init__(self) -> None:
        self.audio = bytearray()
        self.audio_chunks = 0
        self.interrupted = 0
        self.transcripts: list[dict[str, Any]] = []
        self.states: list[str] = []
        self.tool_events: list[dict[str, Any]] = []
        self.errors: list[tuple[str, bool]] = []
        self.usage: list[dict[str, Any]] = []

    def on_audio(self, pcm: bytes) -> None:
        self.audio += pcm
        self.audio_chunks += 1

    def on_interrupted(self) -> None:
        self.interrupted += 1

    def on_transcript(self, entry: dict[str, Any]) -> None:
        self.transcripts.append(entry)

    def on_state(self, state: str) -> None:
        self.states.append(state)

    def on_usage(self, usage: dict[str, Any]) -> None:
        self.usage.append(usage)

    def on_tool_event(self, event: dict[str, Any]) -> None:
        self.tool_events.append(event)

    def on_error(self, message: str, fatal: bool) -> None:
        self.errors.append((message, fatal))

    def finals(self, role: str) -> list[str]:
        return [
            t["text"]
            for t in self.transcripts
            if t.get("role") == role and t.get("stage") == "FINAL" and not t.get("interactive")
        ]


class EchoTools:
    """A ToolProvider for the seam (the ROS tools have their own tests): answers after
    ``delay`` s with its input, or waits until cancelled."""

    def __init__(self, delay: float = 0.05) -> None:
        self.delay = delay
        self.calls: list[ToolUse] = []
        self.cancelled = 0

    def tool_specs(self) -> list[dict[str, Any]]:
        return [
            ev.tool_spec(
                "navigate_to",
                "Drive to a place.",
                {"type": "object", "properties": {"location": {"type": "string"}}},
            )
        ]

    async def run(self, use: ToolUse, progress: Any) -> ToolResult:
        self.calls.append(use)
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return ToolResult(use.tool_use_id, "ok", {"arrived": use.input.get("location")})

    async def cancel_all(self, reason: str) -> int:
        return 0


def settings(emu: SonicEmulator, secret: str = DEFAULT_SECRET_KEY, **kw: Any) -> BedrockSettings:
    return BedrockSettings(
        region="us-east-1",
        endpoint_uri=emu.endpoint_uri,
        ca_bundle=emu.ca_file,
        access_key_id=DEFAULT_ACCESS_KEY,
        secret_access_key=secret,
        open_timeout_s=10,
        **kw,
    )


@pytest.fixture
async def emu(request: pytest.FixtureRequest) -> AsyncIterator[SonicEmulator]:
    marker = request.node.get_closest_marker("scenario")
    scenario = marker.args[0] if marker else {"turns": []}
    kwargs = marker.kwargs if marker else {}
    server = SonicEmulator(scenario, **{"realtime": False, **kwargs})
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


async def feed(session: SonicSession, pcm: np.ndarray, realtime: float = 0.0) -> None:
    """Push ``pcm`` in 32 ms frames (``realtime`` > 0 paces them at that speed)."""
    for i in range(0, len(pcm) - len(pcm) % FRAME, FRAME):
        session.push_audio(pcm[i : i + FRAME])
        await asyncio.sleep(FRAME / RATE / realtime if realtime else 0.001)


def utterance(seconds: float = 1.0, seed: int = 1) -> np.ndarray:
    """Speech then 1 s of silence: the stand-in's end of utterance fires on it."""
    return np.concatenate(
        [np.zeros(RATE // 5, np.int16), speech_like(seconds, RATE, seed), np.zeros(RATE, np.int16)]
    )


async def until(pred: Any, limit: float = 15.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {limit} s")
        await asyncio.sleep(0.02)


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
async def test_whole_turn_audio_in_transcript_and_audio_out(emu: SonicEmulator) -> None:
    rec = Recorder()
    session = SonicSession(settings(emu), SessionConfig(), None, rec)
    await session.start()
    try:
        await feed(session, utterance())
        await until(lambda: "Hello! How can I help?" in rec.finals("ASSISTANT"))
        await until(lambda: "completionEnd" in emu.records[0].output_names or rec.audio)
        r = emu.records[0]
        assert r.signature_chain_ok, "SigV4 request + every chunk signature verified"
        assert r.event_names[:2] == ["sessionStart", "promptStart"]
        assert r.system_prompt.startswith("You are the voice")
        assert rec.finals("USER") == ["hello robot"]
        # Every byte of output audio the stand-in wrote reached the listener, as 24 kHz PCM.
        await until(lambda: len(rec.audio) == r.audio_out_bytes)
        assert len(rec.audio) == int(0.6 * 24000) * 2
        tone = np.frombuffer(bytes(rec.audio), "<i2").astype(float)
        spectrum = np.abs(np.fft.rfft(tone))
        assert abs(np.argmax(spectrum) * 24000 / len(tone) - 440) < 5
        # What we sent is what the stand-in decoded, sample for sample.
        assert r.audio_frames > 0 and r.audio_bytes == r.audio_frames * FRAME * 2
        assert "speaking" in rec.states and "thinking" in rec.states
        await until(lambda: rec.usage)
    finally:
        await session.stop()
    assert emu.records[0].end_reason in ("sessionEnd", "input-ended")
    assert emu.records[0].event_names[-3:] == ["contentEnd", "promptEnd", "sessionEnd"]


@pytest.mark.scenario(
    {
        "turns": [
            {
                "on": "speech",
                "user": "take me to the lobby",
                "tool": {"name": "navigate_to", "input": {"location": "lobby"}},
                "say": "We are at the lobby.",
                "audio": {"tone": {"freq": 300, "duration_s": 0.3}},
            },
            {
                "on": "speech",
                "user": "and now the lift",
                "tool": {
                    "name": "navigate_to",
                    "input": {"location": "lift"},
                    "double_encode": True,
                },
                "say": "Here is the lift.",
                "audio": "none",
            },
        ]
    }
)
async def test_tool_round_trip_while_audio_flows(emu: SonicEmulator) -> None:
    rec = Recorder()
    tools = EchoTools(delay=0.5)
    session = SonicSession(settings(emu), SessionConfig(), tools, rec)
    await session.start()
    try:
        await until(lambda: emu.records and emu.records[0].prompt_start)
        spec = emu.records[0].prompt_start["toolConfiguration"]["tools"][0]["toolSpec"]
        assert spec["name"] == "navigate_to"
        await feed(session, utterance(seed=2))
        # Audio keeps flowing while the tool runs: the stream never stalls on a tool.
        before = emu.records[0].audio_frames
        await until(lambda: tools.calls)
        await feed(session, np.zeros(RATE // 4, np.int16))
        assert emu.records[0].audio_frames > before
        await until(lambda: emu.records[0].tool_results)
        res = emu.records[0].tool_results[0]
        assert res.tool_name == "navigate_to"
        assert res.parsed == {"status": "ok", "arrived": "lobby"}
        await until(lambda: "We are at the lobby." in rec.finals("ASSISTANT"))
        # A double-encoded input arrives as an object all the same.
        await feed(session, utterance(seed=3))
        await until(lambda: len(emu.records[0].tool_results) == 2)
        assert tools.calls[1].input == {"location": "lift"}
        assert [e["event"] for e in rec.tool_events] == ["start", "result"] * 2
    finally:
        await session.stop()


@pytest.mark.scenario(
    {
        "turns": [
            {
                "on": "speech",
                "user": "tell me a story",
                "say": "Once upon a time there was a robot.",
                "audio": {"tone": {"freq": 500, "duration_s": 8.0}},
            }
        ],
        # As a real service may: 0.5 s more of the interrupted answer after the marker.
        "audio": {"after_interrupt_ms": 500},
    },
    realtime=True,
)
async def test_barge_in_signals_interrupted_and_drops_the_rest(emu: SonicEmulator) -> None:
    rec = Recorder()
    at_marker: list[int] = []
    on_interrupted = rec.on_interrupted

    def note() -> None:
        at_marker.append(len(rec.audio))
        on_interrupted()

    rec.on_interrupted = note  # type: ignore[method-assign]
    session = SonicSession(settings(emu), SessionConfig(), None, rec)
    await session.start()
    try:
        await feed(session, utterance(seed=4), realtime=4.0)
        await until(lambda: len(rec.audio) > 24000)  # > 0.5 s of the answer arrived
        await feed(session, speech_like(0.8, RATE, seed=5), realtime=1.0)  # talk over it
        await until(lambda: rec.interrupted >= 1)
        assert emu.records[0].barge_ins == 1
        await until(lambda: "completionEnd" in emu.records[0].output_names)
        await asyncio.sleep(0.2)
        heard = len(rec.audio)
        assert emu.records[0].audio_after_interrupt_bytes == 2 * 12000, "the stand-in kept on"
        assert heard == at_marker[0], "audio after the barge-in marker is dropped"
        assert heard < 8.0 * 24000 * 2
        assert session.barge_ins == 1, emu.records[0].output_names
    finally:
        await session.stop()


@pytest.mark.scenario(
    {
        "turns": [
            {"on": "text", "say": "Welcome! I am the help robot.", "audio": "none"},
            {"on": "text", "say": "The café is on the second floor.", "audio": "none"},
        ]
    }
)
async def test_cross_modal_text_nova2(emu: SonicEmulator) -> None:
    rec = Recorder()
    cfg = SessionConfig(greeting="Greet the visitor.")
    session = SonicSession(settings(emu), cfg, None, rec)
    await session.start()
    try:
        await until(lambda: "Welcome! I am the help robot." in rec.finals("ASSISTANT"))
        talk = asyncio.create_task(feed(session, np.zeros(RATE, np.int16), realtime=1.0))
        await asyncio.sleep(0.3)
        await session.send_text("Where is the café?")
        await until(lambda: "The café is on the second floor." in rec.finals("ASSISTANT"))
        await talk
        assert emu.records[0].interactive_texts == ["Greet the visitor.", "Where is the café?"]
        # The text block went in while audio flowed, and no audio frame landed inside it.
        events = emu.records[0].events
        open_text, audio_inside, audio_before = None, 0, 0
        for e in events:
            if e.name == "contentStart" and e.body.get("type") == "TEXT":
                open_text = e.body["contentName"]
            elif e.name == "contentEnd" and e.body.get("contentName") == open_text:
                open_text = None
            elif e.name == "audioInput":
                audio_inside += open_text is not None
            elif e.name == "textInput" and "café" in e.body.get("content", ""):
                audio_before = sum(x.name == "audioInput" for x in events[: events.index(e)])
        assert audio_inside == 0
        assert audio_before > 0
    finally:
        await session.stop()


async def test_cross_modal_text_refused_on_v1(emu: SonicEmulator) -> None:
    cfg = SessionConfig(model_id=ev.NOVA_SONIC_V1, voice_id="matthew")
    session = SonicSession(settings(emu, model_id=ev.NOVA_SONIC_V1), cfg, None, Recorder())
    await session.start()
    try:
        with pytest.raises(ValueError, match="takes no text input"):
            await session.send_text("hi")
    finally:
        await session.stop()


def tagged_frames(n: int, start: int = 0) -> list[np.ndarray]:
    """Quiet frames whose first two samples carry their number (below the VAD threshold)."""
    out = []
    for i in range(start, start + n):
        f = np.zeros(FRAME, np.int16)
        f[0], f[1] = 1 + i % 997, 1 + i // 997
        out.append(f)
    return out


def frame_ids(pcm: bytes | bytearray) -> set[int]:
    a = np.frombuffer(bytes(pcm), "<i2").reshape(-1, FRAME)
    return {int(r[1] - 1) * 997 + int(r[0] - 1) for r in a if r[0] > 0}


@pytest.mark.scenario(
    {
        "turns": [
            {
                "on": "text",
                "user": "my name is Ana",
                "say": "Nice to meet you, Ana.",
                "audio": "none",
            }
        ]
    }
)
async def test_rotation_replays_history_and_loses_no_audio(emu: SonicEmulator) -> None:
    rec = Recorder()
    cfg = SessionConfig(rotate_after_s=2.0, rotate_deadline_s=3.0, boundary_quiet_s=0.3)
    session = SonicSession(settings(emu), cfg, None, rec)
    await session.start()
    try:
        await session.send_text("my name is Ana")
        await until(lambda: "Nice to meet you, Ana." in rec.finals("ASSISTANT"))
        frames = tagged_frames(300)  # 9.6 s, real time: spans at least two rotations
        for f in frames:
            session.push_audio(f)
            await asyncio.sleep(FRAME / RATE)
        await until(lambda: session.rotations >= 2, limit=10)
        await feed(session, np.zeros(RATE // 2, np.int16))
    finally:
        await session.stop()
    recs = emu.records
    assert len(recs) >= 3
    # History replayed on the new streams, as the service wants it (USER first, alternating).
    for r in recs[1:]:
        assert r.history[:2] == [
            ("USER", "my name is Ana"),
            ("ASSISTANT", "Nice to meet you, Ana."),
        ]
        assert r.signature_chain_ok
    # Zero user audio frames lost across the handovers (counted at the stand-in).
    seen: set[int] = set()
    for r in recs:
        seen |= frame_ids(r.pcm)
    missing = set(range(300)) - seen
    assert not missing, f"{len(missing)} frames never reached the service: {sorted(missing)[:10]}"
    assert session.frames_dropped == 0


RECOVERABLE = [
    "modelTimeoutException",
    "modelStreamErrorException",
    "internalServerException",
    "serviceUnavailableException",
    "throttlingException",
    "systemInstability",
    "silenceTimeout",
    "reset",
]


@pytest.mark.parametrize("fault", RECOVERABLE)
@pytest.mark.scenario(
    {"turns": [{"on": "text", "user": "hi", "say": "Hello there.", "audio": "none"}]}
)
async def test_recoverable_fault_reconnects_with_history(emu: SonicEmulator, fault: str) -> None:
    rec = Recorder()
    session = SonicSession(settings(emu), SessionConfig(), None, rec)
    await session.start()
    try:
        await session.send_text("hi")
        await until(lambda: "Hello there." in rec.finals("ASSISTANT"))
        emu.inject(fault)
        await until(lambda: session.recoveries == 1, limit=20)
        await feed(session, tagged_frames(1, start=5)[0])
        await until(lambda: len(emu.records) >= 2 and emu.records[-1].audio_frames > 0)
        assert emu.records[-1].history[:2] == [("USER", "hi"), ("ASSISTANT", "Hello there.")]
        assert session.fatal_error is None
        assert any(not fatal for _, fatal in rec.errors)
    finally:
        await session.stop()


@pytest.mark.parametrize(
    ("fault", "words"),
    [
        ("accessDenied", "access denied"),
        ("resourceNotFound", "model not found"),
        ("serviceQuotaExceeded", "ServiceQuotaExceeded"),
    ],
)
async def test_unrecoverable_fault_stops_with_clear_error(
    emu: SonicEmulator, fault: str, words: str
) -> None:
    emu.inject({"kind": fault, "count": 10})
    rec = Recorder()
    session = SonicSession(settings(emu), SessionConfig(), None, rec)
    with pytest.raises(SonicStreamError) as info:
        await session.start()
    assert words in str(info.value)
    assert info.value.recoverable is False
    assert len(emu.records) == 1, "no retry storm on an unrecoverable error"
    assert rec.errors and rec.errors[-1][1] is True


async def test_wrong_secret_key_is_an_authentication_error(emu: SonicEmulator) -> None:
    rec = Recorder()
    session = SonicSession(settings(emu, secret="not-the-secret"), SessionConfig(), None, rec)
    with pytest.raises(SonicStreamError) as info:
        await session.start()
    assert info.value.kind in ("InvalidSignatureException", "UnrecognizedClientException")
    assert "secret" in str(info.value) or "signature" in str(info.value)
    assert emu.records[0].request_signature_ok is False
    assert len(emu.records) == 1
