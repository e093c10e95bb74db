"""An in-process Nova Sonic stream for fast unit tests of ``SonicSession``.

``SonicSession(settings, config, tools, listener, opener=service.open)`` talks to a
:class:`FakeService` instead of HTTP/2: no TLS, no SigV4, no awscrt, so a session test
runs in milliseconds. It is protocol-faithful where it matters to the session: every input
event goes through the same :class:`~sonic_voice.emulators.sonic.rules.ProtocolRules` as
the HTTP/2 stand-in (a violation ends the stream with a ValidationException, as the
service does), modeled errors are raised from ``receive()`` as exceptions of the
service's class names (so the session's real ``classify_error`` sees them), and output
events are the service's JSON shapes. What it does not do: SigV4, framing, VAD, scenario
turns; tests drive the output side with :meth:`FakeStream.emit` and the helpers below.
The wiring through the real SDK is proven by the slower stand-in tests.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any

from sonic_voice.emulators.sonic.faults import HTTP_FAULTS, STREAM_FAULTS
from sonic_voice.emulators.sonic.records import ErrorRecord, InputEvent, StreamRecord
from sonic_voice.emulators.sonic.rules import ProtocolRules, ProtocolViolation
from sonic_voice.sonic.events import NOVA_2_SONIC

_CLASSES: dict[str, type[Exception]] = {}


def service_exception(type_name: str, message: str) -> Exception:
    """An exception whose class name is the service's (``InternalServerException``...)."""
    name = type_name[:1].upper() + type_name[1:]
    cls = _CLASSES.get(name)
    if cls is None:
        cls = _CLASSES[name] = type(name, (Exception,), {"message": ""})
    exc = cls(message)
    exc.message = message  # type: ignore[attr-defined]
    return exc


@dataclass
class _EveryStream:
    kind: str
    after_frames: int


