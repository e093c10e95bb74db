"""The SDK's input event path made cheaper: the same bytes on the wire, less CPU per event.

Every 32 ms microphone frame becomes one ``InvokeModelWithBidirectionalStreamInputChunk``
that the SDK serializes (smithy's schema serializer: ``{"bytes": base64}`` plus three
headers), signs (aws_sdk_signers' ``AsyncEventSigner``) and frames (AWS event stream).
Measured per event on the 2-core development machine, tight loop (bench/sonic_send.py):
~180 us, of which serializing ~60, signing ~80 (five HMACs: the SigV4 signing key is
derived again for every event), framing twice ~30; in the running stack, caches cold, the
same work took 0.47 ms p50 / 0.7 ms p99 of the uplink (issue 10).

With the hooks (same machine, bench/sonic_send.py, 3000 events, other developers' tests
running): 183 -> 33 us p50 per event back to back, 420 -> 135-140 us with the caches
cold; in the running stack (bench/sonic_latency.py's instrumented hops) the SDK send to
the request body took 0.19 ms p50 / 0.27 ms p99, was 0.47 / 0.7.

Two replacements, each plugged in where the SDK offers a seam, each producing byte for
byte what the SDK's own code produces (test/test_sonic_unit_sdk_hooks.py compares them
with hypothesis over random events, dates, keys and chains):

- :class:`CachedKeyEventSigner`, a subclass of ``AsyncEventSigner``, given to the SDK by
  :class:`CachedKeySigV4AuthScheme` (the client config's ``auth_schemes``): keeps the
  derived signing key per (secret, day, region, service), builds the string to sign in
  bytes, encodes the ``:date`` header, the inner message and the signed envelope directly.
- :class:`ChunkPublisher`, a subclass of the SDK's ``AWSEventPublisher``, made by
  :class:`ChunkProtocol` (the client config's ``protocol``): an input chunk's message is
  built directly (headers and JSON payload are fixed by the model), everything else
  (other events, close with its final signed empty frame) is the SDK's own code.

Both reach into library internals (the signer's chain state, the publisher's writer and
signing config), so they are used only with the versions they were checked against
(:data:`TESTED`) and when :func:`check_hook_points` finds what they need; otherwise the
SDK's own path runs, with one log line. The unit test fails loudly on an upgrade.
"""

from __future__ import annotations

import datetime as _dt
import hmac
import logging
from base64 import b64encode
from binascii import crc32, hexlify
from collections.abc import Mapping
from functools import cache
from hashlib import sha256
from importlib.metadata import PackageNotFoundError, version
from struct import Struct
from typing import Any

from aws_sdk_signers import AsyncEventSigner
from aws_sdk_signers.signers import SIGV4_TIMESTAMP_FORMAT
from smithy_aws_core.aio.protocols import RestJsonClientProtocol
from smithy_aws_core.auth import SigV4AuthScheme
from smithy_aws_event_stream.aio import AWSEventPublisher
from smithy_aws_event_stream.events import (
    MAX_HEADERS_LENGTH,
    MAX_PAYLOAD_LENGTH,
    EventHeaderEncoder,
    EventMessage,
)
from smithy_aws_event_stream.exceptions import InvalidHeadersLength, InvalidPayloadLength

log = logging.getLogger(__name__)

# The distributions whose internals these hooks rely on, and the versions checked.
TESTED = {
    "aws-sdk-signers": "0.4.0",
    "smithy-aws-event-stream": "0.3.0",
    "smithy-aws-core": "0.12.0",
    "smithy-core": "0.9.0",
    "smithy-json": "0.3.0",
    "aws_sdk_bedrock_runtime": "0.12.0",
}

_I32 = Struct("!I")
_PRELUDE = Struct("!II")
_Q = Struct("!q")
# ``:date`` (timestamp, type 8) and ``:chunk-signature`` (bytes, type 6, 32 bytes), as
# EventHeaderEncoder writes them: key length, key, type, value.
_DATE_KEY = b"\x05:date\x08"
_SIG_KEY = b"\x10:chunk-signature\x06\x00\x20"


class HookError(RuntimeError):
    """The SDK's internals no longer look like the versions these hooks were written for."""


