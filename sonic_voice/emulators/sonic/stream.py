"""Scenario playback on one accepted stream of the stand-in.

The three parts of a stream live apart (issue 11): ``wire.py`` decodes and encodes the
event-stream frames, ``rules.py`` is the protocol's ordering and field rules as a pure
state machine (also used by the in-process fake stream, ``fake.py``), and this module
plays the scenario back: text, tool calls, audio, barge-in, faults. It talks to the
server only through the two small interfaces below, never its private members.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import datetime
import json
import logging
import time
import uuid
from typing import Any, Protocol

from smithy_aws_event_stream.events import Event
from smithy_aws_event_stream.exceptions import EventError

from sonic_voice.emulators.sonic import audio as synth
from sonic_voice.emulators.sonic.auth import ChunkChain
from sonic_voice.emulators.sonic.faults import STREAM_FAULTS, Fault
from sonic_voice.emulators.sonic.records import ErrorRecord, InputEvent, StreamRecord
from sonic_voice.emulators.sonic.rules import (
    HISTORY_ERROR,
    Action,
    ProtocolRules,
    ProtocolViolation,
)
from sonic_voice.emulators.sonic.scenario import Scenario, Turn
from sonic_voice.emulators.sonic.wire import (
    Feed,
    chunk_frame,
    error_frame,
    exception_frame,
    unwrap,
)

__all__ = [
    "HISTORY_ERROR",
    "Connection",
    "ProtocolViolation",
    "StreamHost",
    "StreamSession",
    "chunk_frame",
    "error_frame",
    "exception_frame",
]

log = logging.getLogger(__name__)


class Connection(Protocol):
    """The HTTP/2 connection a stream's response goes out on."""

    async def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None: ...
    def end_stream(self, sid: int) -> None: ...
    def reset(self, sid: int, code: int) -> None: ...
    def abort(self) -> None: ...


class StreamHost(Protocol):
    """What a stream needs from the emulator (its public stream-facing API)."""

    scenario: Scenario
    speed: float
    session_limit_s: float

    def notify(self) -> None: ...
    def stream_faults(self, index: int) -> list[Fault]: ...
    def arm_turn_fault(self, fault: Fault) -> None: ...
    def take_turn_fault(self) -> Fault | None: ...
    def next_turn(self, trigger: str, text: str = "") -> int | None: ...
    def audio_in(self, rec: StreamRecord, pcm: bytes, t_ns: int) -> None: ...
    def audio_out(self, rec: StreamRecord, pcm: bytes, t_ns: int) -> None: ...
    async def synth_cached(self, text: str, voice: str, wpm: int, rate: int) -> bytes: ...
    def stream_closed(self, stream: StreamSession) -> None: ...


