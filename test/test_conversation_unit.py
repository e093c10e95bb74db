"""The conversation lifecycle (``sonic_voice.sonic.conversation``) in milliseconds: the
pure ``Conversation`` against the in-process fake stream (``emulators/sonic/fake.py``,
the stand-in's protocol rules) through SonicSession's ``opener`` hook, with a recording
host instead of the node. test_engagement_node.py proves the same through a ROS graph and
the HTTP/2 stand-in; these pin the order of things: the pre-roll before live audio, the
goodbye before the close, the released figures, a trigger while closing."""

from __future__ import annotations

import asyncio
from typing import Any

import numpy as np
import pytest

from sonic_voice.emulators.sonic.fake import FakeService, FakeStream
from sonic_voice.sonic import engagement as eng
from sonic_voice.sonic.conversation import Conversation, ConversationConfig
from sonic_voice.sonic.session import SessionConfig
from sonic_voice.sonic.transport import BedrockSettings

from test.test_sonic_session import FRAME, Recorder, tagged_frames

pytestmark = pytest.mark.timeout(60)

GOODBYE = "Please say goodbye."


class Host:
    """The node's side of ``ConversationHost``, recorded."""

    def __init__(self) -> None:
        self.fatal_error: str | None = None
        self.rec = Recorder()
        self.states: list[str | None] = []
        self.events: list[dict[str, Any]] = []
        self.hourly: list[dict[str, Any]] = []
        self.logs: list[str] = []
        self.failures: list[Exception] = []

    def listener(self) -> Recorder:
        return self.rec

    def publish_state(self, state: str | None = None) -> None:
        self.states.append(state)

    def publish_conversation(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def publish_hourly(self, report: dict[str, Any]) -> None:
        self.hourly.append(report)

    def log(self, message: str) -> None:
        self.logs.append(message)

    def start_failed(self, error: Exception) -> None:
        self.failures.append(error)
        self.fatal_error = str(error)


async def until(pred: Any, limit: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {limit} s")
        await asyncio.sleep(0.002)


def ordered_ids(pcm: bytes | bytearray) -> list[int]:
    """The tagged frames' numbers in the order the stream received them (silence skipped)."""
    a = np.frombuffer(bytes(pcm), "<i2").reshape(-1, FRAME)
    return [int(r[1] - 1) * 997 + int(r[0] - 1) for r in a if r[0] > 0]


def start(svc: FakeService, **cfg: Any) -> tuple[Conversation, Host]:
    host = Host()
    conv = Conversation(host, opener=svc.open)
    conv.config = ConversationConfig(
        session=SessionConfig(), bedrock=BedrockSettings(), check_on_start=False, **cfg
    )
    loop = asyncio.get_running_loop()
    conv.activate(asyncio.ensure_future, loop.call_soon)
    return conv, host


async def converse(conv: Conversation, svc: FakeService, trigger: str = "service") -> FakeStream:
    conv.engage(trigger)
    stream = await svc.wait_streams(len(svc.streams) + (0 if svc.streams else 1))
    await until(lambda: conv.eng.phase == eng.CONVERSING)
    return stream


async def answer(stream: FakeStream, text: str) -> None:
    stream.start_completion()
    stream.text("ASSISTANT", text)
    stream.end_completion()
    await asyncio.sleep(0)


async def test_engage_opens_a_stream_with_the_preroll_first() -> None:
    svc = FakeService()
    conv, host = start(svc, fill_silence=False)
    try:
        for f in tagged_frames(40):  # 1.28 s while idle: quiet, the VAD does not engage
            conv.push_audio(f.tobytes())
        await asyncio.sleep(0.05)
        assert svc.opens == 0 and conv.eng.phase == eng.IDLE
        conv.engage("service")
        # preroll_lead_s 0.3 s = 9.4 frames before the end: frames 30..39 (and no more).
        assert conv.preroll_frames_sent == 10
        assert conv.eng.phase == eng.ENGAGING
        for f in tagged_frames(20, start=40):  # live, while the stream is still opening
            conv.push_audio(f.tobytes())
            await asyncio.sleep(0)
        stream = await svc.wait_streams(1)
        await until(lambda: len(stream.rec.pcm) >= 30 * FRAME * 2)
        assert ordered_ids(stream.rec.pcm) == list(range(30, 60))
        await until(lambda: conv.eng.phase == eng.CONVERSING)
        assert host.events == [
            {"t": host.events[0]["t"], "event": "engaged", "trigger": "service", "memory": 0}
        ]
        assert len(host.hourly) == 1 and host.hourly[0]["conversations"] >= 0
        assert host.logs[0] == "engaged by service: opening a stream (10 pre-roll chunks)"
    finally:
        await conv.stop()
    assert host.states[-1] == "inactive" and conv.session is None
    assert host.events[-1]["event"] == "released" and host.events[-1]["reason"] == "shutdown"


async def test_release_says_goodbye_then_closes_and_publishes_the_figures() -> None:
    svc = FakeService()
    conv, host = start(svc, goodbye=GOODBYE)
    try:
        stream = await converse(conv, svc)
        conv.release("service")
        assert conv.eng.phase == eng.CLOSING
        await until(lambda: stream.rec.interactive_texts == [GOODBYE])
        await asyncio.sleep(0.2)  # the goodbye's answer is awaited: the stream stays open
        assert not stream.ended
        assert [e["event"] for e in host.events] == ["engaged"]
        await answer(stream, "Goodbye, see you soon.")
        await until(lambda: len(host.events) == 2)
        assert stream.rec.event_names[-3:] == ["contentEnd", "promptEnd", "sessionEnd"]
        released = host.events[1]
        assert released["event"] == "released" and released["reason"] == "service"
        assert released["trigger"] == "service"
        assert 0.2 < released["streamed_s"] < 5.0
        assert {"input_tokens", "output_tokens", "cost_usd"} <= released.keys()
        assert conv.last_conversation["reason"] == "service"
        assert conv.session is None and conv.eng.phase == eng.IDLE
        assert host.states[-1] == "idle"
        assert host.hourly[-1]["conversations"] == 1  # published at the release too
        assert host.logs[-1].startswith("conversation released (service): ")
    finally:
        await conv.stop()
    assert svc.opens == 1


async def test_a_trigger_while_closing_engages_again_with_the_memory() -> None:
    svc = FakeService()
    conv, host = start(svc, goodbye=GOODBYE)
    try:
        first = await converse(conv, svc)
        first.start_completion()
        first.text("USER", "my name is Ana")
        first.text("ASSISTANT", "Hello Ana.")
        first.end_completion()
        await until(lambda: host.rec.finals("ASSISTANT") == ["Hello Ana."])
        conv.release("service")
        await until(lambda: first.rec.interactive_texts == [GOODBYE])
        conv.engage("viewer")  # someone joins while the goodbye is said
        await asyncio.sleep(0.1)
        assert svc.opens == 1 and conv.eng.phase == eng.CLOSING
        await answer(first, "Goodbye.")
        second = await svc.wait_streams(2)
        await until(lambda: conv.eng.phase == eng.CONVERSING)
        assert first.rec.end_reason == "sessionEnd"
        assert [(e["event"], e["trigger"]) for e in host.events] == [
            ("engaged", "service"),
            ("released", "service"),
            ("engaged", "viewer"),
        ]
        assert host.events[2]["memory"] >= 2
        assert ("USER", "my name is Ana") in second.rec.history
    finally:
        await conv.stop()


async def test_the_idle_timeout_releases() -> None:
    svc = FakeService()
    conv, host = start(svc)
    conv.eng.config = eng.EngagementConfig(idle_timeout_s=0.3)
    try:
        stream = await converse(conv, svc, "speech")
        await until(lambda: len(host.events) == 2, 3.0)
        assert host.events[1]["reason"] == "timeout"
        assert stream.rec.end_reason == "sessionEnd"
        assert conv.eng.phase == eng.IDLE and conv.session is None
    finally:
        await conv.stop()
