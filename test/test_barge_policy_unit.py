"""The session's barge-in policy and result holding in milliseconds (issue 15), against the
in-process fake stream (``emulators/sonic/fake.py``, the stand-in's protocol rules).

- a barge-in cancels only tools whose ``cancel_on_barge_in`` is true; unset follows
  ``cancel_tools_on_barge_in`` (default false);
- a result that lands during a barge-in waits until the visitor's turn is recognized, and
  no longer than ``result_hold_max_s`` when no turn follows (a cough, an echo);
- a stream renewal waits for the model's answer to a result it just got.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from sonic_voice.emulators.sonic.fake import FakeService
from sonic_voice.sonic.session import SessionConfig, SonicSession
from sonic_voice.sonic.tools_seam import ToolResult, ToolUse
from sonic_voice.sonic.transport import BedrockSettings

from test.test_sonic_session import Recorder

pytestmark = pytest.mark.timeout(60)


class FlaggedTools:
    """Tools with per-tool ``cancel_on_barge_in`` (True, False or None = unset), running
    until cancelled or ``release`` is set; the provider API the session uses."""

    def __init__(self, flags: dict[str, bool | None]) -> None:
        self.flags = flags
        self.running: dict[str, tuple[str, asyncio.Event]] = {}
        self.cancelled: list[tuple[str, str]] = []
        self.release = asyncio.Event()

    def tool_specs(self) -> list[dict[str, Any]]:
        from sonic_voice.sonic import events as ev

        return [ev.tool_spec(n, "A tool.", {"type": "object"}) for n in self.flags]

    def running_tools(self) -> list[dict[str, Any]]:
        return [{"tool_use_id": i, "tool": n, "cancel_on_barge_in": self.flags[n]}
                for i, (n, _e) in self.running.items()]  # fmt: skip

    async def run(self, use: ToolUse, progress: Any) -> ToolResult:
        stop = asyncio.Event()
        self.running[use.tool_use_id] = (use.name, stop)
        try:
            done = asyncio.ensure_future(self.release.wait())
            halt = asyncio.ensure_future(stop.wait())
            await asyncio.wait([done, halt], return_when=asyncio.FIRST_COMPLETED)
            done.cancel()
            halt.cancel()
            if stop.is_set():
                return ToolResult(use.tool_use_id, "cancelled", {"error": "stopped"})
            return ToolResult(use.tool_use_id, "ok", {"done": use.name})
        finally:
            self.running.pop(use.tool_use_id, None)

    async def cancel(self, which: str, reason: str, wait: bool = True) -> int:
        name, stop = self.running[which]
        self.cancelled.append((name, reason))
        stop.set()
        return 1

    async def cancel_all(self, reason: str) -> int:
        return 0


def make(service: FakeService, tools: Any, **cfg: Any) -> SonicSession:
    return SonicSession(
        BedrockSettings(), SessionConfig(**cfg), tools, Recorder(), opener=service.open
    )


async def until(pred: Any, limit: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + limit
    while not pred():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"condition not met within {limit} s")
        await asyncio.sleep(0.002)


def texts_of(stream: Any) -> list[str]:
    return [e.body.get("content", "") for e in stream.rec.events if e.name == "textInput"]


def barge_in(s: Any) -> None:
    """The robot speaks, the visitor talks over it (the service's marker)."""
    s.start_completion()
    cid = s.audio_start()
    s.audio(cid, b"\x01\x00" * 960)
    s.interruption_marker()
    s.audio_end(cid, "INTERRUPTED")
    s.end_completion("INTERRUPTED")


@pytest.mark.parametrize("default", [False, True])
async def test_barge_in_cancels_only_tools_that_ask_for_it(default: bool) -> None:
    svc = FakeService()
    tools = FlaggedTools({"navigate": None, "lights": False, "read_news": True})
    session = make(svc, tools, cancel_tools_on_barge_in=default)
    await session.start()
    try:
        s = svc.current
        s.start_completion()
        for name in tools.flags:
            s.tool_use(name, {})
        s.end_completion("TOOL_USE")
        await until(lambda: len(tools.running) == 3)
        barge_in(s)
        await until(lambda: session.barge_ins == 1)
        await asyncio.sleep(0.05)
        tools.release.set()
        await until(lambda: len(s.rec.tool_results) == 3)
    finally:
        await session.stop()
    assert session.listener.interrupted == 1
    expected = ["read_news", "navigate"] if default else ["read_news"]
    assert sorted(n for n, _ in tools.cancelled) == sorted(expected)
    assert all(r == "barge-in" for _, r in tools.cancelled)
    status = {r.tool_name: r.parsed["status"] for r in s.rec.tool_results}
    assert status["lights"] == "ok" and status["read_news"] == "cancelled"
    assert status["navigate"] == ("cancelled" if default else "ok")


async def test_a_result_during_a_barge_in_waits_for_the_visitors_turn() -> None:
    svc = FakeService()
    tools = FlaggedTools({"navigate": None})
    session = make(svc, tools, result_hold_max_s=3.0)
    await session.start()
    try:
        s = svc.current
        s.start_completion()
        s.tool_use("navigate", {})
        s.end_completion("TOOL_USE")
        await until(lambda: tools.running)
        barge_in(s)
        await until(lambda: session.barge_ins == 1)
        tools.release.set()  # the result lands while the visitor talks
        await asyncio.sleep(0.3)
        assert not s.rec.tool_results, "a result went out on top of the visitor"
        assert session.results_held == 1
        t0 = time.monotonic()
        s.start_completion()
        s.text("USER", "how far is it?")  # the visitor's turn is recognized
        await until(lambda: s.rec.tool_results, 2.0)
        took = time.monotonic() - t0
    finally:
        await session.stop()
    assert s.rec.tool_results[0].parsed == {"status": "ok", "done": "navigate"}
    assert took < 0.5, f"released {took:.2f} s after the visitor's turn"


async def test_a_held_result_goes_after_the_bound_when_no_turn_follows() -> None:
    svc = FakeService()
    tools = FlaggedTools({"navigate": None})
    session = make(svc, tools, result_hold_max_s=0.4)
    await session.start()
    try:
        s = svc.current
        s.start_completion()
        s.tool_use("navigate", {})
        s.end_completion("TOOL_USE")
        await until(lambda: tools.running)
        barge_in(s)  # a cough: no user turn follows
        await until(lambda: session.barge_ins == 1)
        t0 = time.monotonic()
        tools.release.set()
        await until(lambda: s.rec.tool_results, 3.0)
        took = time.monotonic() - t0
    finally:
        await session.stop()
    assert 0.2 <= took <= 1.5, took
    assert s.rec.tool_results[0].parsed["status"] == "ok"


async def test_no_renewal_before_the_model_answers_a_result() -> None:
    svc = FakeService()
    tools = FlaggedTools({"navigate": None})
    session = make(svc, tools, boundary_quiet_s=0.01)
    await session.start()
    try:
        s = svc.current
        s.start_completion()
        s.tool_use("navigate", {})
        s.end_completion("TOOL_USE")
        tools.release.set()
        await until(lambda: s.rec.tool_results)
        await asyncio.sleep(0.05)
        assert not session._at_boundary(), "renewing now would drop the model's answer"
        s.start_completion()
        cid = s.audio_start()  # the model answers the result
        s.audio(cid, b"\x01\x00" * 960)
        s.audio_end(cid)
        s.end_completion()
        await until(lambda: session.state == "listening")
        await asyncio.sleep(0.05)
        assert session._at_boundary()
    finally:
        await session.stop()


async def test_a_result_during_a_renewal_goes_to_the_new_stream() -> None:
    """The result lands while the new stream is being opened: it is held (the old stream,
    about to be replaced, would answer it into the void) and sent to the new one as text."""
    svc = FakeService()
    tools = FlaggedTools({"navigate": None})
    gate = asyncio.Event()

    async def opener(settings: Any) -> Any:
        if svc.opens >= 1:
            await gate.wait()  # the renewal's open takes a while
        return await svc.open(settings)

    session = SonicSession(BedrockSettings(), SessionConfig(), tools, Recorder(), opener=opener)
    await session.start()
    try:
        old = svc.current
        old.start_completion()
        old.tool_use("navigate", {})
        old.end_completion("TOOL_USE")
        await until(lambda: tools.running)
        renewal = asyncio.ensure_future(session.rotate())
        await until(lambda: session._rotating)
        tools.release.set()  # the result lands mid-renewal
        await asyncio.sleep(0.2)
        assert session.results_held == 1
        gate.set()
        await renewal
        new = await svc.wait_streams(2)
        await until(lambda: any("Result of the earlier navigate" in t for t in texts_of(new)))
    finally:
        gate.set()
        await session.stop()
    assert not old.rec.tool_results, "the result went to the stream being replaced"
    texts = texts_of(new)
    assert any('"status": "ok"' in t and '"done": "navigate"' in t for t in texts), texts
