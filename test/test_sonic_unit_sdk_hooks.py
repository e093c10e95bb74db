"""sonic/sdk_hooks.py against the SDK's own code: the same bytes for every input event.

The stand-in verifies the SigV4 event chain (test_sonic_emulator, test_sonic_session), but
only for the dates, keys and payloads a conversation happens to use. Here hypothesis draws
them: chains of events with random payloads, headers, signing instants (across second and
day boundaries), secrets, regions; the stock ``AsyncEventSigner`` / ``AWSEventPublisher``
and the hooks run on one fixed clock and must write the same frames, to the end frame.
The first test fails when a pinned SDK package moves (the hooks then stand aside).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import hmac
import types
from collections.abc import Iterator
from hashlib import sha256
from typing import Any

import aws_sdk_signers.signers as stock_signers
import numpy as np
import pytest
from aws_sdk_bedrock_runtime.models import (
    BidirectionalInputPayloadPart,
    InvokeModelWithBidirectionalStreamInputChunk,
)
from aws_sdk_signers import AsyncEventSigner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from smithy_aws_core.identity import AWSCredentialsIdentity
from smithy_aws_core.identity.static import StaticCredentialsResolver
from smithy_aws_event_stream._private.serializers import EventSerializer
from smithy_aws_event_stream.aio import AWSEventPublisher, SigningConfig
from smithy_aws_event_stream.events import Byte, EventHeaderEncoder, EventMessage, Long
from smithy_aws_event_stream.exceptions import InvalidPayloadLength
from smithy_json import JSONCodec

from sonic_voice.emulators.sonic import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, EmulatorThread
from sonic_voice.sonic import events as E
from sonic_voice.sonic import sdk_hooks
from sonic_voice.sonic.transport import BedrockSettings, open_stream

pytestmark = pytest.mark.timeout(120)

UTC = dt.UTC
instants = st.datetimes(
    min_value=dt.datetime(2000, 1, 1), max_value=dt.datetime(2099, 12, 31), timezones=st.just(UTC)
)
# Around second and day boundaries, where a cached timestamp or key could go stale.
edges = st.builds(
    lambda day, second, us: (
        dt.datetime(2026, 11, 30, tzinfo=UTC)
        + dt.timedelta(days=day, seconds=second, microseconds=us)
    ),
    st.integers(0, 2),
    st.sampled_from([0, 1, 86398, 86399]),
    st.sampled_from([0, 1, 499999, 999998, 999999]),
)
header_values = st.one_of(
    st.text(max_size=12),
    st.integers(-(2**31), 2**31 - 1),
    st.booleans(),
    st.binary(max_size=8),
    st.integers(-128, 127).map(Byte),
    st.integers(-(2**63), 2**63 - 1).map(Long),
)
chunk_headers = st.just(dict(sdk_hooks.CHUNK_HEADERS))
headers = st.one_of(
    chunk_headers,
    chunk_headers,
    st.dictionaries(st.sampled_from([":a", ":b", "x-y"]), header_values, max_size=3),
)
regions = st.sampled_from(["us-east-1", "eu-north-1", "ap-northeast-1"])
# Per event: headers, payload, the signing instant, which of two secrets (credentials
# refreshed mid-stream), the region.
events = st.lists(
    st.tuples(
        headers, st.binary(max_size=300), st.one_of(instants, edges), st.integers(0, 1), regions
    ),
    min_size=1,
    max_size=8,
)
secrets = st.one_of(st.just(DEFAULT_SECRET_KEY), st.text(min_size=1, max_size=60))


@contextlib.contextmanager
def clock() -> Iterator[list[dt.datetime]]:
    """One clock for the stock signer and the hooks: set ``now[0]``."""
    now = [dt.datetime(2026, 11, 30, 12, tzinfo=UTC)]

    class Clock(dt.datetime):
        @classmethod
        def now(cls, tz: Any = None) -> dt.datetime:  # type: ignore[override]
            return now[0]

    saved = stock_signers.datetime, sdk_hooks._utcnow
    stock_signers.datetime = types.SimpleNamespace(datetime=Clock, UTC=UTC)  # type: ignore[assignment]
    sdk_hooks._utcnow = lambda: now[0]
    try:
        yield now
    finally:
        stock_signers.datetime, sdk_hooks._utcnow = saved  # type: ignore[assignment]


def signers(initial: bytes) -> tuple[AsyncEventSigner, sdk_hooks.CachedKeyEventSigner]:
    kw = {"initial_signature": initial, "event_encoder_cls": EventHeaderEncoder}
    return AsyncEventSigner(**kw), sdk_hooks.CachedKeyEventSigner(**kw)


def test_the_hooks_are_used_with_the_pinned_sdk() -> None:
    """Fails first when a pinned package moves: check the hooks against the new internals
    (the other tests here), then update sdk_hooks.TESTED."""
    assert sdk_hooks.installed_versions() == sdk_hooks.TESTED
    sdk_hooks.check_hook_points()
    assert sdk_hooks.enabled()
    over = sdk_hooks.config_overrides()
    assert over["protocol"] is sdk_hooks.ChunkProtocol
    (scheme,) = over["auth_schemes"].values()
    assert isinstance(scheme, sdk_hooks.CachedKeySigV4AuthScheme)


def test_another_sdk_version_gets_the_sdks_own_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sdk_hooks.TESTED, "aws-sdk-signers", "0.0.0")
    sdk_hooks.enabled.cache_clear()
    try:
        with pytest.raises(sdk_hooks.HookError, match=r"aws-sdk-signers 0\.4\.0"):
            sdk_hooks.check_hook_points()
        assert sdk_hooks.config_overrides() == {}
    finally:
        monkeypatch.undo()
        sdk_hooks.enabled.cache_clear()
    assert sdk_hooks.enabled()


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(events, secrets, secrets, st.booleans(), st.binary(min_size=1, max_size=32))
def test_the_signature_chain_is_the_stock_signers(
    evs: list[tuple[dict[str, Any], bytes, dt.datetime, int, str]],
    secret: str,
    other_secret: str,
    date_given: bool,
    initial: bytes,
) -> None:
    """Every signed envelope (its wire bytes, its headers, the event it mutates) and the
    final empty one equal the stock signer's; a chain that once went wrong stays wrong, so
    any stale key, scope, timestamp or header block shows."""
    identities = [
        AWSCredentialsIdentity(access_key_id="AKID", secret_access_key=s)
        for s in (secret, other_secret)
    ]

    async def run() -> None:
        stock, ours = signers(initial.hex().encode())  # the request's signature, in hex
        props: dict[str, Any] = {}
        with clock() as now:
            for hdrs, payload, when, who, region in evs:
                now[0] = when
                props = {"region": region, "service": "bedrock"}
                if date_given:
                    props["date"] = "20260101T000000Z"
                a = await stock.sign(
                    event=EventMessage(headers=dict(hdrs), payload=payload),
                    identity=identities[who],
                    properties=props,
                )
                b = await ours.sign(
                    event=EventMessage(headers=dict(hdrs), payload=payload),
                    identity=identities[who],
                    properties=props,
                )
                assert b.encode() == a.encode()
                assert b.headers == a.headers and b.payload == a.payload
            now[0] += dt.timedelta(seconds=1)
            last = {"identity": identities[0], "properties": props}
            a = await stock.sign_empty(event=EventMessage(), **last)
            b = await ours.sign_empty(event=EventMessage(), **last)
            assert b.encode() == a.encode()
            with pytest.raises(RuntimeError, match="final empty event"):
                await ours.sign(event=EventMessage(), **last)

    asyncio.run(run())


def test_equal_headers_of_other_types_are_not_taken_for_each_other() -> None:
    """``{":a": 1} == {":a": True} == {":a": Byte(1)}`` but each encodes differently: the
    header block kept from the last event must not be reused for them."""
    identity = AWSCredentialsIdentity(access_key_id="AKID", secret_access_key="s")
    props = {"region": "us-east-1", "service": "bedrock"}

    async def run() -> None:
        stock, ours = signers(b"ab" * 32)
        with clock():
            for value in ("1", 1, True, Byte(1), Long(1), "1"):
                for _ in range(2):
                    hdrs = {":a": value}
                    a = await stock.sign(
                        event=EventMessage(headers=hdrs), identity=identity, properties=props
                    )
                    b = await ours.sign(
                        event=EventMessage(headers=dict(hdrs)), identity=identity, properties=props
                    )
                    assert b.encode() == a.encode(), value

    asyncio.run(run())


def test_a_signed_envelope_changed_later_encodes_what_it_holds() -> None:
    """Its wire form is made while signing; once its headers or payload change, encode()
    is EventMessage's again."""
    identity = AWSCredentialsIdentity(access_key_id="AKID", secret_access_key="s")
    props = {"region": "us-east-1", "service": "bedrock"}
    _, ours = signers(b"ab" * 32)
    signed = asyncio.run(ours.sign(event=EventMessage(), identity=identity, properties=props))
    assert isinstance(signed, sdk_hooks.SignedEnvelope)
    assert signed.encode() == EventMessage(headers=signed.headers, payload=signed.payload).encode()
    signed.headers[":chunk-signature"] = bytes(32)  # type: ignore[index]
    assert signed.encode() == EventMessage(headers=signed.headers, payload=signed.payload).encode()
    signed.payload = b"other"
    assert signed.encode() == EventMessage(headers=signed.headers, payload=b"other").encode()


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=4000))
def test_a_chunk_message_is_the_sdk_serializers(data: bytes) -> None:
    serializer = EventSerializer(payload_codec=JSONCodec())
    InvokeModelWithBidirectionalStreamInputChunk(
        value=BidirectionalInputPayloadPart(bytes_=data)
    ).serialize(serializer)
    theirs = serializer.get_result()
    ours = sdk_hooks.chunk_message(data)
    assert theirs is not None
    assert list(ours.headers.items()) == list(theirs.headers.items())  # order matters
    assert ours.payload == theirs.payload and ours.encode() == theirs.encode()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=200), st.binary(max_size=2000))
