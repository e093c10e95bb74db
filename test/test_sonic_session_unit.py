"""SonicSession logic in milliseconds: the session against the in-process fake stream
(``emulators/sonic/fake.py``, the same protocol rules as the HTTP/2 stand-in) through its
``opener`` hook. The slow tests in test_sonic_session.py prove the wiring through the real
SDK; these pin the behaviour: retry budget, polite close, tool timeouts, split samples,
rotation replay, the interrupted-audio filter."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
from typing import Any

import numpy as np
import pytest

from sonic_voice.emulators.sonic.fake import FakeService, FakeStream
from sonic_voice.sonic import events as ev
from sonic_voice.sonic.retry import RetryPolicy
from sonic_voice.sonic.session import SessionConfig, SonicSession
from sonic_voice.sonic.tools_seam import ToolResult, ToolUse
from sonic_voice.sonic.transport import BedrockSettings, SonicStreamError

from test.test_sonic_session import FRAME, Recorder, frame_ids, tagged_frames

pytestmark = pytest.mark.timeout(60)

FAST = {"retry_base_s": 0.01, "retry_cap_s": 0.05}


def make(service: FakeService, tools: Any = None, **cfg: Any) -> tuple[SonicSession, Recorder]:
    rec = Recorder()
    session = SonicSession(BedrockSettings(), SessionConfig(**cfg), tools, rec, opener=service.open)
    return session, rec


async def until(pred: Any, limit: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {limit} s")
        await asyncio.sleep(0.002)


async def push(session: SonicSession, frames: list[np.ndarray]) -> None:
    for f in frames:
        session.push_audio(f)
        await asyncio.sleep(0)


class SlowTool:
    """A tool that takes ``delay`` s and records whether its task saw cancellation."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.cancelled = 0
        self.finished = 0

    def tool_specs(self) -> list[dict[str, Any]]:
        return [ev.tool_spec("navigate_to", "Drive.", {"type": "object"})]

    async def run(self, use: ToolUse, progress: Any) -> ToolResult:
        try:
            await asyncio.sleep(self.delay)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.finished += 1
        return ToolResult(use.tool_use_id, "ok", {"done": True})

    async def cancel_all(self, reason: str) -> int:
        return 0


# ----------------------------------------------------------------- retry policy (item 1, 2)
def test_retry_policy_backs_off_and_spends_its_budget() -> None:
    p = RetryPolicy(budget=5, base_s=0.5, cap_s=10.0, jitter=0.0)
    delays = [p.failure("internalServerException: boom") for _ in range(6)]
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, None]
    assert "6 consecutive failures" in p.fatal_message()
    assert "internalServerException: boom" in p.fatal_message()
    t = RetryPolicy(budget=5, jitter=0.0)
    assert [t.failure("throttled", throttled=True) for _ in range(5)] == [1, 2, 4, 8, 10]
    j = RetryPolicy(budget=50, jitter=0.5)
    for n in range(1, 50):
        d = j.failure("x")
        assert d is not None and 0.5 * j.delay_for(n, False) <= d <= j.delay_for(n, False)
    h = RetryPolicy(budget=2, healthy_after_s=30.0)
    h.failure("a"), h.failure("b")
    h.seen_alive(29.0)
    assert h.failures == 2
    h.seen_alive(30.0)
    assert h.failures == 0


async def test_streams_dying_after_open_count_against_the_budget() -> None:
    """Item 1: every new stream fails after 3 audio frames; before the fix the count
    restarted at each recovery (the open itself succeeds) and the session never stopped."""
    svc = FakeService()
    session, rec = make(svc, max_retries=4, **FAST)
    await session.start()
    try:
        svc.fail_every_stream("internalServerException", after_frames=3)
        svc.current.fail("internalServerException")  # the stream in use dies too
        for i in range(400):
            session.push_audio(tagged_frames(1, start=i)[0])
            await asyncio.sleep(0.002)
            if session.fatal_error:
                break
        await until(lambda: session.fatal_error is not None)
    finally:
        await session.stop()
    assert svc.opens == 1 + 4, "the first stream, then one per allowed retry"
    msg = session.fatal_error or ""
    assert "5 consecutive failures" in msg, msg
    assert "InternalServerException" in msg, msg
    assert rec.errors[-1] == (msg, True)


async def test_open_failures_give_a_fatal_error_naming_the_cause() -> None:
    """Item 2: after repeated HTTP 500s the message names the cause, not just a count."""
    svc = FakeService()
    svc.fail_opens("httpInternalServer", count=10)
    session, _rec = make(svc, max_retries=3, **FAST)
    with pytest.raises(SonicStreamError):
        await session.start()
    assert svc.opens == 4
    msg = session.fatal_error or ""
    assert "4 consecutive failures" in msg and "InternalServerException" in msg, msg
    assert "unexpected error during processing" in msg, msg


