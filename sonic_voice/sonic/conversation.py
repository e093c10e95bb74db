"""The conversation lifecycle, wired: engage, stream, release, close (pure asyncio).

``Conversation`` owns what a conversation is made of: the ``SonicSession`` (one per
engagement, or one for the node's life with ``always_on``), the start-up access check, the
phase machine (``engagement.Engagement``), the cost ``Ledger``, the idle ``PreRoll`` and the
local VAD. It runs on the process's asyncio loop and talks to its owner (the
``sonic_session`` node) only through ``ConversationHost``: publish the state, a conversation
event, the hour's usage, a log line, a failed start, and a listener for each new session.
So the node keeps ROS only (parameters, topics, services) and this logic is testable in
milliseconds against the fake stream (test/test_conversation_unit.py). What it does and
why: docs/conversation-lifecycle.md. Never imports rclpy (docs/architecture.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from sonic_voice import contracts as c
from sonic_voice.audio.vad import VadConfig, VoiceActivity
from sonic_voice.sonic import engagement as eng
from sonic_voice.sonic.session import SessionConfig, SessionListener, SonicSession
from sonic_voice.sonic.transport import BedrockSettings

STOP_TOOLS_S = 0.5  # of the shutdown budget: cancelling goals comes first
GOODBYE_MAX_S = 10.0  # a goodbye that does not end by then is cut (the stream closes)
HOURLY_EVERY_S = 10.0  # usage/hourly while a stream is open


class ConversationHost(Protocol):
    """What a ``Conversation`` needs from its owner (the node), all called on the loop
    except ``publish_state``/``log`` from ``Conversation.activate`` (the caller's thread)."""

    fatal_error: str | None

    def listener(self) -> SessionListener:
        """A listener for a new session's output (audio, transcripts, usage, errors)."""
        ...

    def publish_state(self, state: str | None = None) -> None:
        """Publish ``state`` (``None``: the current one again, the phase has changed)."""
        ...

    def publish_conversation(self, event: dict[str, Any]) -> None:
        """An ``engaged`` / ``released`` event (contract ``conversation``)."""
        ...

    def publish_hourly(self, report: dict[str, Any]) -> None:
        """The hour's usage (contract ``usage/hourly``)."""
        ...

    def log(self, message: str) -> None:
        """An info line."""
        ...

    def start_failed(self, error: Exception) -> None:
        """A stream (or the access check) could not start: report it (fatal)."""
        ...


@dataclass
class ConversationConfig:
    """The lifecycle's settings (the node's parameters of the same names)."""

    session: SessionConfig = field(default_factory=SessionConfig)
    bedrock: BedrockSettings = field(default_factory=BedrockSettings)
    always_on: bool = False
    check_on_start: bool = True
    engage_on_speech: bool = True
    greet_on: tuple[str, ...] = ("topic", "service", "viewer")
    goodbye: str = ""
    fill_silence: bool = True
    echo_tail_s: float = 0.5
    preroll_s: float = 2.0
    vad: VadConfig = field(default_factory=VadConfig)


class _Tracked(SessionListener):
    """The host's listener, plus what the lifecycle learns from a session's output: speech
    and tools on either side (idle timer, echo gate), usage (ledger), finished answers
    (the goodbye's end)."""

    def __init__(self, conv: Conversation, inner: SessionListener) -> None:
        self.conv = conv
        self.inner = inner

    def on_audio(self, pcm: bytes) -> None:
        self.inner.on_audio(pcm)
        self.conv.eng.robot_audio(len(pcm) / 2 / c.OUT_RATE)

    def on_interrupted(self) -> None:
        self.inner.on_interrupted()
        self.conv.eng.robot_interrupted()

    def on_transcript(self, entry: dict[str, Any]) -> None:
        self.inner.on_transcript(entry)
        self.conv.eng.activity()
        if entry.get("role") == "ASSISTANT" and entry.get("stage") == "FINAL":
            self.conv.assistant_finals += 1

    def on_state(self, state: str) -> None:
        self.inner.on_state(state)

    def on_usage(self, usage: dict[str, Any]) -> None:
        self.inner.on_usage(usage)
        self.conv.ledger.usage(usage)

    def on_tool_event(self, event: dict[str, Any]) -> None:
        self.inner.on_tool_event(event)
        if event.get("event") == "start":
            self.conv.eng.tool_started()
        elif event.get("event") == "result":
            self.conv.eng.tool_finished()
        else:
            self.conv.eng.activity()

    def on_error(self, message: str, fatal: bool) -> None:
        self.inner.on_error(message, fatal)


class _FatalOnly(SessionListener):
    """The access check's listener: only a fatal error is worth saying."""

    def __init__(self, inner: SessionListener) -> None:
        self.inner = inner

    def on_error(self, message: str, fatal: bool) -> None:
        if fatal:
            self.inner.on_error(message, fatal)


class _SpecsOnly:
    """A ToolProvider that declares the real tools and never runs or cancels one."""

    def __init__(self, tools: Any) -> None:
        self._tools = tools

    def tool_specs(self) -> list[dict[str, Any]]:
        return self._tools.tool_specs()

    async def run(self, use: Any, progress: Any) -> Any:
        from sonic_voice.sonic.tools_seam import ToolResult

        return ToolResult(use.tool_use_id, "error", {"error": "not in a conversation"})

    async def cancel_all(self, reason: str) -> int:
        return 0


class Conversation:
    """Engages on a trigger (pre-roll and memory replayed into a new stream), releases
    (polite goodbye), closes, watches the idle timeout and publishes the ledger's figures;
    a trigger while closing engages again once the stream is closed."""

    def __init__(
        self,
        host: ConversationHost,
        opener: Callable[[BedrockSettings], Any] | None = None,
    ) -> None:
        self.host = host
        self._opener = opener  # tests: the fake stream; None = the real transport
        self.config = ConversationConfig()
        self.tools: Any = None
        self.session: SonicSession | None = None
        self.session_task: Any = None
        self.active = False
        self.assistant_finals = 0
        self.preroll_frames_sent = 0  # of the last engagement
        self.last_conversation: dict[str, Any] = {}
        self.pending_texts: list[str] = []
        self.last_push = 0.0
        self._watch: asyncio.Future | None = None
        self._tasks: set[asyncio.Future] = set()
        self._check: SonicSession | None = None
        # The lifecycle machine and the cost ledger exist from the start (the listener and
        # diagnostics use them); the owner applies their settings when configured.
        self.eng = eng.Engagement(on_phase=self._on_phase)
        self.ledger = eng.Ledger()
        self.vad: VoiceActivity | None = None
        self.preroll = eng.PreRoll(2.0)

    # ------------------------------------------------------------------ sessions
    def _new_session(
        self, cfg: SessionConfig, tools: Any, listener: SessionListener
    ) -> SonicSession:
        kw = {} if self._opener is None else {"opener": self._opener}
        return SonicSession(self.config.bedrock, cfg, tools, listener, **kw)

    def _listener(self) -> SessionListener:
        return _Tracked(self, self.host.listener())

    # ------------------------------------------------------------------ activation
    def activate(self, submit: Callable[[Coroutine[Any, Any, Any]], Any], call: Any) -> None:
        """Any thread (never blocks): always_on opens the stream, else idle (with the access
        check). ``submit`` runs a coroutine on the loop, ``call`` a function."""
        cfg = self.config
        self.active = True
        self.pending_texts.clear()
        self.vad = VoiceActivity(cfg.vad, c.MIC_RATE)
        self.preroll = eng.PreRoll(cfg.preroll_s, c.MIC_RATE)
        self.eng.failed()  # idle, nothing pending
        if cfg.always_on:
            self.session = self._new_session(cfg.session, self.tools, self._listener())
            self.session_task = submit(self._run_session(self.session))
        else:
            self.host.publish_state("idle")
            if cfg.check_on_start:
                self.session_task = submit(self.check_access())
        self._watch = None
        call(self._start_watch)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _start_watch(self) -> None:
        if self.active and self._watch is None:
            self._watch = asyncio.ensure_future(self._lifecycle_watch())

    async def check_access(self) -> None:
        """One stream opened and closed at once (no audio): credentials, model access,
        region and endpoint are checked at start, as with always_on."""
        cfg = dataclasses.replace(self.config.session, greeting="")
        # The tools' specs go in the check's promptStart too (the service checks them); the
        # check never runs or cancels a tool (a conversation may already be running one).
        specs = _SpecsOnly(self.tools) if self.tools is not None else None
        check = self._check = self._new_session(cfg, specs, _FatalOnly(self.host.listener()))
        try:
            await check.start()
        except Exception as e:  # noqa: BLE001 - reported on state, log and diagnostics
            self.host.start_failed(e)
            self.host.publish_state("error")
            return
        finally:
            if self._check is check:
                self._check = None
            with contextlib.suppress(Exception):
                await check.stop()
        self.host.log("model access checked; idle until someone engages")

    async def _run_session(self, session: SonicSession) -> None:
        try:
            await session.start()
        except Exception as e:  # noqa: BLE001 - reported on state, log and diagnostics
            self.host.start_failed(e)
            if self.session is session:
                self.session = None
            self.eng.failed()
            self.host.publish_state("error")
            return
        if self.session is not session:
            return  # stopped while opening
        self.ledger.stream_opened()
        self.eng.opened()
        self._publish_hourly()
        texts, self.pending_texts = self.pending_texts, []
        for text in texts:
            await self.send_text(session, text)
        if self.config.fill_silence:
            await self._silence_filler(session)

    async def _silence_filler(self, session: SonicSession) -> None:
        """Nova Sonic expects a continuous stream; when the input stalls (device lost, no
        viewer yet) stream silence so server-side endpointing and timeouts behave."""
        frame = np.zeros(512, dtype=np.int16)
        while self.session is session:
            await asyncio.sleep(0.032)
            if time.monotonic() - self.last_push > 0.25 and self.session is session:
                session.push_audio(frame)

    async def send_text(self, session: SonicSession, text: str) -> None:
        with contextlib.suppress(RuntimeError):
            await session.send_text(text)

    # ------------------------------------------------------------------ input
    def push_audio(self, pcm: bytes) -> None:
        """On the loop: one frame of the active source into the session (conversing) or the
        pre-roll and the VAD (idle, closing; speech there engages)."""
        self.last_push = time.monotonic()
        if self.config.always_on:
            if self.session is not None:
                self.session.push_audio(pcm)
            return
        vad = self.vad
        start = vad.samples
        speaking = vad.process(pcm, gated=self.eng.robot_speaking(self.config.echo_tail_s))
        phase = self.eng.phase
        if phase in (eng.ENGAGING, eng.CONVERSING) and self.session is not None:
            self.session.push_audio(pcm)
            if speaking:
                self.eng.activity()
            return
        self.preroll.push(pcm, start)
        if speaking and self.config.engage_on_speech:
            self.engage("speech")

    def text(self, text: str, engage_on_text: bool) -> None:
        """On the loop: a line for the model: sent now (conversing), or once the stream is
        open (engaging on it, or after a closing one)."""
        session = self.session
        if self.eng.phase == eng.CONVERSING and session is not None:
            self.eng.activity()
            self._spawn(self.send_text(session, text))
        elif engage_on_text or self.eng.phase != eng.IDLE:
            self.pending_texts.append(text)
            self.engage("text")

    # ------------------------------------------------------------------ the lifecycle
    def engage(self, trigger: str) -> None:
        """On the loop: a trigger fired; open a stream if nobody is engaged (idle)."""
        if not self.active or self.config.always_on or self.host.fatal_error:
            return
        if not self.eng.engage(trigger):
            return
        memory = self.eng.recall()
        greeting = self.config.session.greeting if trigger in self.config.greet_on else ""
        cfg = dataclasses.replace(self.config.session, greeting=greeting)
        session = self._new_session(cfg, self.tools, self._listener())
        # The last conversation, if it ended within memory_s: replayed on the new stream
        # as its history (SonicSession.history is what each new stream replays).
        session.history = list(memory)
        # What was said from just before the onset, then live audio (the session queues
        # both, in order, until the stream is open).
        vad = self.vad
        onset = None
        if vad is not None:
            # Another trigger while someone is already speaking: from their onset too.
            onset = vad.onset_sample if trigger == "speech" or vad.speaking else None
        start = (self.preroll.end if onset is None else onset) - int(
            self.eng.config.lead_s * c.MIC_RATE
        )
        chunks = self.preroll.take_from(start)
        for chunk in chunks:
            session.push_audio(chunk)
        self.preroll_frames_sent = len(chunks)
        self.session = session
        self.host.log(
            f"engaged by {trigger}: opening a stream ({len(chunks)} pre-roll chunks"
            f"{f', {len(memory)} remembered messages' if memory else ''})"
        )
        self.host.publish_conversation(
            {"t": time.time(), "event": "engaged", "trigger": trigger, "memory": len(memory)}
        )
        self.session_task = asyncio.ensure_future(self._run_session(session))

    def release(self, reason: str) -> None:
        """On the loop: close the conversation (polite goodbye if configured)."""
        if self.config.always_on or not self.eng.release():
            return
        self.host.log(f"releasing the conversation ({reason})")
        self._spawn(self._close(reason))

    async def _close(self, reason: str) -> None:
        session = self.session
        if session is None:
            self.eng.closed(None)
            return
        self.host.publish_state()
        if self.session_task is not None and not self.session_task.done():
            with contextlib.suppress(Exception):  # still opening: let it open, then close
                await asyncio.wait_for(asyncio.shield(session_started(session)), 10)
        goodbye = self.config.goodbye
        if goodbye and session.state not in ("error", "idle"):
            finals = self.assistant_finals
            with contextlib.suppress(Exception):
                await session.send_text(goodbye, record=False)
                deadline = time.monotonic() + GOODBYE_MAX_S
                # Until the goodbye is in (its final text follows its audio); it goes on
                # playing from audio_io's queue after the stream is closed.
                while time.monotonic() < deadline and self.assistant_finals == finals:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.cancel_tools("conversation released"), STOP_TOOLS_S)
        await session.stop()
        if self.session is session:
            self.session = None
        if self.ledger.streaming:
            self._conversation_ended(session, reason)
        pending = self.eng.closed(session.history)
        self.host.publish_state("idle" if not self.host.fatal_error else "error")
        if pending:
            self.engage(pending)

    def _conversation_ended(self, session: SonicSession, reason: str) -> None:
        figures = self.ledger.stream_closed()
        self.last_conversation = {"reason": reason, **figures}
        self.host.publish_conversation(
            {
                "t": time.time(),
                "event": "released",
                "trigger": self.eng.trigger,
                "reason": reason,
                "memory": len(session.history),
                **figures,
            }
        )
        self.host.log(
            f"conversation released ({reason}): {figures['streamed_s']:.1f} s streamed, "
            f"{figures['input_tokens']} input + {figures['output_tokens']} output tokens, "
            f"~${figures['cost_usd']:.4f}"
        )
        self._publish_hourly()

    async def _lifecycle_watch(self) -> None:
        """Idle timer (release), hourly usage publishing."""
        next_hourly = 0.0
        while self.active:
            await asyncio.sleep(0.1)
            if self.eng.timed_out():
                self.release("timeout")
            now = time.monotonic()
            if self.session is not None and now >= next_hourly:
                next_hourly = now + HOURLY_EVERY_S
                self._publish_hourly()

    def _publish_hourly(self) -> None:
        self.host.publish_hourly(self.ledger.hour_report())

    def _on_phase(self, phase: str) -> None:
        if phase != eng.IDLE:
            self.host.publish_state()

    async def stop(self) -> None:
        """Running goals cancelled first, then the stream closed politely."""
        self.active = False
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        check, self._check = self._check, None
        if check is not None:  # the start-up check still opening: closed politely too
            with contextlib.suppress(Exception):
                await check.stop()
        session, self.session = self.session, None
        if session is None:
            self.eng.failed()
            self.host.publish_state("error" if self.host.fatal_error else "inactive")
            return
        with contextlib.suppress(Exception):
            await asyncio.wait_for(session.cancel_tools("shutting down"), STOP_TOOLS_S)
        await session.stop()
        if self.ledger.streaming:
            self._conversation_ended(session, "shutdown")
        self.eng.failed()
        self.host.publish_state("error" if self.host.fatal_error else "inactive")


async def session_started(session: SonicSession) -> None:
    """Wait until ``session`` has an open stream (or has given up)."""
    while session.state == "connecting" and not session.done.is_set():  # noqa: ASYNC110
        await asyncio.sleep(0.02)
