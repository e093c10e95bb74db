"""What the KVS signaling service may send a master, checked in one place.

Every inbound WebSocket frame goes through :func:`parse_frame`, which returns a typed
:class:`Inbound`, ``None`` for traffic the protocol says to ignore (blank keep-alives,
foreign JSON such as API Gateway's ``{"message": "Endpoint request timed out"}``, message
types added after this code was written), or raises :class:`BadFrame` whose text names the
field at fault. Only the fields the master uses are checked; unknown ones are ignored, and
keys are accepted in camelCase (what the service sends) or PascalCase (what the C SDK
writes), as the service itself does (kvs-signaling.md §2.3-2.4).

Before this module, a frame whose ``messagePayload`` was not a string, a ``statusResponse``
that was not an object or a list ``correlationId`` raised out of the read loop and tore the
signaling socket down (a reconnect 0.05-0.12 s later, issue 11 item 6); a malformed ICE
candidate before the offer made the answer fail (item 7). Now such frames are dropped with
one warning each, and a candidate reaches ``addIceCandidate`` only after
:func:`validate_candidate` accepted it.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
from dataclasses import dataclass
from typing import Any

# ClientId and correlationId: 1-256 of [a-zA-Z0-9_.-] (kvs-signaling.md §2.5).
ID_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,256}$")
# aioice's own test for an mDNS host name (browsers hide host addresses behind these).
MDNS_RE = re.compile(r"^[a-zA-Z0-9-]{1,63}\.local$")
# Types a master acts on; GO_AWAY and RECONNECT_ICE_SERVER may come without a payload.
PAYLOAD_TYPES = frozenset({"SDP_OFFER", "SDP_ANSWER", "ICE_CANDIDATE"})
KNOWN_TYPES = PAYLOAD_TYPES | {"GO_AWAY", "RECONNECT_ICE_SERVER", "STATUS_RESPONSE"}
# aioice refuses any other type (peer-reflexive candidates are learned, never signaled).
CANDIDATE_TYPES = frozenset({"host", "srflx", "relay"})


class BadFrame(ValueError):
    """A signaling frame (or ICE candidate) that breaks the protocol; ``str()`` says why."""


@dataclass(frozen=True)
class Inbound:
    """One validated service -> master message.

    ``payload``: for SDP_OFFER/SDP_ANSWER ``{"type", "sdp"}``; for ICE_CANDIDATE the
    candidate normalised by :func:`validate_candidate`; else None. ``status``: the
    STATUS_RESPONSE fields (``correlationId``, ``statusCode`` as a string, ...).
    """

    type: str
    sender: str | None
    payload: Any
    status: dict[str, Any] | None = None


def _lower_keys(obj: dict[str, Any]) -> dict[str, Any]:
    return {(k[:1].lower() + k[1:] if isinstance(k, str) else k): v for k, v in obj.items()}


def _kind(value: Any) -> str:
    return type(value).__name__


def _load_json(data: str | bytes, what: str) -> Any:
    try:
        return json.loads(data)
    except RecursionError:  # "[[[[..." deeper than the interpreter's limit
        raise BadFrame(f"{what} nests too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise BadFrame(f"{what} is not JSON: {e}") from None


def parse_frame(text: str | bytes) -> Inbound | None:
    """Validate one frame from the service; see the module docstring."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    if not text.strip():
        return None  # keep-alive
    obj = _load_json(text, "frame")
    if not isinstance(obj, dict):
        return None  # foreign JSON
    obj = _lower_keys(obj)
    if "messageType" not in obj:
        return None  # foreign JSON (API Gateway errors and the like)
    kind = obj["messageType"]
    if not isinstance(kind, str):
        raise BadFrame(f"messageType is {_kind(kind)}, not a string")
    if kind not in KNOWN_TYPES:
        return None  # a newer message type: ignore, as the SDKs do
    if kind == "STATUS_RESPONSE":
        return Inbound(kind, None, None, _status(obj.get("statusResponse")))
    if kind not in PAYLOAD_TYPES:
        return Inbound(kind, None, None)  # GO_AWAY, RECONNECT_ICE_SERVER: payload unused
    sender = obj.get("senderClientId")
    where = kind
    if kind != "SDP_ANSWER":  # a viewer's SDP_ANSWER from the master carries no sender
        if not isinstance(sender, str):
            raise BadFrame(f"{kind}: senderClientId is {_kind(sender)}, not a string")
        if not ID_RE.match(sender):
            raise BadFrame(f"{kind}: senderClientId {sender[:60]!r} is not a KVS client id")
        where = f"{kind} from {sender}"
    elif sender is not None and not isinstance(sender, str):
        raise BadFrame(f"{kind}: senderClientId is {_kind(sender)}, not a string")
    payload = _payload(obj.get("messagePayload"), where)
    if kind == "ICE_CANDIDATE":
        try:
            return Inbound(kind, sender, validate_candidate(payload))
        except BadFrame as e:
            raise BadFrame(f"{where}: {e}") from None
    return Inbound(kind, sender, _description(payload, kind, where))