async def test_a_completed_turn_clears_the_failure_count() -> None:
    svc = FakeService()
    session, _rec = make(svc, max_retries=2, **FAST)
    await session.start()
    try:
        for n in range(1, 6):  # 5 failures in a row would exceed 2 retries...
            svc.current.fail("modelStreamErrorException")
            s = await svc.wait_streams(n + 1)
            s.start_completion()  # ...but each new stream completes a turn first
            s.text("ASSISTANT", f"turn {n}")
            s.end_completion()
            await until(lambda: session.retry.failures == 0)
        assert session.fatal_error is None
        assert session.recoveries == 5
    finally:
        await session.stop()


async def test_throttling_backs_off_exponentially() -> None:
    svc = FakeService()
    session, _ = make(svc, max_retries=3, retry_cap_s=10.0)
    session.retry.throttle_base_s = 0.05
    session.retry.jitter = 0.0
    await session.start()
    try:
        svc.fail_every_stream("throttlingException", after_frames=0)
        svc.current.fail("throttlingException")
        for i in range(2000):
            session.push_audio(tagged_frames(1, start=i)[0])
            await asyncio.sleep(0.001)
            if session.fatal_error:
                break
    finally:
        await session.stop()
    gaps = np.diff(svc.open_times)
    # 0.05, 0.1, 0.2 s between the opens: each gap about twice the one before.
    assert len(gaps) == 3, gaps
    assert gaps[0] >= 0.045 and gaps[1] >= 0.095 and gaps[2] >= 0.195, gaps
    assert "ThrottlingException" in (session.fatal_error or "")


# ----------------------------------------------------------------- polite close (item 3)
async def test_failed_open_stream_gets_content_prompt_session_end() -> None:
    svc = FakeService()
    session, _ = make(svc, **FAST)
    await session.start()
    try:
        await push(session, tagged_frames(5))
        first = svc.current
        await until(lambda: first.rec.audio_frames == 5)
        first.fail("internalServerException")
        await svc.wait_streams(2)
        await until(lambda: first.rec.end_frame_received, limit=session.config.close_bound_s)
    finally:
        await session.stop()
    assert first.rec.late_names == ["contentEnd", "promptEnd", "sessionEnd"]
    late = first.rec.late_events
    audio_name = next(
        e.body["contentName"]
        for e in first.rec.events
        if e.name == "contentStart" and e.body.get("type") == "AUDIO"
    )
    assert late[0].body["contentName"] == audio_name, "the audio block is the one closed"
    assert late[1].body["promptName"] == first.rules.prompt_name


# ----------------------------------------------------------------- tool timeout (item 4, c)
async def test_tool_timeout_text_is_exact_and_the_tool_task_is_cancelled() -> None:
    svc = FakeService()
    tool = SlowTool(delay=5.0)
    session, _rec = make(svc, tools=tool, tool_timeout_s=0.25)
    await session.start()
    try:
        s = svc.current
        s.start_completion()
        s.tool_use("navigate_to", {"location": "lobby"})
        await until(lambda: s.rec.tool_results, limit=3)
    finally:
        await session.stop()
    res = s.rec.tool_results[0]
    assert res.parsed == {
        "status": "timeout",
        "error": "navigate_to did not finish within 0.25 s",
    }
    assert tool.cancelled == 1, "the timed-out tool's task must be cancelled, not left running"
    assert tool.finished == 0


# ----------------------------------------------------------------- split samples (item 5)
async def test_push_audio_carries_a_split_sample_to_the_next_chunk() -> None:
    svc = FakeService()
    session, _ = make(svc)
    await session.start()
    try:
        pcm = np.arange(FRAME * 4, dtype=np.int16).tobytes()
        cuts = [0, 3, 700, 701, 1500, 2047, len(pcm)]
        for a, b in itertools.pairwise(cuts):
            session.push_audio(pcm[a:b])  # odd-sized pieces: samples split across calls
        await until(lambda: svc.current.rec.audio_frames == 4)
    finally:
        await session.stop()
    assert bytes(svc.current.rec.pcm) == pcm


@pytest.mark.parametrize(
    "cuts",
    [
        [0, 2 * FRAME, 4 * FRAME, 6 * FRAME, 8 * FRAME],  # whole frames: sent as they came
        [0, 100, 100 + 2 * FRAME, 101 + 2 * FRAME, 101 + 4 * FRAME, 8 * FRAME],  # mid-frame
        [0, 1, 1 + 2 * FRAME, 2 + 4 * FRAME, 8 * FRAME],  # a split sample, then whole-sized
    ],
)
async def test_whole_frames_and_pieces_give_the_same_audio(cuts: list[int]) -> None:
    """A whole frame skips re-framing only when nothing is held back (samples, a byte)."""
    svc = FakeService()
    session, _ = make(svc)
    await session.start()
    try:
        pcm = np.arange(FRAME * 4, dtype=np.int16).tobytes()
        for a, b in itertools.pairwise(cuts):
            session.push_audio(pcm[a:b])
        await until(lambda: svc.current.rec.audio_frames == 4)
    finally:
        await session.stop()
    assert bytes(svc.current.rec.pcm) == pcm


