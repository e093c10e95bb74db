"""The conversation lifecycle: engage when someone is there, release when they leave.

Pure code (no rclpy, no I/O, an injectable clock), driven by ``nodes/sonic_session.py``
and by ``bench/engage.py``'s simulated day. See docs/conversation-lifecycle.md.

Phases (published on the state topic as ``engagement``)::

    idle ──trigger──▶ engaging ──stream open──▶ conversing ──timeout / release──▶ closing
     ▲                                                                               │
     └────────────────────────────── stream closed ──────────────────────────────────┘

- **idle**: no Bedrock stream. Microphone frames go only to the :class:`PreRoll` (the last
  ``preroll_s``) and the local VAD.
- **engaging**: a stream is opening; audio is buffered (the session's own pending queue)
  after the pre-roll, in order.
- **conversing**: audio streams live; the idle timer runs while nobody speaks (either
  side) and no tool runs.
- **closing**: the stream is being closed politely (an optional goodbye first); a trigger
  meanwhile is remembered and engages as soon as the stream is closed.

On release the conversation's history is kept for ``memory_s``: a visitor who comes back
in that time continues the same conversation (it is replayed on the new stream).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

IDLE, ENGAGING, CONVERSING, CLOSING = "idle", "engaging", "conversing", "closing"
PHASES = (IDLE, ENGAGING, CONVERSING, CLOSING)
TRIGGERS = ("speech", "topic", "service", "viewer", "text")


@dataclass
class EngagementConfig:
    idle_timeout_s: float = 20.0
    memory_s: float = 60.0
    preroll_s: float = 2.0  # kept while idle
    lead_s: float = 0.3  # sent from this long before the speech onset

    def validate(self) -> None:
        if self.idle_timeout_s <= 0:
            raise ValueError("idle_timeout_s must be > 0")
        if self.memory_s < 0:
            raise ValueError("memory_s must be >= 0")
        if not 0 <= self.lead_s <= self.preroll_s:
            raise ValueError("preroll_lead_s must be between 0 and preroll_s")


class PreRoll:
    """The last ``seconds`` of microphone chunks, each with its first sample's index.

    :meth:`take_from` hands over every chunk that holds a sample at or after ``sample`` and
    empties the buffer: the caller sends those first, then live audio, so nothing between
    the onset and the live stream is dropped or sent twice (a chunk is whole or absent).
    """

    def __init__(self, seconds: float, rate: int = 16000) -> None:
        self.rate = rate
        self.max_samples = int(seconds * rate)
        self._chunks: deque[tuple[int, bytes]] = deque()
        self._held = 0
        self.end = 0  # index of the next sample

    def __len__(self) -> int:
        return len(self._chunks)

    @property
    def start(self) -> int:
        return self._chunks[0][0] if self._chunks else self.end

    def push(self, pcm: bytes, start: int | None = None) -> None:
        """Keep ``pcm``; ``start`` = the index of its first sample when the caller counts
        samples itself (the VAD does, across phases), else it follows the last chunk."""
        n = len(pcm) // 2
        if start is not None:
            self.end = start
        self._chunks.append((self.end, pcm))
        self.end += n
        self._held += n
        while self._chunks and self._held - len(self._chunks[0][1]) // 2 >= self.max_samples:
            _, old = self._chunks.popleft()
            self._held -= len(old) // 2

    def take_from(self, sample: int) -> list[bytes]:
        """Chunks whose samples reach ``sample`` or later (oldest first); empties."""
        out = [pcm for start, pcm in self._chunks if start + len(pcm) // 2 > sample]
        self.clear()
        return out

    def clear(self) -> None:
        self._chunks.clear()
        self._held = 0


@dataclass
class Memory:
    history: list[tuple[str, str]]
    released_at: float


@dataclass
class Engagement:
    """The phase machine. The caller does the I/O; each method says what to do next."""

    config: EngagementConfig = field(default_factory=EngagementConfig)
    clock: Callable[[], float] = time.monotonic
    phase: str = IDLE
    trigger: str = ""  # what engaged the current conversation
    pending: str = ""  # a trigger that came while closing
    tools_running: int = 0
    robot_speaking_until: float = 0.0
    last_activity: float = 0.0
    memory: Memory | None = None
    conversations: int = 0
    on_phase: Callable[[str], None] | None = None

    # ------------------------------------------------------------------ transitions
    def engage(self, trigger: str) -> bool:
        """A trigger fired. True when the caller must open a stream now."""
        now = self.clock()
        if self.phase == IDLE:
            self.trigger = trigger
            self.last_activity = now
            self._set(ENGAGING)
            return True
        if self.phase == CLOSING:
            self.pending = self.pending or trigger
        else:
            self.last_activity = now  # already engaged: someone is still there
        return False

    def opened(self) -> None:
        """The stream is open: conversing (the idle timer starts now)."""
        if self.phase == ENGAGING:
            self.last_activity = self.clock()
            self.conversations += 1
            self._set(CONVERSING)

    def release(self) -> bool:
        """Release asked (timeout, service, topic). True when the caller must close now."""
        if self.phase in (ENGAGING, CONVERSING):
            self._set(CLOSING)
            return True
        return False

    def closed(self, history: list[tuple[str, str]] | None) -> str:
        """The stream is closed; the history is remembered. Returns the trigger to engage
        with at once ('' = none), e.g. the visitor spoke while the goodbye played."""
        self.memory = Memory(list(history or []), self.clock()) if history else None
        self.tools_running = 0
        # robot_speaking_until stays: a goodbye goes on playing after the stream is closed,
        # and the VAD stays deaf to it.
        self._set(IDLE)
        pending, self.pending = self.pending, ""
        return pending

    def failed(self) -> None:
        """The stream could not open (or died for good): back to idle, nothing kept."""
        self.tools_running = 0
        self.pending = ""
        self._set(IDLE)

    # ------------------------------------------------------------------ activity
    def activity(self) -> None:
        """Someone spoke (either side), typed, or a tool reported: not idle."""
        self.last_activity = self.clock()

    def robot_audio(self, seconds: float) -> None:
        """The robot will be speaking this much longer (output plays in real time)."""
        now = self.clock()
        self.robot_speaking_until = max(self.robot_speaking_until, now) + seconds
        self.last_activity = now

    def robot_interrupted(self) -> None:
        self.robot_speaking_until = self.clock()

    def robot_speaking(self, tail_s: float = 0.0) -> bool:
        return self.clock() < self.robot_speaking_until + tail_s

    def tool_started(self) -> None:
        self.tools_running += 1
        self.activity()

    def tool_finished(self) -> None:
        self.tools_running = max(0, self.tools_running - 1)
        self.activity()

    def idle_for(self) -> float:
        """Seconds without speech (either side) while no tool runs; 0 while busy."""
        now = self.clock()
        if self.tools_running or now < self.robot_speaking_until:
            self.last_activity = now
            return 0.0
        return now - max(self.last_activity, self.robot_speaking_until)

    def timed_out(self) -> bool:
        return self.phase == CONVERSING and self.idle_for() >= self.config.idle_timeout_s

    def recall(self) -> list[tuple[str, str]]:
        """The last conversation's history if it ended within ``memory_s`` (else [])."""
        m = self.memory
        if m is None or self.clock() - m.released_at > self.config.memory_s:
            self.memory = None
            return []
        return list(m.history)

    def _set(self, phase: str) -> None:
        if phase != self.phase:
            self.phase = phase
            if self.on_phase is not None:
                self.on_phase(phase)