class StreamSession:
    """State of one accepted stream; created by the server after the request verified."""

    def __init__(
        self,
        host: StreamHost,
        conn: Connection,
        stream_id: int,
        record: StreamRecord,
        chain: ChunkChain,
    ) -> None:
        self.host = host
        self.conn = conn
        self.sid = stream_id
        self.rec = record
        self.chain = chain
        self.rules = ProtocolRules(record)
        self.feed = Feed()
        self.closed = False  # response ended (or reset)
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._decoder: asyncio.Task | None = None
        self._turns: asyncio.Task | None = None
        self._frame_faults: list[Fault] = []  # faults due after N audio frames
        # output state
        self.session_id = str(uuid.uuid4())
        self.completion_id = ""
        self._pending_tools: dict[str, asyncio.Future[str]] = {}
        self._triggers: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.speaking = False
        self._interrupt = asyncio.Event()
        self._push_content: str | None = None
        self._totals = [0, 0, 0, 0]
        sc = host.scenario
        self.vad = synth.EnergyDetector(
            16000, sc.threshold_dbfs, sc.min_speech_ms, sc.end_silence_ms
        )

    @property
    def prompt_name(self) -> str:
        return self.rules.prompt_name

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._decoder = self._spawn(self._decode_loop())
        self._turns = self._spawn(self._turn_loop())
        if self.host.session_limit_s > 0:
            self._spawn(self._fault_later(Fault("timeLimit"), self.host.session_limit_s))
        for f in self.host.stream_faults(self.rec.index):
            self.add_fault(f)

    def add_fault(self, fault: Fault) -> None:
        """Produce ``fault`` on this stream (after its delay or its audio-frame count)."""
        if fault.after_frames is not None:
            self._frame_faults.append(fault)
            if self.rec.audio_frames >= fault.after_frames:
                self._frame_faults.remove(fault)
                self._spawn(self.apply_fault(fault))
        else:
            self._spawn(self._fault_later(fault, fault.after_s))

    def _spawn(self, coro: Any) -> asyncio.Task:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._task_done)
        return t

    def _task_done(self, t: asyncio.Task) -> None:
        self._tasks.discard(t)
        if not t.cancelled() and t.exception() is not None:
            log.error("stream %d task failed", self.sid, exc_info=t.exception())

    def on_data(self, data: bytes, t_ns: int) -> None:
        self.feed.feed(data, t_ns)

    def on_input_end(self) -> None:
        self.rec.input_ended = True
        self.feed.close()

    def on_client_reset(self) -> None:
        self.rec.input_ended = True
        self.feed.close()
        self._finish("client-reset", send_end=False)

    def _finish(self, reason: str, send_end: bool = True) -> None:
        """End the response (once) and stop every task but the decoder."""
        if self.closed:
            return
        self.closed = True
        self.rec.end_reason = self.rec.end_reason or reason
        self.rec.ended_ns = time.perf_counter_ns()
        for fut in self._pending_tools.values():
            if not fut.done():
                fut.cancel()
        current = asyncio.current_task()
        for t in list(self._tasks):
            if t is not current and t is not self._decoder:
                t.cancel()
        if send_end:
            self.conn.end_stream(self.sid)
        self.host.stream_closed(self)
        self.host.notify()

    async def stop(self) -> None:
        self._finish("stopped")
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    # ------------------------------------------------------------------ output
    async def _write(self, frame: bytes) -> int:
        async with self._send_lock:
            if self.closed:
                raise asyncio.CancelledError
            await self.conn.send_data(self.sid, frame)
            return time.perf_counter_ns()

    async def emit(self, name: str, body: dict[str, Any]) -> int:
        """Send one output event; returns perf_counter_ns right after it was written."""
        full = {"sessionId": self.session_id, "promptName": self.prompt_name}
        if self.completion_id:
            full["completionId"] = self.completion_id
        full |= body
        t = await self._write(chunk_frame({"event": {name: full}}))
        self.rec.output_events.append((name, t))
        return t

    async def send_exception(self, kind: str, message: str | None = None) -> None:
        """A modeled exception frame (``kind`` a STREAM_FAULTS key), then end the response."""
        etype, default = STREAM_FAULTS[kind]
        msg = message or default
        if self.closed:
            return
        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
            await self._write(exception_frame(etype, msg))
        self.rec.errors_sent.append(ErrorRecord(etype, msg, time.perf_counter_ns()))
        log.info("stream %d: %s: %s", self.sid, etype, msg)
        self._finish(kind)

    async def apply_fault(self, fault: Fault) -> None:
        if self.closed:
            return
        if fault.kind == "reset":
            self.rec.errors_sent.append(
                ErrorRecord("reset", f"RST_STREAM {fault.error_code}", time.perf_counter_ns())
            )
            self.conn.reset(self.sid, fault.error_code)
            self._finish("reset", send_end=False)
        elif fault.kind == "drop":
            self.rec.errors_sent.append(ErrorRecord("drop", "connection dropped", 0))
            self._finish("drop", send_end=False)
            self.conn.abort()
        else:
            await self.send_exception(fault.kind, fault.message)

    async def _fault_later(self, fault: Fault, delay: float) -> None:
        if delay > 0:
            await asyncio.sleep(delay)
        if fault.when == "next_turn":
            self.host.arm_turn_fault(fault)
            return
        await self.apply_fault(fault)

    # ------------------------------------------------------------------ input
    async def _decode_loop(self) -> None:
        try:
            while True:
                try:
                    env = await Event.decode_async(self.feed)
                except EventError as e:
                    await self._violation(f"Malformed event stream frame: {e}")
                    break
                if env is None:
                    break
                t_ns = self.feed.arrival_ns()
                if not self._check_envelope(env):
                    if not self.closed:
                        with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                            await self._write(
                                error_frame(
                                    "InvalidSignatureException",
                                    "The request signature we calculated does not match the "
                                    "signature you provided.",
                                )
                            )
                        self.rec.errors_sent.append(
                            ErrorRecord("InvalidSignatureException", "chunk signature", t_ns)
                        )
                        self._finish("InvalidSignatureException")
                    continue
                if not env.message.payload:
                    self.rec.end_frame_received = True
                    continue
                try:
                    name, body = unwrap(env.message.payload)
                except ProtocolViolation as e:
                    if not self.closed:
                        await self._violation(str(e))
                    continue
                if self.closed:
                    # The service stopped answering; what the client still says (a polite
                    # contentEnd/promptEnd/sessionEnd after an error) is kept for tests.
                    self.rec.late_events.append(InputEvent(name, body, t_ns))
                    self.host.notify()
                    continue
                try:
                    action = self.rules.accept(name, body, t_ns)
                    if action is not None:
                        self._act(action, t_ns)
                except ProtocolViolation as e:
                    await self._violation(str(e))
                self.host.notify()
        finally:
            if not self.closed:
                self._finish("input-ended")

    def _check_envelope(self, env: Event) -> bool:
        h = env.message.headers
        date, sig = h.get(":date"), h.get(":chunk-signature")
        ok = (
            isinstance(date, datetime.datetime)
            and isinstance(sig, bytes)
            and self.chain.verify(date, sig, env.message.payload)
        )
        if ok:
            self.rec.signed_frames += 1
        else:
            self.rec.chunk_signatures_ok = False
        return ok

    def _act(self, action: Action, t_ns: int) -> None:
        kind = action.kind
        if kind == "audio":
            self._heard(action.pcm, t_ns)
        elif kind == "audio_open":
            sc = self.host.scenario
            self.vad = synth.EnergyDetector(
                action.rate, sc.threshold_dbfs, sc.min_speech_ms, sc.end_silence_ms
            )
        elif kind == "text":
            self._triggers.put_nowait(("text", action.text))
        elif kind == "tool_result":
            fut = self._pending_tools.get(action.tool_use_id)
            if fut is not None and not fut.done():
                fut.set_result(action.text)
            else:  # nobody waits for it (wait: false, or late): the model answers it
                name = self.rules.tool_names.get(action.tool_use_id, "")
                self._triggers.put_nowait(("tool_result", f"{name} {action.text}"))
        elif kind == "session_end":
            # The client closes its input next; end the response then (or after a grace
            # period), so the SDK never writes to a stream that already completed.
            if self._turns is not None:
                self._turns.cancel()
            self._spawn(self._end_after_grace(5.0))

    def _heard(self, pcm: bytes, t_ns: int) -> None:
        rec = self.rec
        self.host.audio_in(rec, pcm, t_ns)
        for f in list(self._frame_faults):
            if rec.audio_frames >= (f.after_frames or 0):
                self._frame_faults.remove(f)
                self._spawn(self.apply_fault(f))
        for ev in self.vad.feed(pcm):
            if ev.kind == "speech_start" and self.speaking and not self._interrupt.is_set():
                self._interrupt.set()
            elif ev.kind == "speech_end":
                rec.utterances += 1
                self._triggers.put_nowait(("speech", ""))

    async def _end_after_grace(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._finish("sessionEnd")

    async def _violation(self, message: str) -> None:
        await self.send_exception("validationException", message)

    # ------------------------------------------------------------------ scenario
    async def _turn_loop(self) -> None:
        while True:
            trigger, text = await self._triggers.get()
            fault = self.host.take_turn_fault()
            if fault is not None:
                await self.apply_fault(fault)
                return
            turn_index = self.host.next_turn(trigger, text)
            if turn_index is None:
                continue
            turn = self.host.scenario.turns[turn_index]
            self.rec.turns_fired.append(turn_index)
            self.host.notify()
            if turn.fault is not None:
                await self.apply_fault(turn.fault)
                return
            await self._play(turn, trigger)

    async def _text_block(self, role: str, stage: str | None, text: str, stop: str) -> None:
        cid = str(uuid.uuid4())
        start: dict[str, Any] = {
            "contentId": cid,
            "type": "TEXT",
            "role": role,
            "textOutputConfiguration": {"mediaType": "text/plain"},
        }
        if stage:
            start["additionalModelFields"] = json.dumps({"generationStage": stage})
        await self.emit("contentStart", start)
        await self.emit("textOutput", {"contentId": cid, "content": text, "role": role})
        await self.emit("contentEnd", {"contentId": cid, "type": "TEXT", "stopReason": stop})

    async def _usage(self, in_speech: int, in_text: int, out_speech: int, out_text: int) -> None:
        for i, v in enumerate((in_speech, in_text, out_speech, out_text)):
            self._totals[i] += v
        ti, tt, to, tx = self._totals
        await self.emit(
            "usageEvent",
            {
                "completionId": self.completion_id,
                "details": {
                    "delta": {
                        "input": {"speechTokens": in_speech, "textTokens": in_text},
                        "output": {"speechTokens": out_speech, "textTokens": out_text},
                    },
                    "total": {
                        "input": {"speechTokens": ti, "textTokens": tt},
                        "output": {"speechTokens": to, "textTokens": tx},
                    },
                },
                "totalInputTokens": ti + tt,
                "totalOutputTokens": to + tx,
                "totalTokens": ti + tt + to + tx,
            },
        )

    async def _play(self, turn: Turn, trigger: str) -> None:
        self.completion_id = str(uuid.uuid4())
        await self.emit("completionStart", {})
        words = lambda s: max(1, len(s.split()))  # noqa: E731
        if turn.user:
            await self._text_block("USER", "FINAL", turn.user, "PARTIAL_TURN")
        if turn.usage:
            await self._usage(25 if trigger == "speech" else 0, words(turn.user or ""), 0, 0)
        stop = "END_TURN"
        if turn.say_before:
            # What a model says before it acts ("Sure, follow me"), then the tool call.
            before = dataclasses.replace(
                turn,
                say=turn.say_before,
                final=None,
                audio=turn.audio if turn.audio in ("none", None) else "auto",
            )
            stop = await self._say(before)
        if stop != "INTERRUPTED":
            for call in turn.tools:
                await self._tool_call(call.name, call.input, call.double_encode, call.wait)
        if stop != "INTERRUPTED" and (turn.say or turn.audio not in ("none", None)):
            stop = await self._say(turn)
        if turn.usage:
            await self._usage(0, 0, len(self.rec.output_events), words(turn.say))
        await self.emit("completionEnd", {"stopReason": stop})
        self.completion_id = ""

    async def _say(self, turn: Turn) -> str:
        """SPECULATIVE text, the audio, FINAL text; returns the stop reason."""
        stop = "END_TURN"
        if turn.say:
            await self._text_block("ASSISTANT", "SPECULATIVE", turn.say, "PARTIAL_TURN")
        pcm = await self._turn_audio(turn)
        interrupted = await self._speak(pcm) if pcm else False
        if interrupted:
            self.rec.barge_ins += 1
            if not self.host.scenario.after_interrupt_ms:
                await self._interruption_marker()
            stop = "INTERRUPTED"
        elif turn.say or turn.final:
            final = turn.final if turn.final is not None else turn.say
            await self._text_block("ASSISTANT", "FINAL", final, "END_TURN")
        return stop

    async def _tool_call(
        self, name: str, args: dict[str, Any], double: bool, wait: bool = True
    ) -> None:
        cid, tid = str(uuid.uuid4()), str(uuid.uuid4())
        content = json.dumps(args)
        if double:
            content = json.dumps(content)
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending_tools[tid] = fut
        self.rules.tool_use_sent(tid, name)
        self.rec.tool_uses.append({"toolUseId": tid, "name": name, "input": args})
        await self.emit(
            "contentStart",
            {
                "contentId": cid,
                "type": "TOOL",
                "role": "TOOL",
                "toolUseOutputConfiguration": {"mediaType": "application/json"},
            },
        )
        await self.emit(
            "toolUse",
            {
                "contentId": cid,
                "toolName": name,
                "toolUseId": tid,
                "content": content,
                "role": "TOOL",
            },
        )
        await self.emit("contentEnd", {"contentId": cid, "type": "TOOL", "stopReason": "TOOL_USE"})
        self.host.notify()
        if not wait:
            del self._pending_tools[tid]
            return
        try:
            await asyncio.wait_for(fut, self.host.scenario.tool_timeout_s)
        except TimeoutError:
            log.warning(
                "stream %d: no toolResult for %s within %ss",
                self.sid,
                name,
                self.host.scenario.tool_timeout_s,
            )

    async def _turn_audio(self, turn: Turn) -> bytes:
        spec = turn.audio
        rate = self.rules.out_rate
        if spec in ("none", None):
            return b""
        if spec == "tone":
            spec = {"tone": {}}
        if spec in ("auto", "espeak"):
            if synth.espeak_available() and turn.say:
                spec = {"espeak": {"voice": turn.voice}}
            else:
                dur = min(6.0, max(0.5, 0.06 * len(turn.say or "x" * 10)))
                spec = {"tone": {"duration_s": dur}}
        if "tone" in spec:
            t = spec["tone"]
            return synth.tone(
                t.get("freq", 440.0), t.get("duration_s", 1.0), rate, t.get("amp", 0.3)
            )
        if "silence_s" in spec:
            return bytes(2 * round(spec["silence_s"] * rate))
        if "wav" in spec:
            path = self.host.scenario.base_dir / spec["wav"]
            return await asyncio.to_thread(synth.load_wav, path, rate)
        e = spec["espeak"]
        return await self.host.synth_cached(
            turn.say, e.get("voice", turn.voice), e.get("speed_wpm", 175), rate
        )

    async def _speak(self, pcm: bytes) -> bool:
        """Stream one AUDIO block; returns True when the user barged in."""
        cid = str(uuid.uuid4())
        await self.emit(
            "contentStart",
            {
                "contentId": cid,
                "type": "AUDIO",
                "role": "ASSISTANT",
                "audioOutputConfiguration": {
                    "mediaType": "audio/lpcm",
                    "sampleRateHertz": self.rules.out_rate,
                    "sampleSizeBits": 16,
                    "channelCount": 1,
                    "encoding": "base64",
                },
            },
        )
        sc = self.host.scenario
        step = max(2, int(self.rules.out_rate * sc.chunk_ms / 1000) * 2)
        chunk_s, lead_s = sc.chunk_ms / 1000, sc.lead_ms / 1000
        speed = self.host.speed
        self._interrupt.clear()
        self.speaking = True
        interrupted = False
        t0 = time.monotonic()
        off = 0
        try:
            for i, off in enumerate(range(0, len(pcm), step)):
                if self._interrupt.is_set():
                    interrupted = True
                    break
                if speed > 0:
                    due = t0 + max(0.0, i * chunk_s - lead_s) / speed
                    delay = due - time.monotonic()
                    if delay > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._interrupt.wait(), delay)
                        if self._interrupt.is_set():
                            interrupted = True
                            break
                else:
                    await asyncio.sleep(0)
                await self._audio_out(cid, pcm[off : off + step])
            else:
                off = len(pcm)
        finally:
            self.speaking = False
        if interrupted and sc.after_interrupt_ms:
            # As a real service may: the marker, then more of the interrupted answer on the
            # same content (the client must drop it), then the INTERRUPTED contentEnd.
            await self._interruption_marker()
            tail = pcm[off : off + 2 * round(self.rules.out_rate * sc.after_interrupt_ms / 1000)]
            for k in range(0, len(tail), step):
                await self._audio_out(cid, tail[k : k + step])
                self.rec.audio_after_interrupt_bytes += len(tail[k : k + step])
        await self.emit(
            "contentEnd",
            {
                "contentId": cid,
                "type": "AUDIO",
                "stopReason": "INTERRUPTED" if interrupted else "END_TURN",
            },
        )
        return interrupted

    async def _interruption_marker(self) -> None:
        await self._text_block("ASSISTANT", "FINAL", '{ "interrupted" : true }', "INTERRUPTED")

    async def _audio_out(self, cid: str, pcm: bytes) -> int:
        b64 = base64.b64encode(pcm).decode("ascii")
        t = await self.emit("audioOutput", {"contentId": cid, "content": b64})
        self.rec.audio_out_frames += 1
        self.rec.audio_out_bytes += len(pcm)
        self.host.audio_out(self.rec, pcm, t)
        return t

    # ------------------------------------------------------------------ on demand
    async def push_audio(self, pcm: bytes) -> int:
        """Send one audioOutput now (opening an AUDIO block if needed); returns write ns."""
        if self._push_content is None:
            self._push_content = str(uuid.uuid4())
            if not self.completion_id:
                self.completion_id = str(uuid.uuid4())
                await self.emit("completionStart", {})
            await self.emit(
                "contentStart",
                {
                    "contentId": self._push_content,
                    "type": "AUDIO",
                    "role": "ASSISTANT",
                    "audioOutputConfiguration": {
                        "mediaType": "audio/lpcm",
                        "sampleRateHertz": self.rules.out_rate,
                        "sampleSizeBits": 16,
                        "channelCount": 1,
                        "encoding": "base64",
                    },
                },
            )
        return await self._audio_out(self._push_content, pcm)

    async def end_push(self) -> None:
        if self._push_content is None:
            return
        cid, self._push_content = self._push_content, None
        await self.emit("contentEnd", {"contentId": cid, "type": "AUDIO", "stopReason": "END_TURN"})
        await self.emit("completionEnd", {"stopReason": "END_TURN"})
        self.completion_id = ""