async def test_audio_queued_on_a_failing_stream_goes_to_the_next_one() -> None:
    """Found by the soak: more than replay_s of audio queued on a stream when it fails (a
    burst after a stall, or the backlog flushed into a stream that fails right after a
    recovery). Replaying only the last replay_s of pushed audio lost the rest; what the
    stream sent in its last replay_s and what it never sent must go to the next stream."""
    svc = FakeService()
    session, _ = make(svc, **FAST)
    await session.start()
    try:
        await push(session, tagged_frames(10))
        await until(lambda: svc.current.rec.audio_frames == 10)
        svc.current.fail("internalServerException")
        for f in tagged_frames(100, start=10):  # 3.2 s queued before anyone notices
            session.push_audio(f)
        second = await svc.wait_streams(2)
        await until(lambda: 110 <= second.rec.audio_frames)
    finally:
        await session.stop()
    seen = frame_ids(svc.streams[0].rec.pcm) | frame_ids(second.rec.pcm)
    assert seen == set(range(110)), f"lost: {sorted(set(range(110)) - seen)[:12]}..."


# ----------------------------------------------------------------- rotation replay (a)
async def test_rotation_new_stream_begins_with_the_old_streams_tail() -> None:
    svc = FakeService()
    session, _ = make(svc, replay_s=0.32)  # 10 frames of 32 ms
    await session.start()
    try:
        await push(session, tagged_frames(40))
        await until(lambda: svc.current.rec.audio_frames == 40)
        await session.rotate()
        await push(session, tagged_frames(5, start=40))
        new = await svc.wait_streams(2)
        await until(lambda: new.rec.audio_frames >= 15)
    finally:
        await session.stop()
    ids = [
        int(r[1] - 1) * 997 + int(r[0] - 1)
        for r in np.frombuffer(bytes(new.rec.pcm), "<i2").reshape(-1, FRAME)
    ]
    assert ids[:10] == list(range(30, 40)), f"stream 2 must begin with stream 1's tail: {ids}"
    assert ids[10:15] == list(range(40, 45))
    assert frame_ids(svc.streams[0].rec.pcm) == set(range(40))


# ----------------------------------------------------------------- interrupted audio (b)
async def test_audio_after_the_interruption_marker_never_reaches_the_listener() -> None:
    svc = FakeService()
    session, rec = make(svc)
    heard_at_interrupt: list[int] = []
    rec_on_interrupted = rec.on_interrupted

    def on_interrupted() -> None:
        heard_at_interrupt.append(len(rec.audio))
        rec_on_interrupted()

    rec.on_interrupted = on_interrupted  # type: ignore[method-assign]
    await session.start()
    try:
        s = svc.current
        s.start_completion()
        cid = s.audio_start()
        for _ in range(5):
            s.audio(cid, b"\x01\x00" * 960)
        s.interruption_marker()
        for _ in range(5):  # the service keeps sending the interrupted answer
            s.audio(cid, b"\x02\x00" * 960)
        s.audio_end(cid, "INTERRUPTED")
        s.end_completion("INTERRUPTED")
        await until(lambda: "completionEnd" in s.rec.output_names and session.state != "speaking")
        await asyncio.sleep(0.01)
    finally:
        await session.stop()
    assert rec.interrupted == 1
    assert heard_at_interrupt == [5 * 1920]
    assert len(rec.audio) == 5 * 1920, "audio after the marker must be dropped"
    assert b"\x02\x00" not in bytes(rec.audio)


# ----------------------------------------------------------------- strict fake (d)
async def test_fake_refuses_prompt_start_without_tool_use_output_configuration() -> None:
    svc = FakeService()
    s = await svc.open(BedrockSettings())
    await s.send(ev.session_start())
    body = ev.prompt_start("p", "tiffany", 24000, [ev.tool_spec("t", "d", {"type": "object"})])
    doc = json.loads(body)
    del doc["event"]["promptStart"]["toolUseOutputConfiguration"]
    await s.send(json.dumps(doc).encode())
    with pytest.raises(Exception, match="toolUseOutputConfiguration") as info:
        await s.receive()
    assert type(info.value).__name__ == "ValidationException"


async def test_unit_layer_is_fast(caplog: pytest.LogCaptureFixture) -> None:
    """A session start, 100 frames, a turn and a stop: milliseconds, not seconds."""
    caplog.set_level(logging.WARNING)
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    svc = FakeService()
    session, rec = make(svc)
    await session.start()
    await push(session, tagged_frames(100))
    s: FakeStream = svc.current
    s.start_completion()
    s.text("ASSISTANT", "hello")
    s.end_completion()
    await until(lambda: rec.finals("ASSISTANT") == ["hello"])
    await session.stop()
    assert loop.time() - t0 < 2.0  # ~20 ms here; generous for a loaded 2-core machine
    assert svc.current.rec.event_names[-3:] == ["contentEnd", "promptEnd", "sessionEnd"]
