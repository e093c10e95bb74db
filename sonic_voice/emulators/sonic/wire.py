"""The wire side of the stand-in: the AWS event-stream frames in both directions.

Client frames are signed envelopes around an inner ``chunk`` event whose payload is
``{"bytes": "<base64 of the Nova Sonic event JSON>"}`` (bedrock-sdk-notes.md, "Framing");
server frames are unsigned inner frames. Encoding and decoding use smithy-aws-event-stream
itself, so no framing is hand-written. :func:`unwrap` turns one verified envelope's
payload into ``(event name, body)`` or raises the service's validation error.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import json
import time
from collections import deque
from typing import Any

from smithy_aws_event_stream.events import Event, EventMessage
from smithy_aws_event_stream.exceptions import EventError

from sonic_voice.emulators.sonic.rules import ProtocolViolation


class Feed:
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


def unwrap(payload: bytes) -> tuple[str, dict[str, Any]]:
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
