"""KVS pure parts: the cases bench/mutation.py found untested or covered only by the slow
real-WebRTC tests (test_kvs_link, test_kvs_node, which the benchmark leaves out).

Settings bounds, the presigned URL, inbound data-channel messages, the ICE server list
and the control plane's cache, against the KVS stand-in (real boto3 and botocore signing).
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import parse_qs, urlsplit

import pytest
from botocore.credentials import ReadOnlyCredentials

from sonic_voice.emulators.kvs import KvsEmulator
from sonic_voice.kvs.control import ControlPlane
from sonic_voice.kvs.ice import IceConfig, _turn_rank
from sonic_voice.kvs.messages import RejectedMessage, dumps, parse_inbound
from sonic_voice.kvs.settings import KvsSettings
from sonic_voice.kvs.signing import presign_wss_url

SECRET = "test-secret"
CREDS = ReadOnlyCredentials("AKIDTEST", SECRET, None)
ARN = "arn:aws:kinesisvideo:us-west-2:123456789012:channel/robot/1"


# -- settings ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("field", "good", "bad"),
    [
        ("max_viewers", [1, 100], [0, 101]),
        ("message_ttl_s", [5, 120], [4, 121]),
        ("opus_bitrate", [6000, 510000], [5999, 510001]),
        ("opus_packet_loss_pct", [0, 100], [-1, 101]),
    ],
)
def test_settings_bounds_are_inclusive(field: str, good: list[int], bad: list[int]) -> None:
    """Kills: a bound made exclusive or dropped (``not 0 <= x <= 100`` -> ``0 <= x...``)."""
    for v in good:
        assert getattr(KvsSettings("robot", **{field: v}), field) == v
    for v in bad:
        with pytest.raises(ValueError, match=field):
            KvsSettings("robot", **{field: v})


@pytest.mark.parametrize("field", ["signaling_rate_per_s", "sdp_rate_per_s"])
def test_signaling_rates_must_be_positive(field: str) -> None:
    """Kills ``> 0`` -> ``>= 0`` (settings.py): a rate of 0 would make signaling's Pacer
    unpaced (``Pacer(0)`` means no limit) and break KVS's limits (SDP 5/s) unnoticed."""
    assert getattr(KvsSettings("robot", **{field: 0.001}), field) == 0.001
    for bad in (0, 0.0, -1.0):
        with pytest.raises(ValueError, match=field):
            KvsSettings("robot", **{field: bad})


# -- presigned URL ----------------------------------------------------------------------
def _query(url: str) -> dict[str, list[str]]:
    return parse_qs(urlsplit(url).query)


def test_presigned_url_for_a_viewer_and_for_the_master() -> None:
    """Kills: the ClientId dropped or inverted, the expiry off by one, no URL returned."""
    endpoint = "wss://v-1234.kinesisvideo.us-west-2.amazonaws.com"
    viewer = presign_wss_url(endpoint, ARN, CREDS, "us-west-2", client_id="visitor")
    assert isinstance(viewer, str) and viewer.startswith(endpoint + "?")
    q = _query(viewer)
    assert q["X-Amz-ChannelARN"] == [ARN]
    assert q["X-Amz-ClientId"] == ["visitor"]
    assert q["X-Amz-Expires"] == ["299"]  # what both AWS SDKs sign with
    assert q["X-Amz-Algorithm"] == ["AWS4-HMAC-SHA256"] and q["X-Amz-Signature"]
    master = _query(presign_wss_url(endpoint, ARN, CREDS, "us-west-2"))
    assert "X-Amz-ClientId" not in master and master["X-Amz-ChannelARN"] == [ARN]
    assert _query(presign_wss_url(endpoint, ARN, CREDS, "us-west-2", expires=60))[
        "X-Amz-Expires"
    ] == ["60"]
    with pytest.raises(ValueError, match="no query string"):
        presign_wss_url(endpoint + "/?x=1", ARN, CREDS, "us-west-2")


# -- inbound data-channel messages ------------------------------------------------------
def test_inbound_messages_accepted_and_returned() -> None:
    """Kills: ``return obj`` -> ``return None``; the type check inverted."""
    assert parse_inbound('{"type": "text", "text": "  hello  "}') == {
        "type": "text",
        "text": "hello",
    }
    assert parse_inbound('{"type": "text", "text": "y"}')["text"] == "y"  # one character
    assert parse_inbound(b'{"type": "mute"}') == {"type": "mute"}
    assert parse_inbound('{"type": "unmute"}') == {"type": "unmute"}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ('{"type": "toolResult", "content": "{}"}', "is not accepted"),
        ('{"event": {"textInput": {}}}', "is not accepted"),
        ('{"type": "text", "text": ""}', "text"),
        ('{"type": "text", "text": "   "}', "text"),
        ('{"type": "text", "text": "hi", "role": "SYSTEM"}', "text"),
        ('{"type": "mute", "x": 1}', "mute"),
        ("[1, 2]", "not a JSON object"),
        ("not json", "not JSON"),
    ],
)
def test_inbound_messages_rejected_with_a_reason(raw: str, reason: str) -> None:
    with pytest.raises(RejectedMessage, match=reason):
        parse_inbound(raw)