def test_framing_and_hmac_are_the_sdks(key: bytes, msg: bytes) -> None:
    assert sdk_hooks._Hmac(key).digest(msg) == hmac.digest(key, msg, sha256)
    message = EventMessage(headers={":k": msg[:100].hex()}, payload=msg)
    assert sdk_hooks.encode_frame(message._get_headers_bytes(), msg) == message.encode()


def test_framing_keeps_the_sdks_limits() -> None:
    with pytest.raises(InvalidPayloadLength):
        sdk_hooks.encode_frame(b"", bytes(16 * 1024**2 + 1))


class Sink:
    def __init__(self, fail_after: int = -1) -> None:
        self.frames: list[bytes] = []
        self.closed = False
        self._fail_after = fail_after

    async def write(self, data: bytes) -> None:
        if len(self.frames) == self._fail_after:
            raise ConnectionError("gone")
        self.frames.append(data)

    async def close(self) -> None:
        self.closed = True


def publishers(
    secret: str, fail_after: int = -1
) -> tuple[AWSEventPublisher[Any], sdk_hooks.ChunkPublisher, Sink, Sink]:
    identity = StaticCredentialsResolver(
        AWSCredentialsIdentity(access_key_id="AKID", secret_access_key=secret)
    )
    stock_signer, our_signer = signers(b"ab" * 32)

    def cfg(signer: Any) -> SigningConfig:
        return SigningConfig(
            signer=signer,
            signing_properties={"region": "us-east-1", "service": "bedrock"},
            identity_resolver=identity,
            identity_properties={},
        )

    a, b = Sink(fail_after), Sink(fail_after)
    stock = AWSEventPublisher(
        payload_codec=JSONCodec(), async_writer=a, signing_config=cfg(stock_signer)
    )
    ours = sdk_hooks.ChunkPublisher(
        payload_codec=JSONCodec(), async_writer=b, signing_config=cfg(our_signer)
    )
    return stock, ours, a, b