class FakeStream:
    """One stream: the session's ``SonicStream`` interface (send/receive/close)."""

    def __init__(self, service: FakeService, index: int, model_id: str) -> None:
        self.service = service
        self.rec = StreamRecord(
            index=index, stream_id=2 * index + 1, model_id=model_id, path="", started_ns=0
        )
        self.rec.started_ns = time.perf_counter_ns()
        self.rec.http_status = 200
        self.rules = ProtocolRules(self.rec)
        self.session_id = str(uuid.uuid4())
        self.completion_id = ""
        self._out: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue()
        self.ended = False  # the service side ended (error, or after sessionEnd)
        self.closed = False  # the client closed its input
        self.fail_after: list[_EveryStream] = list(service._every)
        self.fail_after += service._one.pop(index, [])

    # ------------------------------------------------------------------ client side
    async def send(self, event: bytes) -> None:
        await asyncio.sleep(0)  # a real send yields to the loop
        if self.closed:
            raise RuntimeError("send on a closed stream")
        t_ns = time.perf_counter_ns()
        try:
            doc = json.loads(event)
            ((name, body),) = doc["event"].items()
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            self._fail("validationException", f"Invalid input request: unreadable event ({e})")
            return
        if self.ended:
            self.rec.late_events.append(InputEvent(name, body, t_ns))
            return
        try:
            action = self.rules.accept(name, body, t_ns)
        except ProtocolViolation as e:
            self._fail("validationException", str(e))
            return
        if action is not None and action.kind == "audio":
            for f in list(self.fail_after):
                if self.rec.audio_frames >= f.after_frames:
                    self.fail_after.remove(f)
                    self._fail(f.kind)
                    return
        elif action is not None and action.kind == "session_end":
            self._end("sessionEnd")

    async def receive(self) -> bytes | None:
        item = await self._out.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.rec.end_frame_received = True
        self.rec.input_ended = True
        self._end("input-ended")

    # ------------------------------------------------------------------ service side
    def _end(self, reason: str) -> None:
        if self.ended:
            return
        self.ended = True
        self.rec.end_reason = self.rec.end_reason or reason
        self.rec.ended_ns = time.perf_counter_ns()
        self._out.put_nowait(None)
        self.service._active.discard(self)

    def _fail(self, kind: str, message: str | None = None) -> None:
        if self.ended:
            return
        etype, default = STREAM_FAULTS[kind]
        msg = message or default
        self.rec.errors_sent.append(ErrorRecord(etype, msg, time.perf_counter_ns()))
        self._out.put_nowait(service_exception(etype, msg))
        self.ended = True
        self.rec.end_reason = kind
        self.service._active.discard(self)

    def fail(self, kind: str, message: str | None = None) -> None:
        """A modeled in-stream exception (a STREAM_FAULTS key); the stream ends."""
        self._fail(kind, message)

    def emit(self, name: str, body: dict[str, Any]) -> None:
        """Send one output event (sessionId, promptName, completionId are added)."""
        if self.ended:
            return
        full: dict[str, Any] = {"sessionId": self.session_id, "promptName": self.rules.prompt_name}
        if self.completion_id:
            full["completionId"] = self.completion_id
        full |= body
        self.rec.output_events.append((name, time.perf_counter_ns()))
        self._out.put_nowait(json.dumps({"event": {name: full}}).encode())

    def emit_raw(self, raw: bytes) -> None:
        """Send any bytes as one output event (fuzzing the session's parser). A toolUse
        among them counts as sent, so the session's answer to it is in order."""
        if self.ended:
            return
        with contextlib.suppress(ValueError, UnicodeDecodeError, RecursionError):
            doc = json.loads(raw)
            event = doc.get("event") if isinstance(doc, dict) else None
            body = event.get("toolUse") if isinstance(event, dict) else None
            if isinstance(body, dict) and isinstance(body.get("toolUseId", ""), str):
                self.rules.tool_use_sent(body.get("toolUseId", ""), str(body.get("toolName")))
        self._out.put_nowait(raw)

    def start_completion(self) -> None:
        self.completion_id = str(uuid.uuid4())
        self.emit("completionStart", {})

    def end_completion(self, stop: str = "END_TURN") -> None:
        self.emit("completionEnd", {"stopReason": stop})
        self.completion_id = ""

    def text(self, role: str, text: str, stage: str = "FINAL", stop: str = "END_TURN") -> str:
        cid = str(uuid.uuid4())
        self.emit(
            "contentStart",
            {
                "contentId": cid,
                "type": "TEXT",
                "role": role,
                "additionalModelFields": json.dumps({"generationStage": stage}),
                "textOutputConfiguration": {"mediaType": "text/plain"},
            },
        )
        self.emit("textOutput", {"contentId": cid, "content": text, "role": role})
        self.emit("contentEnd", {"contentId": cid, "type": "TEXT", "stopReason": stop})
        return cid

    def audio_start(self) -> str:
        cid = str(uuid.uuid4())
        self.emit(
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
        return cid

    def audio(self, cid: str, pcm: bytes) -> None:
        self.rec.audio_out_frames += 1
        self.rec.audio_out_bytes += len(pcm)
        self.emit("audioOutput", {"contentId": cid, "content": base64.b64encode(pcm).decode()})

    def audio_end(self, cid: str, stop: str = "END_TURN") -> None:
        self.emit("contentEnd", {"contentId": cid, "type": "AUDIO", "stopReason": stop})

    def interruption_marker(self) -> None:
        self.text("ASSISTANT", '{ "interrupted" : true }', "FINAL", "INTERRUPTED")

    def tool_use(self, name: str, args: dict[str, Any]) -> str:
        """Ask for a tool (TOOL contentStart, toolUse, contentEnd); returns the toolUseId."""
        cid, tid = str(uuid.uuid4()), str(uuid.uuid4())
        self.rules.tool_use_sent(tid, name)
        self.rec.tool_uses.append({"toolUseId": tid, "name": name, "input": args})
        self.emit(
            "contentStart",
            {
                "contentId": cid,
                "type": "TOOL",
                "role": "TOOL",
                "toolUseOutputConfiguration": {"mediaType": "application/json"},
            },
        )
        self.emit(
            "toolUse",
            {
                "contentId": cid,
                "toolName": name,
                "toolUseId": tid,
                "content": json.dumps(args),
                "role": "TOOL",
            },
        )
        self.emit("contentEnd", {"contentId": cid, "type": "TOOL", "stopReason": "TOOL_USE"})
        return tid


class FakeService:
    """Opens :class:`FakeStream` s; ``service.open`` is a ``SonicSession`` opener."""

    def __init__(self, model_id: str = NOVA_2_SONIC) -> None:
        self.model_id = model_id
        self.streams: list[FakeStream] = []
        self.opens = 0  # open attempts, failed ones included
        self.open_times: list[float] = []
        self._active: set[FakeStream] = set()
        self._every: list[_EveryStream] = []
        self._one: dict[int, list[_EveryStream]] = {}
        self._open_faults: list[str] = []
        self.new_stream = asyncio.Event()

    @property
    def records(self) -> list[StreamRecord]:
        return [s.rec for s in self.streams]

    @property
    def current(self) -> FakeStream:
        return self.streams[-1]

    def fail_every_stream(self, kind: str, after_frames: int) -> None:
        """Every stream opened from now on fails with ``kind`` after that many audio frames."""
        if kind not in STREAM_FAULTS:
            raise ValueError(f"unknown stream fault {kind!r}")
        self._every.append(_EveryStream(kind, after_frames))

    def fail_stream(self, index: int, kind: str, after_frames: int) -> None:
        """Stream ``index`` (0-based, in open order) fails after that many audio frames."""
        if kind not in STREAM_FAULTS:
            raise ValueError(f"unknown stream fault {kind!r}")
        self._one.setdefault(index, []).append(_EveryStream(kind, after_frames))

    def fail_opens(self, kind: str, count: int = 1) -> None:
        """The next ``count`` opens fail with an HTTP error (an HTTP_FAULTS key)."""
        if kind not in HTTP_FAULTS:
            raise ValueError(f"unknown HTTP fault {kind!r}")
        self._open_faults += [kind] * count

    def clear_faults(self) -> None:
        self._every.clear()
        self._open_faults.clear()

    async def open(self, settings: Any) -> FakeStream:
        await asyncio.sleep(0)
        self.opens += 1
        self.open_times.append(time.monotonic())
        if self._open_faults:
            _, etype, msg = HTTP_FAULTS[self._open_faults.pop(0)]
            raise service_exception(etype, msg)
        model = getattr(settings, "model_id", None) or self.model_id
        s = FakeStream(self, len(self.streams), model)
        self.streams.append(s)
        self._active.add(s)
        self.new_stream.set()
        return s

    async def wait_streams(self, n: int, timeout: float = 5.0) -> FakeStream:  # noqa: ASYNC109
        """Wait until ``n`` streams were opened and the last one got its audio contentStart."""
        deadline = time.monotonic() + timeout
        while len(self.streams) < n or not self.streams[n - 1].rec.audio_started:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(self.streams)} of {n} streams opened")
            await asyncio.sleep(0.002)
        return self.streams[n - 1]
