"""The Nova Sonic session engine: one conversation over a chain of Bedrock streams.

Shape (after the production clients in shared/reference/nova-sonic-protocol.md §16):

- one **sender** per stream at a time: audio frames and whole text/tool blocks go through
  one queue, so a text block is always atomic with respect to audio, and nothing is sent
  before the stream is ready (``open_stream`` returns after the response headers); the
  sender is started eagerly when something is queued on an idle stream, so a mic frame is
  handed to the SDK within the handler that queued it (``_kick``);
- one **receiver** task per stream that is never cancelled (cancelling ``receive()`` kills
  the stream); it parses events and dispatches them without blocking;
- one **task per tool call**; the session never waits for a tool, and every toolUse gets
  exactly one toolResult (result, error, timeout or cancelled).

Audio streams continuously (never VAD-gated) in ``chunk_ms`` frames. A barge-in marker
calls ``listener.on_interrupted()`` at once (the playback side flushes) and drops the rest
of the interrupted audio. The transcript history (USER final, ASSISTANT final) feeds
**rotation**: before the 8-minute limit (``rotate_after_s``, at a natural boundary, or by
``rotate_deadline_s`` at the latest) a new stream is opened in the background with the
history replayed, and audio is handed over to it with the last ``replay_s`` seconds sent
again, so nothing said is lost. The same path recovers from recoverable errors: the
failed stream is closed politely (contentEnd, promptEnd, sessionEnd within
``close_bound_s``) and what it sent in its last ``replay_s``, the frame in flight and what
it never sent go to the next stream. Opening, rotating and recovering share one retry
policy (``retry.py``): consecutive failures of any kind back off exponentially with jitter
and, past ``max_retries``, stop the session with an error naming the count and the last
cause. Unrecoverable errors stop it at once with a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from sonic_voice.audio.pcm import FrameChunker, as_pcm16, samples_per_block
from sonic_voice.sonic import events as ev
from sonic_voice.sonic.retry import RetryPolicy
from sonic_voice.sonic.tools_seam import ToolProvider, ToolResult, ToolUse
from sonic_voice.sonic.transport import (
    BedrockSettings,
    SonicStream,
    SonicStreamError,
    classify_error,
    open_stream,
)

log = logging.getLogger(__name__)

DEFAULT_SYSTEM_PROMPT = (
    "You are the voice of a friendly customer-service robot in a public building. "
    "Always reply in the language the person is speaking; if they switch language, switch "
    "with them. Keep replies short and natural: one or two sentences, as in a spoken "
    "conversation. When you use a tool that moves the robot, say briefly what you are doing, "
    "and when the result comes back, tell the person what happened. Never invent places or "
    "results; if a tool fails, say so simply and offer an alternative."
)

UNANSWERED_MAX_S = 10.0  # a renewal waits this long at most for a tool result's answer

STATES = ("idle", "connecting", "listening", "thinking", "speaking", "acting", "error")


@dataclass
class SessionConfig:
    """Everything that shapes one conversation (fixed for the life of a stream)."""

    model_id: str = ev.NOVA_2_SONIC
    voice_id: str = "tiffany"
    system_prompt: str = DEFAULT_SYSTEM_PROMPT
    # The robot's default locale, e.g. "en-US"; added to the prompt as the language to use
    # until the person speaks. Replies always follow the speaker's language.
    language: str = ""
    endpointing: str | None = "MEDIUM"  # Nova 2 only: HIGH | MEDIUM | LOW | None
    max_tokens: int = 1024
    top_p: float = 0.9
    temperature: float = 0.7
    input_rate: int = 16000
    output_rate: int = 24000
    chunk_ms: float = 32.0
    rotate_after_s: float = 360.0
    rotate_deadline_s: float = 450.0
    boundary_quiet_s: float = 1.0
    replay_s: float = 1.5
    pending_max_s: float = 30.0
    greeting: str = ""  # Nova 2: text sent at start so the robot speaks first
    tool_timeout_s: float = 60.0
    # A barge-in flushes the robot's speech; it cancels a running tool only when the tool
    # says so (its ``cancel_on_barge_in``). This is the default for tools that do not say
    # (issue 15: a visitor's "thanks!" over "follow me" must not stop the robot).
    cancel_tools_on_barge_in: bool = False
    speak_progress: bool = True
    # A tool result that lands while the visitor talks (local input above ``talk_dbfs``
    # within the last ``talk_hold_s``), during a barge-in (until the visitor's turn is
    # recognized) or while the stream is being renewed waits for the end of that, at most
    # ``result_hold_max_s`` (rotation: until the new stream is live), so the model answers
    # it at a natural point and not on top of the visitor.
    result_hold_max_s: float = 4.0
    talk_dbfs: float = -40.0
    talk_hold_s: float = 0.7
    # Consecutive failures (opens that failed, streams that died) tolerated before the
    # session stops; the count clears once a stream stays up healthy_after_s or completes a
    # turn. Delays: at once, then retry_base_s doubling to retry_cap_s (sonic/retry.py).
    max_retries: int = 5
    open_timeout_s: float = 30.0
    retry_base_s: float = 0.5
    retry_cap_s: float = 10.0
    healthy_after_s: float = 30.0
    # A failed stream still open gets contentEnd/promptEnd/sessionEnd within this bound.
    close_bound_s: float = 1.0

    @property
    def nova2(self) -> bool:
        return ev.is_nova2(self.model_id)

    def full_system_prompt(self) -> str:
        if self.language:
            return (
                f"{self.system_prompt} Until the person speaks, use {self.language}; "
                "from then on, answer in the language they use."
            )
        return self.system_prompt

    def validate(self) -> None:
        voices = ev.V2_VOICES if self.nova2 else ev.V1_VOICES
        if self.voice_id not in voices:
            raise ValueError(
                f"voice {self.voice_id!r} is not available on {self.model_id}; "
                f"choose one of {', '.join(sorted(voices))}"
            )
        if self.endpointing and self.endpointing not in ev.ENDPOINTING:
            raise ValueError(f"endpointing must be one of {ev.ENDPOINTING} or empty")
        if self.output_rate not in (8000, 16000, 24000) or self.input_rate not in (
            8000,
            16000,
            24000,
        ):
            raise ValueError("Nova Sonic rates are 8000, 16000 or 24000 Hz")
        if self.greeting and not self.nova2:
            raise ValueError("greeting (the robot speaks first) needs Nova 2 cross-modal text")
        if self.max_retries < 0 or self.retry_base_s < 0 or self.retry_cap_s < 0:
            raise ValueError("max_retries, retry_base_s and retry_cap_s must be >= 0")
        if self.healthy_after_s <= 0 or self.close_bound_s <= 0:
            raise ValueError("healthy_after_s and close_bound_s must be > 0")


@dataclass
class HistoryLimits:
    max_messages: int
    max_message_bytes: int
    max_total_bytes: int
    text_input_bytes: int = 1000  # one textInput; longer messages are split in one block

    @classmethod
    def for_model(cls, model_id: str) -> HistoryLimits:
        if ev.is_nova2(model_id):
            return cls(max_messages=1000, max_message_bytes=50 * 1024, max_total_bytes=200 * 1024)
        return cls(max_messages=40, max_message_bytes=1000, max_total_bytes=40 * 1000)


def sanitize_history(
    entries: list[tuple[str, str]], limits: HistoryLimits, drop_trailing_user: bool = False
) -> list[tuple[str, str]]:
    """Make a transcript replayable (reference §14): same-role runs merged, first message
    USER, roles alternating, each message and the total within the limits, oldest
    trimmed first; optionally without a trailing USER turn whose audio is replayed."""
    merged: list[tuple[str, str]] = []
    for role, text in entries:
        text = text.strip()
        if not text or role not in ("USER", "ASSISTANT"):
            continue
        if merged and merged[-1][0] == role:
            merged[-1] = (role, f"{merged[-1][1]} {text}")
        else:
            merged.append((role, text))
    if drop_trailing_user and merged and merged[-1][0] == "USER":
        merged.pop()
    out = []
    for role, text in merged:
        b = text.encode()
        if len(b) > limits.max_message_bytes:
            # keep the end: the latest words matter most to continue the conversation
            text = b[-limits.max_message_bytes :].decode(errors="ignore")
        out.append((role, text))
    while out and (
        len(out) > limits.max_messages
        or sum(len(t.encode()) for _, t in out) > limits.max_total_bytes
        or out[0][0] != "USER"
    ):
        out.pop(0)
    return out


class SessionListener:
    """Callbacks from the session, called on its event loop; override what you need."""

    def on_audio(self, pcm: bytes) -> None:
        """24 kHz (``output_rate``) PCM16LE mono to play, in chunks of any size."""

    def on_interrupted(self) -> None:
        """Barge-in: drop queued output now."""

    def on_transcript(self, entry: dict[str, Any]) -> None:
        """``{"role", "text", "stage": SPECULATIVE|FINAL, "interactive"?}``."""

    def on_state(self, state: str) -> None:
        """One of :data:`STATES`."""

    def on_usage(self, usage: dict[str, Any]) -> None: ...

    def on_tool_event(self, event: dict[str, Any]) -> None: ...

    def on_error(self, message: str, fatal: bool) -> None: ...


@dataclass
class _Leg:
    """One Bedrock stream in the chain."""

    stream: SonicStream
    number: int
    prompt_name: str = field(default_factory=lambda: str(uuid.uuid4()))
    audio_name: str = field(default_factory=lambda: str(uuid.uuid4()))
    queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    # The task writing the queue to the stream while it holds anything (SonicSession._kick).
    sender: asyncio.Task | None = None
    sending_queue: bool = False  # a sender is at work (set from its first step on)
    sender_failed: bool = False  # a write failed: nothing more is written by the sender
    input_ended: bool = False  # the sender took the queue's end (None)
    receiver: asyncio.Task | None = None
    retired: bool = False
    failed: bool = False
    opened_at: float = field(default_factory=time.monotonic)
    frames_sent: int = 0
    tool_use_ids: set[str] = field(default_factory=set)
    # (time written, frame) of the audio written to this stream in the last replay_s
    # seconds, and at least replay_s of audio (see SonicSession._note_sent).
    sent: deque[tuple[float, bytes]] = field(default_factory=deque)
    sending: bytes | None = None  # the frame being written now


class SonicSession:
    """One Nova Sonic conversation. Use from a single asyncio loop::

    session = SonicSession(settings, config, tools, listener)
    await session.start()
    session.push_audio(pcm)            # from the loop (nodes cross over with call_soon_threadsafe)
    await session.send_text("...")     # Nova 2 cross-modal text
    await session.stop()
    """

    def __init__(
        self,
        settings: BedrockSettings,
        config: SessionConfig | None = None,
        tools: ToolProvider | None = None,
        listener: SessionListener | None = None,
        opener: Callable[[BedrockSettings], Any] = open_stream,
    ) -> None:
        self.settings = settings
        self.config = config or SessionConfig()
        self.config.validate()
        self.tools = tools
        self.listener = listener or SessionListener()
        self._open = opener
        self.limits = HistoryLimits.for_model(self.config.model_id)
        self.history: list[tuple[str, str]] = []
        self._block = samples_per_block(self.config.input_rate, self.config.chunk_ms)
        self._chunker = FrameChunker(self._block)
        self._odd = b""  # a byte of a sample split across push_audio calls
        self.retry = RetryPolicy(
            budget=self.config.max_retries,
            base_s=self.config.retry_base_s,
            cap_s=self.config.retry_cap_s,
            healthy_after_s=self.config.healthy_after_s,
        )
        self.attempts = 0  # streams we tried to open
        frames_per_s = 1000.0 / self.config.chunk_ms
        self._recent: deque[bytes] = deque(maxlen=max(1, int(self.config.replay_s * frames_per_s)))
        self._pending: deque[bytes] = deque(
            maxlen=max(1, int(self.config.pending_max_s * frames_per_s))
        )
        self._leg: _Leg | None = None
        self._legs = 0
        self._state = "idle"
        self._started = False
        self._stopping = False
        self._fatal: str | None = None
        self._fatal_err: SonicStreamError | None = None
        self._barge_armed = False
        self._rotating = False
        self._recovering = False
        self._watch: asyncio.Task | None = None
        self._tool_tasks: dict[str, asyncio.Task] = {}
        self._pending_tools: dict[str, ev.ToolUseEvent] = {}
        self._content: dict[str, ev.ContentStart] = {}
        self._text: dict[str, list[str]] = {}
        self._interrupted_audio: set[str] = set()
        self._audio_open: str | None = None
        self._speaking_until = 0.0
        self._speak_timer: asyncio.TimerHandle | None = None
        self._awaiting_reply = False
        self._last_output = time.monotonic()
        self._background: set[asyncio.Task] = set()
        # Results waiting for a natural point: (leg that asked, use, result, since).
        self._held: list[tuple[_Leg, ToolUse, ToolResult, float]] = []
        self._held_task: asyncio.Task | None = None
        self._barge_open = False  # a barge-in whose user turn is not recognized yet
        self._barge_t = 0.0
        self._last_voice = -1e9  # monotonic time of the last loud input frame
        self._talk_level = (10 ** (self.config.talk_dbfs / 20) * 32768) ** 2
        self.results_held = 0
        self._unanswered_t: float | None = None  # a toolResult sent, no answer seen yet
        self._closing: set[asyncio.Task] = set()  # polite closes of old legs, awaited by stop()
        self.frames_pushed = 0
        self.frames_dropped = 0
        self.rotations = 0
        self.recoveries = 0
        self.barge_ins = 0
        self.events_rejected = 0  # output events that failed to parse or dispatch
        self.done = asyncio.Event()

    # ------------------------------------------------------------------ public API
    @property
    def state(self) -> str:
        return self._state

    @property
    def stream_age(self) -> float:
        return time.monotonic() - self._leg.opened_at if self._leg else 0.0

    @property
    def fatal_error(self) -> str | None:
        return self._fatal

    async def start(self) -> None:
        """Open the first stream (retrying recoverable failures); raises SonicStreamError on an
        unrecoverable one (bad credentials, no model access, unknown model or region)."""
        if self._started:
            return
        self._started = True
        self._set_state("connecting")
        leg = await self._open_with_retry()
        if leg is None:
            raise self._fatal_err or SonicStreamError(
                "fatal", False, self._fatal or "could not open the stream"
            )
        self._promote(leg, replay=False)
        self._watch = asyncio.create_task(self._rotation_watch(), name="sonic-rotation-watch")
        if self.config.greeting:
            await self.send_text(self.config.greeting, record=False)

    def push_audio(self, pcm: bytes | np.ndarray) -> None:
        """Queue microphone audio (``input_rate`` PCM16LE mono, any chunk size)."""
        if self._stopping or self._fatal:
            return
        if not isinstance(pcm, np.ndarray):
            data = bytes(pcm)  # no copy for bytes
            if len(data) == self._block * 2 and not self._odd and not self._chunker.pending:
                # One whole frame, as audio_io and the bench deliver them: sent as it came,
                # without re-framing it through numpy (~25 us a frame on the loop, caches
                # cold, measured in bench/sonic_latency.py's uplink).
                self._push_frame(data, as_pcm16(data))
                return
            if self._odd:
                data, self._odd = self._odd + data, b""
            if len(data) % 2:
                data, self._odd = data[:-1], data[-1:]
            pcm = data
        for block in self._chunker.push(as_pcm16(pcm)):
            self._push_frame(block.tobytes(), block)

    def _push_frame(self, frame: bytes, block: np.ndarray) -> None:
        self.frames_pushed += 1
        if self._loud(block):
            self._last_voice = time.monotonic()
        leg = self._leg
        if leg is None or leg.failed or self._recovering:
            if len(self._pending) == self._pending.maxlen:
                self.frames_dropped += 1
            self._pending.append(frame)
            return
        self._recent.append(frame)
        leg.queue.put_nowait(("a", frame))
        self._kick(leg)

    async def send_text(self, text: str, record: bool = True) -> None:
        """Nova 2 cross-modal input: the model answers it as if the person had said it."""
        if not self.config.nova2:
            raise ValueError(f"{self.config.model_id} takes no text input (Nova 2 does)")
        leg = self._leg
        if leg is None:
            raise RuntimeError("session not started")
        self._enqueue_text(leg, "USER", text, interactive=True)
        if record:
            self.history.append(("USER", text))
            self.listener.on_transcript(
                {"role": "USER", "text": text, "stage": "FINAL", "interactive": True}
            )
        self._awaiting_reply = True
        self._update_state()

    async def rotate(self) -> None:
        """Renew the stream now (history replayed, audio handed over)."""
        if self._rotating or self._recovering or self._leg is None:
            return
        self._rotating = True
        try:
            new = await self._open_with_retry(drop_trailing_user=False)
            if new is not None and not self._stopping:
                self.rotations += 1
                self.retry.seen_alive(self.stream_age)
                self._promote(new, replay=True)
        finally:
            self._rotating = False

    async def cancel_tools(self, reason: str) -> int:
        """Cancel every running tool call (their toolResults say 'cancelled')."""
        n = 0
        if self.tools is not None:
            with contextlib.suppress(Exception):
                n = await self.tools.cancel_all(reason)
        return n

    async def stop(self) -> None:
        """End the conversation: cancel tools, close the stream politely, stop tasks.

        A second caller (e.g. the node while a fatal error is already stopping the session)
        waits for the first to finish instead of returning while streams are still open."""
        if self._stopping:
            await self.done.wait()
            return
        self._stopping = True
        try:
            if self._watch:
                self._watch.cancel()
            await self.cancel_tools("session end")
            for t in list(self._tool_tasks.values()):
                t.cancel()
            if self._tool_tasks:
                await asyncio.wait(list(self._tool_tasks.values()), timeout=5)
            self._flush_held()  # the last results go out before the stream closes
            leg = self._leg
            if leg is not None:
                await self._retire(leg, wait=True)
            if self._closing:  # old legs still closing politely (each bounded) finish first
                _, late = await asyncio.wait(
                    list(self._closing), timeout=self.config.close_bound_s + 5
                )
                for t in late:  # nothing of the session outlives stop()
                    log.warning("stream close still running at stop; cancelled")
                    t.cancel()
                if late:
                    await asyncio.gather(*late, return_exceptions=True)
            for t in list(self._background):
                if t is not asyncio.current_task():
                    t.cancel()
        finally:  # even if this stop is cancelled, a waiting second caller returns
            self._set_state("error" if self._fatal else "idle")
            self.done.set()

    # ------------------------------------------------------------------ legs
    async def _open_leg(self, drop_trailing_user: bool) -> _Leg:
        stream = await asyncio.wait_for(self._open(self.settings), self.config.open_timeout_s)
        self._legs += 1
        leg = _Leg(stream=stream, number=self._legs, sent=deque(maxlen=self._pending.maxlen))
        cfg = self.config
        tools = self.tools.tool_specs() if self.tools else None
        preamble = [
            ev.session_start(
                cfg.max_tokens, cfg.top_p, cfg.temperature, cfg.endpointing if cfg.nova2 else None
            ),
            ev.prompt_start(leg.prompt_name, cfg.voice_id, cfg.output_rate, tools),
        ]
        preamble += self._text_block(leg, "SYSTEM", cfg.full_system_prompt(), interactive=False)
        history = sanitize_history(self.history, self.limits, drop_trailing_user)
        for role, text in history:
            preamble += self._text_block(leg, role, text, interactive=False)
        preamble.append(ev.audio_content_start(leg.prompt_name, leg.audio_name, cfg.input_rate))
        leg.queue.put_nowait(("e", preamble))
        self._kick(leg)
        leg.receiver = asyncio.create_task(self._recv_loop(leg), name=f"sonic-recv-{leg.number}")
        log.info(
            "stream %d open (%s), %d history messages replayed",
            leg.number,
            cfg.model_id,
            len(history),
        )
        return leg

    async def _open_with_retry(self, drop_trailing_user: bool = False) -> _Leg | None:
        """Open a stream; every failure counts against the shared retry budget."""
        while not self._stopping:
            try:
                self.attempts += 1
                return await self._open_leg(drop_trailing_user)
            except Exception as exc:  # noqa: BLE001 - classified below
                err = exc if isinstance(exc, SonicStreamError) else classify_error(exc)
                if isinstance(exc, TimeoutError):
                    err = SonicStreamError(
                        "timeout",
                        True,
                        f"opening the stream timed out after {self.config.open_timeout_s:g} s",
                    )
                if not err.recoverable:
                    self._fail(err.message, err)
                    return None
                delay = self._count_failure(err)
                if delay is None:
                    return None
                log.warning("opening the stream failed (%s); retry in %.1f s", err.message, delay)
                self.listener.on_error(f"{err.message}; retrying in {delay:.1f} s", False)
                await asyncio.sleep(delay)
        return None

    def _count_failure(self, err: SonicStreamError) -> float | None:
        """One more consecutive failure: the delay before the next try, or None (stopped)."""
        delay = self.retry.failure(err.message, getattr(err, "throttled", False))
        if delay is None:
            self._fail(self.retry.fatal_message(), err)
        return delay

    def _promote(self, new: _Leg, replay: bool) -> None:
        """Make ``new`` the live stream; audio goes there from the next frame on."""
        old = self._leg
        self._leg = new
        if replay:
            for frame in self._recent:
                new.queue.put_nowait(("a", frame))
        while self._pending:
            frame = self._pending.popleft()
            self._recent.append(frame)
            new.queue.put_nowait(("a", frame))
        self._kick(new)
        self._recovering = False
        self._audio_open = None
        self._awaiting_reply = False
        if old is not None:
            self._spawn_close(old)
        self._update_state()

    async def _retire(self, leg: _Leg, wait: bool) -> None:
        """Close a stream politely: audio contentEnd, promptEnd, sessionEnd, then close.

        A failed stream whose input is still open gets the same three events (the protocol
        reference, section 13: they free the service's resources), within
        ``close_bound_s``, then the end frame. Its queued audio is dropped first: what it
        held is replayed on the next stream.
        """
        if leg.retired:
            return
        leg.retired = True
        bye = [
            ev.content_end(leg.prompt_name, leg.audio_name),
            ev.prompt_end(leg.prompt_name),
            ev.session_end(),
        ]
        bound = self.config.close_bound_s
        if leg.failed:
            while not leg.queue.empty():
                leg.queue.get_nowait()
        if not leg.sender_failed and not leg.input_ended:
            leg.queue.put_nowait(("e", bye))
            leg.queue.put_nowait(None)
            self._kick(leg)
            sender = leg.sender
            if sender is not None and not sender.done():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(asyncio.shield(sender), 5 if not leg.failed else bound)
                if not sender.done():
                    sender.cancel()
        elif leg.failed:
            # The sender already ended on a send error: try directly, briefly.
            with contextlib.suppress(Exception):
                async with asyncio.timeout(bound):
                    for event in bye:
                        await leg.stream.send(event)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(leg.stream.close(), 10)
        log.info("stream %d closed after %d audio frames", leg.number, leg.frames_sent)

    def _kick(self, leg: _Leg) -> None:
        """Have the leg's queue written: by its sender if one is at work, else by a new one
        started eagerly, i.e. right here until its first real wait. A mic frame is then
        written to the SDK within the handler that queued it, instead of one loop iteration
        later when a waiting sender task would wake (that hop cost 80 us p50 / 450 us p99
        of the uplink, bench/sonic_latency.py); a send rarely waits (the SDK's body buffer
        holds 16 frames). One sender at a time keeps the order and text blocks whole."""
        if not (leg.sending_queue or leg.sender_failed or leg.input_ended):
            loop = asyncio.get_running_loop()
            leg.sender = asyncio.Task(self._send_queued(leg), loop=loop, eager_start=True)

    async def _send_queued(self, leg: _Leg) -> None:
        leg.sending_queue = True  # before anything that could start another sender
        q, stream = leg.queue, leg.stream
        prompt, audio = leg.prompt_name, leg.audio_name
        try:
            while not q.empty():
                item = q.get_nowait()
                if item is None:
                    leg.input_ended = True
                    return
                kind, payload = item
                if kind == "a":
                    leg.sending = payload
                    await stream.send(ev.audio_input(prompt, audio, payload))
                    leg.sending = None
                    leg.frames_sent += 1
                    self._note_sent(leg, payload)
                else:
                    for event in payload:
                        await stream.send(event)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a dead stream; the receiver reports it
            leg.sender_failed = True
            if not leg.retired:
                await self._on_leg_error(leg, exc)
        finally:
            leg.sending_queue = False

    def _note_sent(self, leg: _Leg, frame: bytes) -> None:
        """Remember a written frame while it may still be unheard: written in the last
        ``replay_s`` seconds, or among the last ``replay_s`` of audio. By wall time too,
        because after a stall the sender writes a burst, and a stream that already failed
        accepts writes until the failure is reported (the soak lost frames under load
        when only the last replay_s of audio was kept)."""
        now = time.monotonic()
        sent = leg.sent
        sent.append((now, frame))
        floor = self._recent.maxlen or 1
        cutoff = now - self.config.replay_s
        while len(sent) > floor and sent[0][0] < cutoff:
            sent.popleft()

    async def _recv_loop(self, leg: _Leg) -> None:
        stream = leg.stream
        while True:
            try:
                raw = await stream.receive()
            except Exception as exc:  # noqa: BLE001 - classified in _on_leg_error
                if not leg.retired:
                    await self._on_leg_error(leg, exc)
                return
            if raw is None:
                if not leg.retired and not self._stopping:
                    await self._on_leg_error(
                        leg, SonicStreamError("closed", True, "the service ended the stream")
                    )
                return
            try:
                event = ev.parse_output(raw)
            except (ValueError, UnicodeDecodeError) as e:
                self.events_rejected += 1
                log.warning("output event rejected (stream %d): %s", leg.number, e)
                continue
            try:
                if leg.retired:
                    if isinstance(event, ev.Usage):
                        self._on_usage(event)
                    continue
                self._dispatch(leg, event)
            except Exception:  # a bad event must never kill the receiver (and the stream)
                self.events_rejected += 1
                log.exception(
                    "output event %s rejected (stream %d)", type(event).__name__, leg.number
                )

    async def _on_leg_error(self, leg: _Leg, exc: BaseException) -> None:
        if leg.failed or leg.retired or self._stopping:
            return
        leg.failed = True
        err = exc if isinstance(exc, SonicStreamError) else classify_error(exc)
        if leg is not self._leg:
            return
        if not err.recoverable:
            self._fail(err.message, err)
            return
        self.retry.seen_alive(time.monotonic() - leg.opened_at)
        log.warning("stream %d failed (%s: %s); recovering", leg.number, err.kind, err.message)
        self.listener.on_error(f"{err.message}; reconnecting", False)
        self._recovering = True
        # What was sent in the last moments may not have been heard, and what was queued
        # was not sent: both go to the next stream, in order, before newer audio. (Not
        # _recent: a stream that fails right after a recovery may hold more than replay_s
        # of queued audio; the soak lost frames that way.)
        unsent = []
        while not leg.queue.empty():
            item = leg.queue.get_nowait()
            if item is not None and item[0] == "a":
                unsent.append(item[1])
        in_flight = [leg.sending] if leg.sending is not None else []
        leg.sending = None
        sent = [frame for _, frame in leg.sent]
        self._pending.extendleft(reversed([*sent, *in_flight, *unsent]))
        self._recent.clear()
        self._set_state("connecting")
        self._spawn(self._recover(leg, err))

    async def _recover(self, dead: _Leg, err: SonicStreamError) -> None:
        # The dead stream is closed politely in the background (bounded by close_bound_s),
        # never holding up the new one.
        self._spawn_close(dead)
        delay = self._count_failure(err)
        if delay is None:
            return
        if delay > 0:
            await asyncio.sleep(delay)
        new = await self._open_with_retry(drop_trailing_user=True)
        if new is None or self._stopping:
            return
        self.recoveries += 1
        self._promote(new, replay=False)

    def _fail(self, message: str, err: SonicStreamError | None = None) -> None:
        self._fatal = message
        self._fatal_err = err
        log.error("Nova Sonic session stopped: %s", message)
        self.listener.on_error(message, True)
        self._set_state("error")
        self._spawn(self.stop())

    # ------------------------------------------------------------------ output events
    def _dispatch(self, leg: _Leg, e: ev.OutputEvent) -> None:
        self._last_output = time.monotonic()
        if isinstance(e, ev.AudioOutput):
            if e.content_id in self._interrupted_audio:
                return
            self.listener.on_audio(e.pcm)
            self._extend_speaking(len(e.pcm) / 2 / self.config.output_rate)
        elif isinstance(e, ev.TextOutput):
            self._on_text(e)
        elif isinstance(e, ev.ContentStart):
            self._content[e.content_id] = e
            if e.role == "ASSISTANT" and e.type == "AUDIO":
                self._barge_armed = True  # new speech: the next interruption is news
                self._unanswered_t = None
                self._turn_recognized()
            if e.type == "AUDIO":
                self._audio_open = e.content_id
                self._awaiting_reply = False
                self._update_state()
        elif isinstance(e, ev.ContentEnd):
            self._on_content_end(leg, e)
        elif isinstance(e, ev.ToolUseEvent):
            self._pending_tools[e.content_id] = e
        elif isinstance(e, ev.Usage):
            self._on_usage(e)
        elif isinstance(e, ev.CompletionEnd):
            self._audio_open = None
            if leg is self._leg and not leg.failed:
                self.retry.healthy()  # a completed turn: the service works
            self._update_state()
        elif isinstance(e, ev.Unknown):
            log.debug("unknown output event %r ignored", e.name)

    def _on_text(self, e: ev.TextOutput) -> None:
        start = self._content.get(e.content_id)
        if e.interrupted:
            self._barge_in()
            return
        self._text.setdefault(e.content_id, []).append(e.text)
        role = e.role or (start.role if start else "")
        stage = start.stage if start else None
        self.listener.on_transcript({"role": role, "text": e.text, "stage": stage or "FINAL"})
        if role == "USER":
            self._awaiting_reply = True
            if (stage or "FINAL") == "FINAL":
                self._turn_recognized()
            self._update_state()

    def _on_content_end(self, leg: _Leg, e: ev.ContentEnd) -> None:
        start = self._content.pop(e.content_id, None)
        ctype = e.type or (start.type if start else "")
        if e.stop_reason == "INTERRUPTED" and ctype in ("AUDIO", "TEXT") and start is not None:
            if start.role == "ASSISTANT" and (ctype == "AUDIO" or start.stage == "SPECULATIVE"):
                self._barge_in()
        if ctype == "TEXT":
            text = "".join(self._text.pop(e.content_id, [])).strip()
            if start is not None and text and (start.stage in (None, "FINAL")):
                # A USER transcript echoing cross-modal text we already recorded is not new.
                echo = start.role == "USER" and self.history[-1:] == [("USER", text)]
                if start.role in ("USER", "ASSISTANT") and not echo:
                    self.history.append((start.role, text))
        elif ctype == "AUDIO":
            if self._audio_open == e.content_id:
                self._audio_open = None
            self._interrupted_audio.discard(e.content_id)
            self._update_state()
        elif ctype == "TOOL":
            use = self._pending_tools.pop(e.content_id, None)
            if use is not None:
                self._start_tool(leg, use)

    def _barge_in(self) -> None:
        # The service says it several ways (the marker, then INTERRUPTED content ends);
        # the playback side flushes once per interrupted answer. A barge-in interrupts
        # speech, not errands (issue 15): only tools that ask for it are cancelled.
        if not self._barge_armed:
            return
        self._barge_armed = False
        if self._audio_open:
            self._interrupted_audio.add(self._audio_open)
        self.barge_ins += 1
        self._speaking_until = 0.0
        self._barge_open, self._barge_t = True, time.monotonic()
        self.listener.on_interrupted()
        if self._tool_tasks:
            self._cancel_on_barge_in()
        self._update_state()

    def _cancel_on_barge_in(self) -> None:
        """Cancel the running tools whose ``cancel_on_barge_in`` is true (unset: the
        session's ``cancel_tools_on_barge_in``); the others keep running."""
        tools, default = self.tools, self.config.cancel_tools_on_barge_in
        running = getattr(tools, "running_tools", None)
        if tools is None:
            return
        if running is None or not hasattr(tools, "cancel"):
            if default:  # a provider without per-tool flags: the session-wide choice
                self._spawn(self.cancel_tools("barge-in"))
            return
        for t in running():
            flag = t.get("cancel_on_barge_in")
            if flag if flag is not None else default:
                log.info("barge-in cancels %s (cancel_on_barge_in)", t.get("tool"))
                self._spawn(tools.cancel(t["tool_use_id"], "barge-in"))

    def _turn_recognized(self) -> None:
        """The visitor's turn after a barge-in is over (their words were recognized, or
        the model answers): held results may go."""
        self._barge_open = False

    def _on_usage(self, e: ev.Usage) -> None:
        self.listener.on_usage(
            {
                "input_tokens": e.total_input_tokens,
                "output_tokens": e.total_output_tokens,
                "total_tokens": e.total_tokens,
                "details": e.details,
            }
        )

    # ------------------------------------------------------------------ tools
    def _start_tool(self, leg: _Leg, e: ev.ToolUseEvent) -> None:
        use = ToolUse(tool_use_id=e.tool_use_id, name=e.name, input=e.input, raw=e.raw)
        leg.tool_use_ids.add(e.tool_use_id)
        task = asyncio.create_task(self._run_tool(leg, use, e.error), name=f"tool-{e.name}")
        self._tool_tasks[e.tool_use_id] = task
        self.listener.on_tool_event(
            {"event": "start", "tool": e.name, "tool_use_id": e.tool_use_id, "input": e.input}
        )
        self._update_state()

    async def _run_tool(self, leg: _Leg, use: ToolUse, decode_error: str) -> None:
        def progress(text: str, data: dict[str, Any]) -> None:
            self.listener.on_tool_event(
                {"event": "progress", "tool": use.name, "tool_use_id": use.tool_use_id,
                 "text": text, "data": data}
            )  # fmt: skip
            if text and data.get("speak") and self.config.speak_progress and self.config.nova2:
                self._spawn(self._say_status(text))

        try:
            if decode_error:
                result = ToolResult(use.tool_use_id, "error", {"error": decode_error})
            elif self.tools is None:
                result = ToolResult(
                    use.tool_use_id, "error", {"error": f"no tool named {use.name} is configured"}
                )
            else:
                result = await asyncio.wait_for(
                    self.tools.run(use, progress), self.config.tool_timeout_s
                )
        except TimeoutError:
            result = ToolResult(
                use.tool_use_id,
                "timeout",
                {"error": f"{use.name} did not finish within {self.config.tool_timeout_s:g} s"},
            )
        except asyncio.CancelledError:
            why = {"error": f"{use.name} was cancelled"}
            result = ToolResult(use.tool_use_id, "cancelled", why)
        except Exception as exc:
            log.exception("tool %s raised", use.name)
            result = ToolResult(use.tool_use_id, "error", {"error": f"{use.name} failed: {exc}"})
        finally:
            self._tool_tasks.pop(use.tool_use_id, None)
        self.listener.on_tool_event(
            {"event": "result", "tool": use.name, "tool_use_id": use.tool_use_id,
             "status": result.status, "result": result.content}
        )  # fmt: skip
        self._deliver_result(leg, use, result)
        self._update_state()

    def _deliver_result(self, leg: _Leg, use: ToolUse, result: ToolResult) -> None:
        if self._holding() or self._held:
            # Not on top of the visitor, nor into a stream about to be replaced; in order.
            self._held.append((leg, use, result, time.monotonic()))
            self.results_held += 1
            log.debug("result of %s held until the visitor's turn ends", use.name)
            if self._held_task is None or self._held_task.done():
                self._held_task = asyncio.create_task(self._release_held(), name="sonic-held")
                self._background.add(self._held_task)
                self._held_task.add_done_callback(self._background.discard)
            return
        self._send_result(leg, use, result)

    def _visitor_talking(self) -> bool:
        cfg = self.config
        now = time.monotonic()
        if self._barge_open and now - self._barge_t >= cfg.result_hold_max_s:
            self._barge_open = False  # a cough, an echo: no turn follows; stop waiting
        return self._barge_open or now - self._last_voice < cfg.talk_hold_s

    def _holding(self) -> bool:
        return self._rotating or self._recovering or self._visitor_talking()

    async def _release_held(self) -> None:
        """Send held results once the visitor's turn is over (at most result_hold_max_s
        after each landed) and the stream is live."""
        bound = self.config.result_hold_max_s
        while self._held and not self._stopping:
            waited = time.monotonic() - self._held[0][3]
            if not (self._rotating or self._recovering or self._leg is None) and (
                not self._visitor_talking() or waited >= bound
            ):
                self._flush_held()
                return
            await asyncio.sleep(0.05)

    def _flush_held(self) -> None:
        held, self._held = self._held, []
        for leg, use, result, _t in held:
            self._send_result(leg, use, result)

    def _send_result(self, leg: _Leg, use: ToolUse, result: ToolResult) -> None:
        content = {"status": result.status, **result.content}
        current = self._leg
        if current is leg and not leg.failed and not leg.retired:
            name = str(uuid.uuid4())
            leg.queue.put_nowait(
                (
                    "e",
                    [
                        ev.tool_content_start(leg.prompt_name, name, use.tool_use_id),
                        ev.tool_result(leg.prompt_name, name, content),
                        ev.content_end(leg.prompt_name, name),
                    ],
                )
            )
            self._kick(leg)
            self._unanswered_t = time.monotonic()  # no renewal before the model answers it
        elif current is not None and self.config.nova2 and not self._stopping:
            # The stream that asked was renewed meanwhile; its toolUseId means nothing to the
            # new one, so the outcome goes in as text the model can act on.
            text = f"(Result of the earlier {use.name} request: {json.dumps(content)})"
            self._enqueue_text(current, "USER", text, interactive=True)
        else:
            log.warning("result of %s dropped: its stream is gone", use.name)

    async def _say_status(self, text: str) -> None:
        leg = self._leg
        if self._holding():
            return  # progress is rate-limited and repeats: never spoken over the visitor
        if leg is not None and not leg.failed:
            self._enqueue_text(
                leg, "USER", f"(Robot status, tell the visitor briefly: {text})", interactive=True
            )

    # ------------------------------------------------------------------ helpers
    def _text_block(self, leg: _Leg, role: str, text: str, interactive: bool) -> list[bytes]:
        name = str(uuid.uuid4())
        block = [ev.text_content_start(leg.prompt_name, name, role, interactive)]
        for piece in ev.split_utf8(text, self.limits.text_input_bytes):
            block.append(ev.text_input(leg.prompt_name, name, piece))
        block.append(ev.content_end(leg.prompt_name, name))
        return block

    def _enqueue_text(self, leg: _Leg, role: str, text: str, interactive: bool) -> None:
        leg.queue.put_nowait(("e", self._text_block(leg, role, text, interactive)))
        self._kick(leg)

    def _loud(self, block: np.ndarray) -> bool:
        """The visitor may be talking: this input frame is above ``talk_dbfs`` (~10 µs per
        32 ms frame)."""
        x = block.astype(np.float32)
        return float(np.dot(x, x)) > self._talk_level * len(x)

    def _spawn_close(self, leg: _Leg) -> None:
        task = asyncio.create_task(self._retire(leg, wait=False), name=f"sonic-close-{leg.number}")
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def _extend_speaking(self, seconds: float) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        self._speaking_until = max(self._speaking_until, now) + seconds
        if self._speak_timer:
            self._speak_timer.cancel()
        self._speak_timer = loop.call_at(self._speaking_until + 0.01, self._update_state)
        self._update_state()

    def _update_state(self) -> None:
        if self._fatal:
            state = "error"
        elif self._stopping:
            state = "idle"
        elif self._recovering or self._leg is None:
            state = "connecting"
        elif self._audio_open or asyncio.get_running_loop().time() < self._speaking_until:
            state = "speaking"
        elif self._tool_tasks:
            state = "acting"
        elif self._awaiting_reply:
            state = "thinking"
        else:
            state = "listening"
        self._set_state(state)

    def _set_state(self, state: str) -> None:
        if state != self._state:
            self._state = state
            self.listener.on_state(state)

    def _at_boundary(self) -> bool:
        now = time.monotonic()
        quiet = now - self._last_output >= self.config.boundary_quiet_s
        # A toolResult the model has not answered yet would be answered on the old stream,
        # whose output is dropped once it is replaced: wait for the answer (bounded).
        answered = self._unanswered_t is None or now - self._unanswered_t > UNANSWERED_MAX_S
        return (
            quiet
            and answered
            and self._audio_open is None
            and not self._awaiting_reply
            and asyncio.get_running_loop().time() >= self._speaking_until
        )

    async def _rotation_watch(self) -> None:
        cfg = self.config
        while not self._stopping:
            await asyncio.sleep(min(0.25, cfg.rotate_after_s / 4))
            if self._rotating or self._recovering or self._leg is None:
                continue
            age = self.stream_age
            if age >= cfg.rotate_deadline_s or (age >= cfg.rotate_after_s and self._at_boundary()):
                log.info("renewing the stream after %.1f s", age)
                await self.rotate()