@settings(max_examples=150, deadline=None)
@given(
    st.lists(st.one_of(st.binary(max_size=1500), st.none()), min_size=1, max_size=6),
    st.lists(st.one_of(instants, edges), min_size=7, max_size=7),
    secrets,
)
def test_the_chunk_publisher_writes_the_sdks_frames(
    payloads: list[bytes | None], whens: list[dt.datetime], secret: str
) -> None:
    """Chunks (and a chunk without bytes, which takes the SDK's path) then close: the same
    frames, the final signed empty frame included, and the writer closed."""
    stock, ours, a, b = publishers(secret)
    assert ours._direct  # the probe found the SDK's serializer agrees

    async def run() -> None:
        with clock() as now:
            for when, data in zip(whens, payloads, strict=False):
                now[0] = when
                for pub in (stock, ours):
                    await pub.send(
                        InvokeModelWithBidirectionalStreamInputChunk(
                            value=BidirectionalInputPayloadPart(bytes_=data)
                        )
                    )
            now[0] = whens[-1]
            await stock.close()
            await ours.close()

    asyncio.run(run())
    assert b.frames == a.frames and len(a.frames) == len(payloads) + 1
    assert a.closed and b.closed and ours.closed


def test_a_failed_write_closes_as_the_sdk_does() -> None:
    """The writer fails (the HTTP stream is gone): the same error, the publisher closed
    (its end frame fails too: the writer's error), later sends refused alike."""
    stock, ours, a, b = publishers(DEFAULT_SECRET_KEY, fail_after=1)
    chunk = InvokeModelWithBidirectionalStreamInputChunk(
        value=BidirectionalInputPayloadPart(bytes_=b"{}")
    )

    async def outcome(pub: Any) -> list[str]:
        seen = []
        for _ in range(3):
            try:
                await pub.send(chunk)
                seen.append("sent")
            except OSError as exc:
                seen.append(f"{type(exc).__name__}: {exc}")
        return [*seen, f"closed={pub.closed}"]

    theirs = asyncio.run(outcome(stock))
    assert theirs == [
        "sent",
        "ConnectionError: gone",
        "OSError: Attempted to write to closed stream.",
        "closed=True",
    ]
    assert asyncio.run(outcome(ours)) == theirs
    assert a.closed and b.closed and len(a.frames) == len(b.frames) == 1