def installed_versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for dist in TESTED:
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def check_hook_points() -> None:
    """Raise :class:`HookError` naming what changed, if anything the hooks rely on did."""
    problems = [
        f"{dist} {have} (checked with {TESTED[dist]})"
        for dist, have in installed_versions().items()
        if have != TESTED[dist]
    ]
    signer = AsyncEventSigner(initial_signature=b"0" * 64, event_encoder_cls=EventHeaderEncoder)
    for name in ("_prior_signature", "_is_finalized", "_event_encoder_cls"):
        if not hasattr(signer, name):
            problems.append(f"AsyncEventSigner.{name} is gone")
    if not callable(getattr(AsyncEventSigner, "_sign_payload", None)):
        problems.append("AsyncEventSigner._sign_payload is gone")
    from smithy_json import JSONCodec

    publisher = AWSEventPublisher(payload_codec=JSONCodec(), async_writer=None)  # type: ignore[arg-type]
    for name in ("_writer", "_signing_config", "_serializer", "_closed"):
        if not hasattr(publisher, name):
            problems.append(f"AWSEventPublisher.{name} is gone")
    if problems:
        raise HookError("the SDK's event path changed: " + "; ".join(problems))


@cache
def enabled() -> bool:
    """True when the hooks may replace the SDK's code (checked once per process)."""
    try:
        check_hook_points()
    except HookError as exc:
        log.info("the SDK's own event signing and serialization are used: %s", exc)
        return False
    return True


# --------------------------------------------------------------------------- framing
def encode_frame(headers: bytes, payload: bytes) -> bytes:
    """One event stream message, as ``smithy_aws_event_stream``'s ``_EventEncoder`` writes
    it: prelude, prelude CRC, headers, payload, then the CRC of all that (the SDK computes
    it from the prelude's CRC on: the same CRC-32)."""
    if len(headers) > MAX_HEADERS_LENGTH:
        raise InvalidHeadersLength(len(headers))
    if len(payload) > MAX_PAYLOAD_LENGTH:
        raise InvalidPayloadLength(len(payload))
    prelude = _PRELUDE.pack(len(headers) + len(payload) + 16, len(headers))
    body = b"".join((prelude, _I32.pack(crc32(prelude)), headers, payload))
    return body + _I32.pack(crc32(body))


class _HeaderBytes:
    """The last header block seen, when all its values are ``str``: every event of a stream
    has the same three headers. (A dict of ``str`` values equals only dicts whose values
    are ``str`` too, which encode alike; ``1 == True`` cannot alias here.)"""

    def __init__(self) -> None:
        self._last: dict[str, Any] | None = None
        self._bytes = b""

    def __call__(self, headers: Mapping[str, Any]) -> bytes:
        if headers == self._last:
            return self._bytes
        encoder = EventHeaderEncoder()  # as EventMessage.encode()
        encoder.encode_headers(headers)
        result = encoder.get_result()
        if all(type(v) is str for v in headers.values()):
            self._last, self._bytes = dict(headers), result
        return result


# --------------------------------------------------------------------------- signing
def _utcnow() -> _dt.datetime:
    """The signing clock, as aws_sdk_signers reads it (one place for tests to fix it)."""
    return _dt.datetime.now(_dt.UTC)


class _Hmac:
    """HMAC-SHA256 with one key, its padded key blocks hashed once (RFC 2104): 2 us a
    message instead of ``hmac.digest``'s 5 (OpenSSL 3 sets up its HMAC context each time).
    Checked against ``hmac`` by the unit test."""

    def __init__(self, key: bytes) -> None:
        block = key.ljust(64, b"\0") if len(key) <= 64 else sha256(key).digest().ljust(64, b"\0")
        self._inner = sha256(bytes(b ^ 0x36 for b in block))
        self._outer = sha256(bytes(b ^ 0x5C for b in block))

    def digest(self, msg: bytes) -> bytes:
        inner = self._inner.copy()
        inner.update(msg)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()


class SignedEnvelope(EventMessage):
    """The signed message (``:date``, ``:chunk-signature``, the inner message as payload)
    with its wire form made while signing: ``encode()`` returns it unless the headers or
    the payload were changed since."""

    def __init__(self, headers: dict[str, Any], payload: bytes, wire: bytes) -> None:
        super().__init__(headers=headers, payload=payload)
        self._signed = (dict(headers), payload, wire)

    def encode(self) -> bytes:
        headers, payload, wire = self._signed
        if self.payload is payload and self.headers == headers:
            return wire
        return super().encode()