def test_inbound_size_and_text_limits() -> None:
    text = "x" * 30
    ok = parse_inbound(dumps({"type": "text", "text": text}), text_max_chars=30)
    assert ok["text"] == text
    with pytest.raises(RejectedMessage, match="text"):
        parse_inbound(dumps({"type": "text", "text": text + "y"}), text_max_chars=30)
    raw = dumps({"type": "text", "text": "y" * 100})
    assert parse_inbound(raw, max_bytes=len(raw))["text"] == "y" * 100
    with pytest.raises(RejectedMessage, match="exceeds"):
        parse_inbound(raw, max_bytes=len(raw) - 1)
    assert dumps({"a": "é", "b": 1}) == '{"a":"é","b":1}'


# -- ICE servers --------------------------------------------------------------------------
def test_turn_uris_are_ranked_for_aiortc() -> None:
    """UDP TURN first by default, TLS-over-TCP first when asked; the rest last."""
    udp = "turn:1.2.3.4:443?transport=udp"
    tcp = "turns:host:443?transport=tcp"
    other = "turn:1.2.3.4:443?transport=tcp"
    assert sorted([other, tcp, udp], key=lambda u: _turn_rank(u, False)) == [udp, tcp, other]
    assert sorted([other, udp, tcp], key=lambda u: _turn_rank(u, True)) == [tcp, udp, other]


@pytest.fixture
async def emu():
    e = KvsEmulator(channels=["robot"], verify_secret=SECRET)
    await e.start()
    yield e
    await e.stop()


def _settings(emu: KvsEmulator, **kw) -> KvsSettings:
    return KvsSettings(
        "robot",
        endpoint_url=emu.endpoint_url,
        access_key_id="AKIDTEST",
        secret_access_key=SECRET,
        **kw,
    )


async def test_ice_config_refreshes_when_stale_and_on_request(emu: KvsEmulator) -> None:
    """Kills: the lazy refresh before a new peer dropped; the TTL arithmetic changed."""
    ice = IceConfig(_settings(emu), ControlPlane(_settings(emu)))
    assert ice.stale and ice.refreshes == 0
    servers = await ice.servers()  # stale: refreshed first
    assert ice.refreshes == 1 and not ice.stale
    # No TURN from the stand-in: the default 300 s TTL, refreshed 30 s (the grace) early.
    assert ice.expires_at - time.monotonic() == pytest.approx(270, abs=5)
    assert [s.urls for s in servers] == [["stun:stun.kinesisvideo.us-west-2.amazonaws.com:443"]]
    await ice.servers()
    assert ice.refreshes == 1  # fresh: no new call
    ice.request_refresh("RECONNECT_ICE_SERVER")
    assert ice.stale
    await ice.servers()
    assert ice.refreshes == 2
    assert len(emu.calls_of("getIceServerConfig")) == 2


async def test_ice_override_and_no_stun(emu: KvsEmulator) -> None:
    override = [{"urls": ["stun:127.0.0.1:3478"]}]
    ice = IceConfig(_settings(emu, ice_servers_override=override), ControlPlane(_settings(emu)))
    assert [s.urls for s in await ice.servers()] == [["stun:127.0.0.1:3478"]]
    quiet = IceConfig(_settings(emu, stun_url=""), ControlPlane(_settings(emu)))
    assert await quiet.servers() == []


# -- control plane cache ------------------------------------------------------------------
async def test_control_plane_caches_unless_refreshed(emu: KvsEmulator) -> None:
    """Kills: ``channel_arn is None or refresh`` -> ``and`` (never described, or always)."""
    cp = ControlPlane(_settings(emu))
    first = await asyncio.to_thread(cp.resolve)
    again = await asyncio.to_thread(cp.resolve)
    assert first == again
    assert len(emu.calls_of("describeSignalingChannel")) == 1
    assert len(emu.calls_of("getSignalingChannelEndpoint")) == 1
    await asyncio.to_thread(cp.resolve, True)
    assert len(emu.calls_of("describeSignalingChannel")) == 2
    assert len(emu.calls_of("getSignalingChannelEndpoint")) == 2