async def test_the_product_stream_uses_the_hooks_and_the_stand_in_verifies_them() -> None:
    """open_stream against the stand-in, which checks the request signature, each
    envelope's signature in the running chain and the signed end frame."""
    emu = EmulatorThread(scenario={"turns": []}, realtime=False).start()
    try:
        stream = await open_stream(
            BedrockSettings(
                endpoint_uri=emu.endpoint_uri,
                ca_bundle=emu.ca_file,
                access_key_id=DEFAULT_ACCESS_KEY,
                secret_access_key=DEFAULT_SECRET_KEY,
            )
        )
        publisher = stream._duplex.input_stream
        assert isinstance(publisher, sdk_hooks.ChunkPublisher) and publisher._direct
        assert isinstance(publisher._signing_config.signer, sdk_hooks.CachedKeyEventSigner)
        await stream.send(E.session_start())
        await stream.send(E.prompt_start("p", "tiffany"))
        await stream.send(E.audio_content_start("p", "a"))
        for i in range(40):
            await stream.send(E.audio_input("p", "a", bytes([i]) * 1024))
        await stream.send(E.content_end("p", "a"))
        await stream.close()
        rec = emu.records[0]
        assert rec.signature_chain_ok and rec.signed_frames >= 44
        assert rec.end_frame_received
    finally:
        emu.stop()


async def test_a_pushed_frame_reaches_the_sdk_before_push_audio_returns() -> None:
    """The session writes a frame queued on an idle stream in the same step (an eager
    sender, SonicSession._kick), not one loop iteration later; through the real SDK a
    send does not wait while its body buffer has room. Frames stay in order."""
    from sonic_voice.sonic.session import SessionConfig, SonicSession

    from test.test_sonic_session import FRAME, tagged_frames

    emu = EmulatorThread(scenario={"turns": []}, realtime=False).start()
    session = SonicSession(
        BedrockSettings(
            endpoint_uri=emu.endpoint_uri,
            ca_bundle=emu.ca_file,
            access_key_id=DEFAULT_ACCESS_KEY,
            secret_access_key=DEFAULT_SECRET_KEY,
        ),
        SessionConfig(),
    )
    try:
        await session.start()
        leg = session._leg
        assert leg is not None
        for _ in range(200):  # the preamble written
            if not leg.sending_queue and leg.queue.empty():
                break
            await asyncio.sleep(0.01)
        written_at_once = 0
        frames = tagged_frames(20)
        for f in frames:
            before = leg.frames_sent
            session.push_audio(f.tobytes())  # as the node hands them over
            written_at_once += leg.frames_sent == before + 1
            await asyncio.sleep(0.005)  # the SDK's body writer drains its buffer
        assert written_at_once == len(frames)
        await asyncio.sleep(0.3)
        await session.stop()
        rec = emu.records[0]
        assert rec.signature_chain_ok and rec.end_frame_received
        rows = np.frombuffer(bytes(rec.pcm), "<i2").reshape(-1, FRAME)
        ids = [int(r[1] - 1) * 997 + int(r[0] - 1) for r in rows if r[0] > 0]
        assert ids == list(range(len(frames)))  # all of them, in order
    finally:
        await session.stop()
        emu.stop()