class CachedKeyEventSigner(AsyncEventSigner):
    """``AsyncEventSigner`` with the same signatures and less work per event.

    The stock signer derives the SigV4 signing key (four HMACs) for every event, formats
    the date with ``strftime``, builds the string to sign as ``str`` and encodes headers
    through a general encoder, twice. Here the key is kept per (secret, day, region,
    service), the timestamp per second, the inner message's headers per value, and the
    envelope's wire form is made while signing. Nothing awaits between reading and
    advancing the chain, so no lock is needed on one event loop; ``sign_empty`` is the
    base class's (same check, same chain).
    """

    def __init__(self, *, initial_signature: bytes, event_encoder_cls: Any) -> None:
        super().__init__(initial_signature=initial_signature, event_encoder_cls=event_encoder_cls)
        self._headers = _HeaderBytes()
        self._key_for: tuple[str, str, str, str] | None = None
        self._key = _Hmac(b"")
        self._scope = b""
        self._second = -1
        self._stamp = ""
        self._stamp_b = b""

    async def sign(self, *, event: EventMessage, identity: Any, properties: Any) -> EventMessage:
        if type(event) is EventMessage:  # else its own encode(), as the stock signer
            payload = encode_frame(self._headers(event.headers), event.payload)
        else:
            payload = event.encode()
        return self._sign_now(event, payload, identity, properties, False)

    async def _sign_payload(
        self,
        *,
        event: EventMessage,
        payload: bytes,
        identity: Any,
        properties: Any,
        is_final: bool = False,
    ) -> EventMessage:
        return self._sign_now(event, payload, identity, properties, is_final)

    def _timestamp(self, now: _dt.datetime, millis: int) -> str:
        # strftime to the second is a function of the whole second (millis >= 0).
        second = millis // 1000
        if second != self._second or millis < 0:
            self._second, self._stamp = second, now.strftime(SIGV4_TIMESTAMP_FORMAT)
            self._stamp_b = self._stamp.encode()
        return self._stamp

    def _signing_key(self, secret: str, day: str, region: str, service: str) -> _Hmac:
        key_for = (secret, day, region, service)
        if key_for != self._key_for:
            k = hmac.digest(b"AWS4" + secret.encode(), day.encode(), "sha256")
            k = hmac.digest(k, region.encode(), "sha256")
            k = hmac.digest(k, service.encode(), "sha256")
            self._key = _Hmac(hmac.digest(k, b"aws4_request", "sha256"))
            self._scope = f"{day}/{region}/{service}/aws4_request".encode()
            self._key_for = key_for
        return self._key

    def _sign_now(
        self, event: EventMessage, payload: bytes, identity: Any, properties: Any, final: bool
    ) -> EventMessage:
        now, signature, wire = self._chain(payload, identity, properties, final)
        headers: dict[str, Any] = {":date": now, ":chunk-signature": signature}
        # As the stock signer: the event itself carries the signed form too.
        event.headers = headers
        event.payload = payload
        return SignedEnvelope(headers, payload, wire)

    def sign_frame(self, frame: bytes, identity: Any, properties: Any) -> bytes:
        """The wire form of ``sign`` for an event already framed (``encode_frame``): what
        :class:`ChunkPublisher` writes, without the message objects in between."""
        return self._chain(frame, identity, properties, False)[2]

    def _chain(
        self, payload: bytes, identity: Any, properties: Any, final: bool
    ) -> tuple[_dt.datetime, bytes, bytes]:
        """Sign ``payload`` (an encoded message, or b"" for the end) as the next link of
        the chain: the signing instant, the signature, the signed envelope's wire form."""
        if self._is_finalized:
            raise RuntimeError(
                "Cannot sign event stream messages after the final empty event has been signed."
            )
        now = _utcnow()
        millis = int(now.timestamp() * 1000)  # as EventHeaderEncoder.encode_timestamp
        if "date" in properties:
            timestamp = properties["date"]
            stamp = timestamp.encode()
        else:
            timestamp = self._timestamp(now, millis)
            stamp = self._stamp_b
        key = self._signing_key(
            identity.secret_access_key, timestamp[:8], properties["region"], properties["service"]
        )
        date_header = _DATE_KEY + _Q.pack(millis)
        string_to_sign = b"\n".join(
            (
                b"AWS4-HMAC-SHA256-PAYLOAD",
                stamp,
                self._scope,
                self._prior_signature,
                hexlify(sha256(date_header).digest()),
                hexlify(sha256(payload).digest()),
            )
        )
        signature = key.digest(string_to_sign)
        wire = encode_frame(date_header + _SIG_KEY + signature, payload)
        self._prior_signature = hexlify(signature)
        if final:
            self._is_finalized = True
        return now, signature, wire


class CachedKeySigV4AuthScheme(SigV4AuthScheme):
    """The SDK's SigV4 scheme; its event streams are signed by :class:`CachedKeyEventSigner`."""

    def event_signer(self, *, request: Any) -> Any:
        stock = super().event_signer(request=request)
        if (
            type(stock) is not AsyncEventSigner
            or stock._event_encoder_cls is not EventHeaderEncoder
        ):
            return stock
        return CachedKeyEventSigner(
            initial_signature=stock._prior_signature, event_encoder_cls=stock._event_encoder_cls
        )


