"""One bidirectional stream: decode and verify the client's frames, enforce the service's
ordering rules, and play the scenario back (text, tool calls, audio, barge-in, faults).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import dataclasses
import datetime
import io
import json
import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from smithy_aws_event_stream.events import Event, EventMessage
from smithy_aws_event_stream.exceptions import EventError

from sonic_voice.emulators.sonic import audio as synth
from sonic_voice.emulators.sonic.auth import ChunkChain
from sonic_voice.emulators.sonic.faults import STREAM_FAULTS, Fault
from sonic_voice.emulators.sonic.records import (
    ErrorRecord,
    InputEvent,
    StreamRecord,
    ToolResultRecord,
)
from sonic_voice.sonic.events import V1_VOICES, V2_VOICES, is_nova2

if TYPE_CHECKING:
    from sonic_voice.emulators.sonic.scenario import Turn
    from sonic_voice.emulators.sonic.server import SonicEmulator, _H2Conn

log = logging.getLogger(__name__)

HISTORY_ERROR = "Chat history should be sent completely before streaming audio."
V1_MAX_HISTORY_MESSAGES, V1_MAX_MESSAGE_BYTES = 40, 1000
V2_MAX_MESSAGE_BYTES, V2_MAX_HISTORY_BYTES = 50 * 1024, 200 * 1024


class ProtocolViolation(Exception):
    """An input the service answers with a validationException (the stream then ends)."""


class _Feed:
    """Async byte source for ``Event.decode_async``, remembering when each byte arrived."""

    def __init__(self) -> None:
        self._buf = bytearray()
        self._eof = False
        self._wake = asyncio.Event()
        self._marks: deque[tuple[int, int]] = deque()  # (end offset, arrival ns)
        self._consumed = 0
        self._fed = 0

    def feed(self, data: bytes, t_ns: int) -> None:
        self._buf += data
        self._fed += len(data)
        self._marks.append((self._fed, t_ns))
        self._wake.set()

    def close(self) -> None:
        self._eof = True
        self._wake.set()

    async def read(self, size: int = -1) -> bytes:
        while len(self._buf) < size and not self._eof:
            self._wake.clear()
            await self._wake.wait()
        n = len(self._buf) if size < 0 else min(size, len(self._buf))
        out = bytes(self._buf[:n])
        del self._buf[:n]
        self._consumed += n
        return out

    def arrival_ns(self) -> int:
        """When the last consumed byte arrived."""
        while len(self._marks) > 1 and self._marks[0][0] < self._consumed:
            self._marks.popleft()
        return self._marks[0][1] if self._marks else time.perf_counter_ns()


@dataclass
class _Block:
    name: str
    type: str
    role: str
    interactive: bool
    parts: list[str] = field(default_factory=list)
    tool_use_id: str = ""
    results: list[str] = field(default_factory=list)


def chunk_frame(event: dict[str, Any]) -> bytes:
    """One output event as the service frames it: base64 JSON inside ``{"bytes": ...}``."""
    inner = json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()
    payload = b'{"bytes":"' + base64.b64encode(inner) + b'"}'
    return EventMessage(
        headers={
            ":message-type": "event",
            ":event-type": "chunk",
            ":content-type": "application/json",
        },
        payload=payload,
    ).encode()


def exception_frame(exception_type: str, message: str) -> bytes:
    body: dict[str, Any] = {"message": message}
    if exception_type == "modelStreamErrorException":
        body |= {"originalStatusCode": 500, "originalMessage": message}
    return EventMessage(
        headers={
            ":message-type": "exception",
            ":exception-type": exception_type,
            ":content-type": "application/json",
        },
        payload=json.dumps(body).encode(),
    ).encode()


def error_frame(code: str, message: str) -> bytes:
    return EventMessage(
        headers={":message-type": "error", ":error-code": code, ":error-message": message}
    ).encode()


class StreamSession:
    """State of one accepted stream; created by the server after the request verified."""

    def __init__(
        self,
        emu: SonicEmulator,
        conn: _H2Conn,
        stream_id: int,
        record: StreamRecord,
        chain: ChunkChain,
    ) -> None:
        self.emu = emu
        self.conn = conn
        self.sid = stream_id
        self.rec = record
        self.chain = chain
        self.model_id = record.model_id
        self.nova2 = is_nova2(record.model_id)
        self.feed = _Feed()
        self.closed = False  # response ended (or reset)
        self._send_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task] = set()
        self._decoder: asyncio.Task | None = None
        # protocol state
        self.phase = "new"  # new -> session -> prompt -> prompt_ended -> ended
        self.prompt_name = ""
        self.blocks: dict[str, _Block] = {}
        self.names_seen: set[str] = set()
        self.audio_block: str | None = None
        self.out_rate = 24000
        self.in_rate = 16000
        self.history_bytes = 0
        self.tools: set[str] = set()
        # output state
        self.session_id = str(uuid.uuid4())
        self.completion_id = ""
        self._pending_tools: dict[str, asyncio.Future[str]] = {}
        self._tool_names: dict[str, str] = {}
        self._triggers: asyncio.Queue[tuple[str, str]] = asyncio.Queue()
        self.speaking = False
        self._interrupt = asyncio.Event()
        self._push_content: str | None = None
        sc = emu.scenario
        self.vad = synth.EnergyDetector(
            16000, sc.threshold_dbfs, sc.min_speech_ms, sc.end_silence_ms
        )

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._decoder = self._spawn(self._decode_loop())
        self._turns = self._spawn(self._turn_loop())
        if self.emu.session_limit_s > 0:
            self._spawn(
                self._fault_later(Fault("timeLimit"), self.emu.session_limit_s),
            )
        for f in self.emu.scenario.faults:
            if f.stream is None or f.stream == self.rec.index:
                self._spawn(self._fault_later(f, f.after_s))
        for f in self.emu._take_armed_stream_faults(self.rec.index):
            self._spawn(self._fault_later(f, f.after_s))

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
        self.emu._stream_closed(self)
        self.emu._notify()

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
            self.emu._armed_turn_faults.append(fault)
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
                if self.closed:
                    continue  # the service stopped listening; keep draining the body
                try:
                    name, body = self._unwrap(env.message.payload)
                    self.rec.events.append(InputEvent(name, body, t_ns))
                    await self._on_event(name, body, t_ns)
                except ProtocolViolation as e:
                    await self._violation(str(e))
                self.emu._notify()
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

    def _unwrap(self, payload: bytes) -> tuple[str, dict[str, Any]]:
        try:
            inner = Event.decode(io.BytesIO(payload))
        except EventError as e:
            raise ProtocolViolation(f"Malformed event stream frame: {e}") from None
        if inner is None:
            raise ProtocolViolation("Empty event")
        h = inner.message.headers
        if h.get(":message-type") != "event" or h.get(":event-type") != "chunk":
            raise ProtocolViolation(
                f"Unexpected event type {h.get(':message-type')}/{h.get(':event-type')}"
            )
        try:
            part = json.loads(inner.message.payload)
            raw = base64.b64decode(part["bytes"], validate=True)
            doc = json.loads(raw)
        except (ValueError, KeyError, TypeError, binascii.Error) as e:
            raise ProtocolViolation(f"Invalid input request: unreadable chunk ({e})") from None
        ev = doc.get("event") if isinstance(doc, dict) else None
        if not isinstance(ev, dict) or len(ev) != 1:
            raise ProtocolViolation('Invalid input request: expected {"event": {name: {...}}}')
        name, body = next(iter(ev.items()))
        if not isinstance(body, dict):
            raise ProtocolViolation(f"Invalid input request: {name} must be an object")
        return name, body

    async def _end_after_grace(self, seconds: float) -> None:
        await asyncio.sleep(seconds)
        self._finish("sessionEnd")

    async def _violation(self, message: str) -> None:
        await self.send_exception("validationException", message)

    # ------------------------------------------------------------------ ordering rules
    async def _on_event(self, name: str, body: dict[str, Any], t_ns: int) -> None:
        if name == "sessionStart":
            self._session_start(body)
            return
        if self.phase == "new":
            raise ProtocolViolation("The first event must be sessionStart.")
        if self.phase == "ended":
            raise ProtocolViolation(f"{name} received after sessionEnd.")
        if name == "promptStart":
            self._prompt_start(body)
            return
        if name == "sessionEnd":
            if self.phase != "prompt_ended":
                raise ProtocolViolation("sessionEnd received before promptEnd.")
            self.phase = "ended"
            # The client closes its input next; end the response then (or after a grace
            # period), so the SDK never writes to a stream that already completed.
            self.rec.end_reason = "sessionEnd"
            self._turns.cancel()
            self._spawn(self._end_after_grace(5.0))
            return
        if self.phase == "session":
            raise ProtocolViolation(f"{name} received before promptStart.")
        if body.get("promptName") != self.prompt_name:
            raise ProtocolViolation(
                f"Invalid promptName {body.get('promptName')!r} in {name}; "
                f"expected {self.prompt_name!r}."
            )
        if self.phase == "prompt_ended":
            raise ProtocolViolation(f"{name} received after promptEnd.")
        handler = {
            "contentStart": self._content_start,
            "textInput": self._text_input,
            "audioInput": self._audio_input,
            "toolResult": self._tool_result,
            "contentEnd": self._content_end,
            "promptEnd": self._prompt_end,
        }.get(name)
        if handler is None:
            raise ProtocolViolation(f"Unknown input event {name!r}.")
        handler(body, t_ns)

    def _session_start(self, body: dict[str, Any]) -> None:
        if self.phase != "new":
            raise ProtocolViolation("sessionStart must be sent once, as the first event.")
        inf = body.get("inferenceConfiguration", {})
        if not isinstance(inf, dict):
            raise ProtocolViolation("inferenceConfiguration must be an object.")
        for key in ("topP", "temperature"):
            v = inf.get(key)
            if v is not None and not (isinstance(v, int | float) and 0.0 <= v <= 1.0):
                raise ProtocolViolation(f"inferenceConfiguration.{key} must be in [0, 1].")
        mt = inf.get("maxTokens")
        if mt is not None and not (isinstance(mt, int) and mt > 0):
            raise ProtocolViolation("inferenceConfiguration.maxTokens must be a positive integer.")
        td = body.get("turnDetectionConfiguration")
        if td is not None:
            if not self.nova2:
                raise ProtocolViolation(
                    "turnDetectionConfiguration is not supported by this model."
                )
            if td.get("endpointingSensitivity") not in ("HIGH", "MEDIUM", "LOW"):
                raise ProtocolViolation("endpointingSensitivity must be HIGH, MEDIUM or LOW.")
        self.rec.session_start = body
        self.phase = "session"

    def _prompt_start(self, body: dict[str, Any]) -> None:
        if self.phase != "session":
            raise ProtocolViolation("promptStart must follow sessionStart, once.")
        pn = body.get("promptName")
        if not isinstance(pn, str) or not pn:
            raise ProtocolViolation("promptStart.promptName is required.")
        aoc = body.get("audioOutputConfiguration") or {}
        if aoc:
            rate = aoc.get("sampleRateHertz", 24000)
            if rate not in (8000, 16000, 24000):
                raise ProtocolViolation(f"Unsupported output sampleRateHertz {rate}.")
            if aoc.get("mediaType", "audio/lpcm") != "audio/lpcm":
                raise ProtocolViolation("audioOutputConfiguration.mediaType must be audio/lpcm.")
            voice = aoc.get("voiceId")
            voices = V2_VOICES if self.nova2 else V1_VOICES
            if voice is not None and voice not in voices:
                raise ProtocolViolation(f"Invalid voiceId {voice!r} for {self.model_id}.")
            self.out_rate = int(rate)
        tools = (body.get("toolConfiguration") or {}).get("tools", [])
        for t in tools:
            spec = t.get("toolSpec", {}) if isinstance(t, dict) else {}
            if not spec.get("name"):
                raise ProtocolViolation("Each tool needs toolSpec.name.")
            schema = (spec.get("inputSchema") or {}).get("json")
            if schema is not None:
                try:
                    json.loads(schema) if isinstance(schema, str) else schema
                except ValueError:
                    raise ProtocolViolation(
                        f"Tool {spec['name']}: inputSchema.json is not valid JSON."
                    ) from None
            self.tools.add(spec["name"])
        self.prompt_name = pn
        self.rec.prompt_start = body
        self.phase = "prompt"

    def _open_text(self) -> _Block | None:
        return next((b for b in self.blocks.values() if b.type in ("TEXT", "TOOL")), None)

    def _content_start(self, body: dict[str, Any], t_ns: int) -> None:
        name, ctype = body.get("contentName"), body.get("type")
        if not isinstance(name, str) or not name:
            raise ProtocolViolation("contentStart.contentName is required.")
        if name in self.names_seen:
            raise ProtocolViolation(f"Duplicate contentName {name!r}.")
        if ctype not in ("TEXT", "AUDIO", "TOOL"):
            raise ProtocolViolation(f"Invalid content type {ctype!r}.")
        role = body.get("role", "")
        interactive = bool(body.get("interactive", False))
        busy = self._open_text()
        if ctype == "AUDIO":
            if busy is not None:
                raise ProtocolViolation(HISTORY_ERROR)
            if self.audio_block is not None:
                raise ProtocolViolation("An audio content block is already open.")
            if role != "USER":
                raise ProtocolViolation("Audio input content must have role USER.")
            cfg = body.get("audioInputConfiguration") or {}
            rate = cfg.get("sampleRateHertz")
            if (
                cfg.get("mediaType") != "audio/lpcm"
                or rate not in (8000, 16000, 24000)
                or cfg.get("sampleSizeBits", 16) != 16
                or cfg.get("channelCount", 1) != 1
            ):
                raise ProtocolViolation(f"Invalid audioInputConfiguration {cfg}.")
            self.in_rate = int(rate)
            self.vad = synth.EnergyDetector(
                self.in_rate,
                self.emu.scenario.threshold_dbfs,
                self.emu.scenario.min_speech_ms,
                self.emu.scenario.end_silence_ms,
            )
            self.audio_block = name
            self.rec.audio_started = True
        else:
            if busy is not None:
                raise ProtocolViolation(
                    f"Content {busy.name!r} must end before content {name!r} starts."
                )
            if ctype == "TEXT":
                roles = ("SYSTEM", "USER", "ASSISTANT") + (("SYSTEM_SPEECH",) if self.nova2 else ())
                if role not in roles:
                    raise ProtocolViolation(f"Invalid role {role!r} for TEXT content.")
                if interactive and not self.nova2:
                    raise ProtocolViolation(
                        "Interactive text input is not supported by this model."
                    )
                if role == "SYSTEM" and (self.rec.history or self.rec.audio_started):
                    raise ProtocolViolation("The system prompt must come before history and audio.")
                if role in ("USER", "ASSISTANT") and not interactive:
                    if self.rec.audio_started:
                        raise ProtocolViolation(
                            "Chat history must be sent before audio streaming starts."
                        )
                    if not self.rec.history and role != "USER":
                        raise ProtocolViolation("Chat history must start with a USER message.")
                    if self.rec.history and self.rec.history[-1][0] == role:
                        raise ProtocolViolation(
                            "Chat history roles must alternate between USER and ASSISTANT."
                        )
            else:  # TOOL
                cfg = body.get("toolResultInputConfiguration") or {}
                tid = cfg.get("toolUseId")
                if tid not in self._tool_names:
                    raise ProtocolViolation(
                        f"Tool Response parsing error: unknown toolUseId {tid!r}."
                    )
                role = "TOOL"
        self.names_seen.add(name)
        blk = _Block(name, ctype, role, interactive)
        if ctype == "TOOL":
            blk.tool_use_id = (body.get("toolResultInputConfiguration") or {}).get("toolUseId", "")
        self.blocks[name] = blk

    def _block(self, body: dict[str, Any], want: str, event: str) -> _Block:
        name = body.get("contentName")
        blk = self.blocks.get(name)  # type: ignore[arg-type]
        if blk is None:
            raise ProtocolViolation(f"{event}: no open content named {name!r}.")
        if blk.type != want:
            raise ProtocolViolation(f"{event} sent to {blk.type} content {name!r}.")
        return blk

    def _text_input(self, body: dict[str, Any], t_ns: int) -> None:
        blk = self._block(body, "TEXT", "textInput")
        text = body.get("content")
        if not isinstance(text, str):
            raise ProtocolViolation("textInput.content must be a string.")
        blk.parts.append(text)

    def _audio_input(self, body: dict[str, Any], t_ns: int) -> None:
        if self._open_text() is not None and self._open_text().type == "TEXT":  # type: ignore[union-attr]
            raise ProtocolViolation(HISTORY_ERROR)
        if self.audio_block is None or body.get("contentName") != self.audio_block:
            if not self.rec.audio_started:
                raise ProtocolViolation(HISTORY_ERROR)
            raise ProtocolViolation(
                f"audioInput: no open audio content named {body.get('contentName')!r}."
            )
        try:
            pcm = base64.b64decode(body.get("content", ""), validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolViolation("audioInput.content is not valid base64.") from None
        if len(pcm) % 2:
            raise ProtocolViolation("audioInput.content is not whole 16-bit samples.")
        rec = self.rec
        rec.audio_frames += 1
        rec.audio_bytes += len(pcm)
        rec.pcm += pcm
        rec.audio_input_ns.append(t_ns)
        body["content"] = f"<{len(pcm)} bytes>"  # keep records small; PCM is in rec.pcm
        for cb in self.emu._audio_in_hooks:
            cb(rec, pcm, t_ns)
        for ev in self.vad.feed(pcm):
            if ev.kind == "speech_start" and self.speaking and not self._interrupt.is_set():
                self._interrupt.set()
            elif ev.kind == "speech_end":
                rec.utterances += 1
                self._triggers.put_nowait(("speech", ""))

    def _tool_result(self, body: dict[str, Any], t_ns: int) -> None:
        blk = self._block(body, "TOOL", "toolResult")
        content = body.get("content")
        if not isinstance(content, str):
            raise ProtocolViolation("Tool Response parsing error: content must be a string.")
        try:
            parsed = json.loads(content)
        except ValueError:
            raise ProtocolViolation(
                "Tool Response parsing error: content is not valid JSON."
            ) from None
        blk.results.append(content)
        self.rec.tool_results.append(
            ToolResultRecord(
                blk.tool_use_id, self._tool_names.get(blk.tool_use_id, ""), content, parsed, t_ns
            )
        )

    def _content_end(self, body: dict[str, Any], t_ns: int) -> None:
        name = body.get("contentName")
        blk = self.blocks.pop(name, None)  # type: ignore[arg-type]
        if blk is None:
            raise ProtocolViolation(f"contentEnd: no open content named {name!r}.")
        if blk.type == "AUDIO":
            self.audio_block = None
            return
        text = "".join(blk.parts)
        if blk.type == "TOOL":
            if not blk.results:
                raise ProtocolViolation("Tool Response parsing error: no toolResult in content.")
            fut = self._pending_tools.get(blk.tool_use_id)
            if fut is not None and not fut.done():
                fut.set_result(blk.results[-1])
            return
        if blk.role == "SYSTEM":
            self.rec.system_prompt = text
        elif blk.role == "SYSTEM_SPEECH":
            pass
        elif blk.interactive:
            self.rec.interactive_texts.append(text)
            self._triggers.put_nowait(("text", text))
        else:
            size = len(text.encode())
            limit = V2_MAX_MESSAGE_BYTES if self.nova2 else V1_MAX_MESSAGE_BYTES
            if size > limit:
                raise ProtocolViolation(
                    f"Chat history message of {size} bytes exceeds the {limit}-byte limit."
                )
            self.history_bytes += size
            if self.nova2 and self.history_bytes > V2_MAX_HISTORY_BYTES:
                raise ProtocolViolation("Chat history exceeds the 200 KB limit.")
            if not self.nova2 and len(self.rec.history) >= V1_MAX_HISTORY_MESSAGES:
                raise ProtocolViolation("Chat history exceeds 40 messages.")
            self.rec.history.append((blk.role, text))

    def _prompt_end(self, body: dict[str, Any], t_ns: int) -> None:
        if self.blocks:
            raise ProtocolViolation(
                f"promptEnd while content is open: {sorted(self.blocks)} (send contentEnd first)."
            )
        self.phase = "prompt_ended"

    # ------------------------------------------------------------------ scenario
    async def _turn_loop(self) -> None:
        while True:
            trigger, _text = await self._triggers.get()
            fault = self.emu._take_turn_fault()
            if fault is not None:
                await self.apply_fault(fault)
                return
            turn_index = self.emu._next_turn(trigger)
            if turn_index is None:
                continue
            turn = self.emu.scenario.turns[turn_index]
            self.rec.turns_fired.append(turn_index)
            self.emu._notify()
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
        self._totals = getattr(self, "_totals", [0, 0, 0, 0])
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
                await self._tool_call(call.name, call.input, call.double_encode)
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
            await self._text_block("ASSISTANT", "FINAL", '{ "interrupted" : true }', "INTERRUPTED")
            stop = "INTERRUPTED"
        elif turn.say or turn.final:
            final = turn.final if turn.final is not None else turn.say
            await self._text_block("ASSISTANT", "FINAL", final, "END_TURN")
        return stop

    async def _tool_call(self, name: str, args: dict[str, Any], double: bool) -> None:
        cid, tid = str(uuid.uuid4()), str(uuid.uuid4())
        content = json.dumps(args)
        if double:
            content = json.dumps(content)
        fut: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._pending_tools[tid] = fut
        self._tool_names[tid] = name
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
        self.emu._notify()
        try:
            await asyncio.wait_for(fut, self.emu.scenario.tool_timeout_s)
        except TimeoutError:
            log.warning(
                "stream %d: no toolResult for %s within %ss",
                self.sid,
                name,
                self.emu.scenario.tool_timeout_s,
            )

    async def _turn_audio(self, turn: Turn) -> bytes:
        spec = turn.audio
        rate = self.out_rate
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
            path = self.emu.scenario.base_dir / spec["wav"]
            return await asyncio.to_thread(synth.load_wav, path, rate)
        e = spec["espeak"]
        return await self.emu._synth_cached(
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
                    "sampleRateHertz": self.out_rate,
                    "sampleSizeBits": 16,
                    "channelCount": 1,
                    "encoding": "base64",
                },
            },
        )
        sc = self.emu.scenario
        step = max(2, int(self.out_rate * sc.chunk_ms / 1000) * 2)
        chunk_s, lead_s = sc.chunk_ms / 1000, sc.lead_ms / 1000
        speed = self.emu.speed
        self._interrupt.clear()
        self.speaking = True
        interrupted = False
        t0 = time.monotonic()
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
        finally:
            self.speaking = False
        await self.emit(
            "contentEnd",
            {
                "contentId": cid,
                "type": "AUDIO",
                "stopReason": "INTERRUPTED" if interrupted else "END_TURN",
            },
        )
        return interrupted

    async def _audio_out(self, cid: str, pcm: bytes) -> int:
        b64 = base64.b64encode(pcm).decode("ascii")
        t = await self.emit("audioOutput", {"contentId": cid, "content": b64})
        self.rec.audio_out_frames += 1
        self.rec.audio_out_bytes += len(pcm)
        for cb in self.emu._audio_out_hooks:
            cb(self.rec, pcm, t)
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
                        "sampleRateHertz": self.out_rate,
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