def _payload(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        raise BadFrame(f"{where}: messagePayload is missing")
    if not isinstance(raw, str):
        raise BadFrame(f"{where}: messagePayload is {_kind(raw)}, not a string")
    try:
        data = base64.b64decode(raw, validate=True)
    except (binascii.Error, ValueError) as e:  # ValueError: non-ASCII text
        raise BadFrame(f"{where}: messagePayload is not base64: {e}") from None
    obj = _load_json(data, f"{where}: messagePayload")
    if not isinstance(obj, dict):
        raise BadFrame(f"{where}: messagePayload is JSON {_kind(obj)}, not an object")
    return obj


def _description(payload: dict[str, Any], kind: str, where: str) -> dict[str, Any]:
    expected = "offer" if kind == "SDP_OFFER" else "answer"
    sdp = payload.get("sdp")
    if not isinstance(sdp, str) or not sdp.strip():
        raise BadFrame(f"{where}: sdp is {_kind(sdp)}, not a non-empty string")
    if payload.get("type", expected) != expected:
        raise BadFrame(f"{where}: type is {payload.get('type')!r}, not {expected!r}")
    return {"type": expected, "sdp": sdp}


def _status(status: Any) -> dict[str, Any]:
    if not isinstance(status, dict):
        raise BadFrame(f"STATUS_RESPONSE: statusResponse is {_kind(status)}, not an object")
    status = _lower_keys(status)
    out: dict[str, Any] = {}
    for key in ("correlationId", "errorType", "description"):
        value = status.get(key)
        if value is not None and not isinstance(value, str):
            raise BadFrame(f"STATUS_RESPONSE: {key} is {_kind(value)}, not a string")
        if value is not None:
            out[key] = value
    code = status.get("statusCode")
    if code is not None:
        if isinstance(code, bool) or not isinstance(code, str | int):
            raise BadFrame(f"STATUS_RESPONSE: statusCode is {_kind(code)}, not a string")
        out["statusCode"] = str(code)
    success = status.get("success")
    if success is not None:
        if not isinstance(success, bool):
            raise BadFrame(f"STATUS_RESPONSE: success is {_kind(success)}, not a boolean")
        out["success"] = success
    return out


def validate_candidate(obj: Any) -> dict[str, Any]:
    """A browser's RTCIceCandidate JSON -> ``{"candidate", "sdpMid", "sdpMLineIndex"}``.

    ``candidate`` loses its ``candidate:`` prefix (aiortc parses by position, so the prefix
    would end up in the foundation) and is "" for end-of-candidates. Raises
    :class:`BadFrame` for anything ``addIceCandidate`` or aioice would refuse: a non-string
    candidate, fewer than 8 fields, numbers that are not numbers, a transport other than
    udp/tcp, a type other than host/srflx/relay, an address that is neither IP nor mDNS,
    or neither ``sdpMid`` nor ``sdpMLineIndex``.
    """
    if not isinstance(obj, dict):
        raise BadFrame(f"candidate payload is {_kind(obj)}, not an object")
    text = obj.get("candidate")
    if not isinstance(text, str):
        raise BadFrame(f"candidate is {_kind(text)}, not a string")
    mid = obj.get("sdpMid")
    index = obj.get("sdpMLineIndex")
    if mid is not None and not isinstance(mid, str):
        raise BadFrame(f"sdpMid is {_kind(mid)}, not a string")
    if index is not None and (isinstance(index, bool) or not isinstance(index, int)):
        raise BadFrame(f"sdpMLineIndex is {_kind(index)}, not an integer")
    if index is not None and not 0 <= index < 1024:
        raise BadFrame(f"sdpMLineIndex {index} is out of range")
    text = text.strip()
    if text.startswith("candidate:"):
        text = text[len("candidate:") :]
    if text:
        if mid is None and index is None:
            raise BadFrame("candidate has neither sdpMid nor sdpMLineIndex")
        _check_candidate_line(text)
    return {"candidate": text, "sdpMid": mid, "sdpMLineIndex": index}


def _check_candidate_line(text: str) -> None:
    bits = text.split()
    shown = text[:80]
    if len(bits) < 8 or bits[6] != "typ":
        raise BadFrame(f"candidate {shown!r}: want '<foundation> <component> <transport> "
                       "<priority> <address> <port> typ <type> ...'")  # fmt: skip
    try:
        component, priority, port = int(bits[1]), int(bits[3]), int(bits[5])
    except ValueError:
        raise BadFrame(f"candidate {shown!r}: component, priority, port must be integers") from None
    if not 1 <= component <= 256:
        raise BadFrame(f"candidate {shown!r}: component {component} out of 1..256")
    if not 0 <= priority < 2**32:
        raise BadFrame(f"candidate {shown!r}: priority {priority} out of range")
    if not 0 <= port <= 65535:
        raise BadFrame(f"candidate {shown!r}: port {port} out of range")
    if bits[2].lower() not in ("udp", "tcp"):
        raise BadFrame(f"candidate {shown!r}: transport {bits[2]!r} is not udp or tcp")
    if bits[7] not in CANDIDATE_TYPES:
        raise BadFrame(f"candidate {shown!r}: type {bits[7]!r} is not host, srflx or relay")
    if not MDNS_RE.match(bits[4]):
        try:
            ipaddress.ip_address(bits[4])
        except ValueError:
            raise BadFrame(f"candidate {shown!r}: {bits[4][:60]!r} is not an IP") from None
    for i in range(8, len(bits) - 1, 2):  # aiortc int()s these
        if bits[i] in ("rport", "generation") and not re.fullmatch(r"[0-9]{1,10}", bits[i + 1]):
            raise BadFrame(f"candidate {shown!r}: {bits[i]} {bits[i + 1][:20]!r} is not a number")