# --------------------------------------------------------------------------- serializing
# What the SDK's EventSerializer makes of an input chunk (checked against it for every
# publisher, and by the unit test over random bytes).
CHUNK_HEADERS = (
    (":message-type", "event"),
    (":event-type", "chunk"),
    (":content-type", "application/json"),
)


def _chunk_payload(data: bytes) -> bytes:
    return b'{"bytes":"' + b64encode(data) + b'"}'


def chunk_message(data: bytes) -> EventMessage:
    """The message of ``InvokeModelWithBidirectionalStreamInputChunk(bytes_=data)``."""
    return EventMessage(headers=dict(CHUNK_HEADERS), payload=_chunk_payload(data))


class ChunkPublisher(AWSEventPublisher[Any]):
    """The SDK's event publisher with input chunks serialized directly.

    A chunk's message is built in ~2 us instead of the schema serializer's ~60; it is then
    signed and written as the SDK does (the same signer, identity resolver and writer, and
    on a failed write the same close and ``OSError``). Any other event, and ``close`` (the
    final signed empty frame), is the SDK's own code.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        from aws_sdk_bedrock_runtime.models import (
            BidirectionalInputPayloadPart,
            InvokeModelWithBidirectionalStreamInputChunk,
        )

        self._chunk_types = (
            InvokeModelWithBidirectionalStreamInputChunk,
            BidirectionalInputPayloadPart,
        )
        encoder = EventHeaderEncoder()
        encoder.encode_headers(dict(CHUNK_HEADERS))
        self._chunk_headers = encoder.get_result()
        self._direct = self._signing_config is not None and self._same_as_sdk()

    def _same_as_sdk(self) -> bool:
        """The SDK's serializer makes the same message of a probe chunk (else: its path)."""
        chunk_t, part_t = self._chunk_types
        probe = b"\x00\x01probe\xfe\xff"
        chunk_t(value=part_t(bytes_=probe)).serialize(self._serializer)
        theirs = self._serializer.get_result()
        ours = encode_frame(self._chunk_headers, _chunk_payload(probe))  # what send() writes
        same = theirs is not None and theirs.encode() == ours
        if not same:
            log.warning("input chunks go through the SDK's serializer: it frames them differently")
        return same

    async def send(self, event: Any) -> None:
        chunk_t, part_t = self._chunk_types
        if (
            not self._direct
            or type(event) is not chunk_t
            or type(event.value) is not part_t
            or event.value.bytes_ is None
        ):
            return await super().send(event)
        if self._closed:
            raise OSError("Attempted to write to closed stream.")
        config = self._signing_config
        identity = await config.identity_resolver.get_identity(
            properties=config.identity_properties
        )
        signer = config.signer
        if type(signer) is CachedKeyEventSigner:  # the message objects skipped: ~10 % less
            frame = encode_frame(self._chunk_headers, _chunk_payload(event.value.bytes_))
            data = signer.sign_frame(frame, identity, config.signing_properties)
        else:
            signed = await signer.sign(
                event=chunk_message(event.value.bytes_),
                identity=identity,
                properties=config.signing_properties,
            )
            data = signed.encode()
        try:
            await self._writer.write(data)
        except Exception as e:
            await self.close()
            raise OSError("Failed to write to stream.") from e


class ChunkProtocol(RestJsonClientProtocol):
    """The SDK's restJson1 protocol; its input streams are :class:`ChunkPublisher`s."""

    def create_event_publisher(self, **kwargs: Any) -> Any:
        sdk = super().create_event_publisher(**kwargs)
        if type(sdk) is not AWSEventPublisher:
            return sdk
        # The SDK's publisher is the template: the request body it writes to and the
        # signing config it built from the auth scheme.
        return ChunkPublisher(
            payload_codec=self.payload_codec,
            async_writer=sdk._writer,
            signing_config=sdk._signing_config,
        )


def config_overrides(service: str = "bedrock") -> dict[str, Any]:
    """What ``AsyncBedrockRuntimeConfig.resolve`` takes to use these hooks (empty when the
    installed SDK is not one they were checked with)."""
    if not enabled():
        return {}
    from smithy_core.shapes import ShapeID

    return {
        "protocol": ChunkProtocol,  # a type: the config builds it with its own settings
        "auth_schemes": {ShapeID("aws.auth#sigv4"): CachedKeySigV4AuthScheme(service=service)},
    }