# --------------------------------------------------------------------------- cost
@dataclass
class Prices:
    """USD per 1000 tokens (Amazon Nova Sonic on-demand list prices, us-east-1, when this
    was written; check the Bedrock pricing page for yours)."""

    speech_input: float = 0.0034
    speech_output: float = 0.0136
    text_input: float = 0.00006
    text_output: float = 0.00024

    def cost(self, tokens: dict[str, int]) -> float:
        return (
            tokens.get("speech_input", 0) * self.speech_input
            + tokens.get("speech_output", 0) * self.speech_output
            + tokens.get("text_input", 0) * self.text_input
            + tokens.get("text_output", 0) * self.text_output
        ) / 1000.0


TOKEN_KINDS = ("speech_input", "text_input", "speech_output", "text_output")


def usage_delta(usage: dict[str, Any]) -> dict[str, int]:
    """Token counts of one Nova Sonic usage event's ``details.delta`` (by kind). Events
    without details count their totals' growth as text (the caller tracks totals)."""
    d = (usage.get("details") or {}).get("delta") or {}
    i, o = d.get("input") or {}, d.get("output") or {}
    return {
        "speech_input": int(i.get("speechTokens", 0) or 0),
        "text_input": int(i.get("textTokens", 0) or 0),
        "speech_output": int(o.get("speechTokens", 0) or 0),
        "text_output": int(o.get("textTokens", 0) or 0),
    }


@dataclass
class Ledger:
    """Streamed seconds and tokens: per conversation and summed per clock hour."""

    prices: Prices = field(default_factory=Prices)
    wall: Callable[[], float] = time.time
    clock: Callable[[], float] = time.monotonic
    hour: int = -1  # hours since the epoch of the current bucket
    hourly: dict[str, float] = field(default_factory=dict)
    conversation: dict[str, float] = field(default_factory=dict)
    totals: dict[str, float] = field(default_factory=dict)  # since start
    _streaming_since: float | None = None

    def __post_init__(self) -> None:
        self._roll()

    @staticmethod
    def _zero() -> dict[str, float]:
        return {"conversations": 0, "streamed_s": 0.0, **{k: 0 for k in TOKEN_KINDS}}

    def _roll(self) -> None:
        wall = self.wall()
        h = int(wall // 3600)
        if h != self.hour:
            if self._streaming_since is not None and self.hour >= 0:
                # An open stream spans the hour: what was streamed before it goes to the
                # old hour, the rest to the new one.
                now = self.clock()
                past = min(wall - h * 3600, now - self._streaming_since)
                self._bank_until(now - past)
            self.hour = h
            self.hourly = self._zero()
            if not self.totals:
                self.totals = self._zero()

    def _bank_stream(self) -> None:
        if self._streaming_since is not None:
            self._bank_until(self.clock())

    def _bank_until(self, t: float) -> None:
        """Stream time from ``_streaming_since`` up to ``t`` into the buckets."""
        s = max(0.0, t - self._streaming_since) if self._streaming_since is not None else 0.0
        self._streaming_since = t
        for bucket in (self.hourly, self.conversation, self.totals):
            bucket["streamed_s"] = bucket.get("streamed_s", 0.0) + s

    @property
    def streaming(self) -> bool:
        """A stream is open (between stream_opened and stream_closed)."""
        return self._streaming_since is not None

    def stream_opened(self) -> None:
        self._roll()
        self.conversation = self._zero()
        self.conversation["conversations"] = 1
        for bucket in (self.hourly, self.totals):
            bucket["conversations"] += 1
        self._streaming_since = self.clock()

    def stream_closed(self) -> dict[str, Any]:
        """The conversation's figures (streamed s, tokens, cost)."""
        self._roll()
        self._bank_stream()
        self._streaming_since = None
        return self.snapshot(self.conversation)

    def usage(self, usage: dict[str, Any]) -> None:
        self._roll()
        delta = usage_delta(usage)
        for bucket in (self.hourly, self.conversation, self.totals):
            for k, v in delta.items():
                bucket[k] = bucket.get(k, 0) + v

    def snapshot(self, bucket: dict[str, float] | None = None) -> dict[str, Any]:
        b = dict(bucket if bucket is not None else self.hourly)
        live = 0.0
        if bucket is None and self._streaming_since is not None:
            live = self.clock() - self._streaming_since
        tokens = {k: int(b.get(k, 0)) for k in TOKEN_KINDS}
        return {
            "conversations": int(b.get("conversations", 0)),
            "streamed_s": round(float(b.get("streamed_s", 0.0)) + live, 2),
            **tokens,
            "input_tokens": tokens["speech_input"] + tokens["text_input"],
            "output_tokens": tokens["speech_output"] + tokens["text_output"],
            "cost_usd": round(self.prices.cost(tokens), 6),
        }

    def overall(self) -> dict[str, Any]:
        """Everything since start, a stream still open included."""
        total = self.snapshot(self.totals)
        if self._streaming_since is not None:
            live = self.clock() - self._streaming_since
            total["streamed_s"] = round(total["streamed_s"] + live, 2)
        return total

    def hour_report(self) -> dict[str, Any]:
        """The current clock hour's sums (for ``usage/hourly`` and /diagnostics)."""
        self._roll()
        start = time.strftime("%Y-%m-%dT%H:00:00Z", time.gmtime(self.hour * 3600))
        return {"hour": start, **self.snapshot()}
