"""The KVS signaling stand-in, driven by real boto3, botocore presigning and websockets."""

from __future__ import annotations

import asyncio
import base64
import json

import aiohttp
import pytest
import websockets
from botocore.exceptions import ClientError

from sonic_voice.emulators.kvs import KvsEmulator
from sonic_voice.kvs.control import ControlPlane, ControlPlaneError
from sonic_voice.kvs.settings import KvsSettings

SECRET = "test-secret"


def settings(emu: KvsEmulator, name: str = "robot", **kw) -> KvsSettings:
    return KvsSettings(
        name,
        endpoint_url=emu.endpoint_url,
        access_key_id="AKIDTEST",
        secret_access_key=kw.pop("secret", SECRET),
        **kw,
    )


def b64(obj: dict) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


@pytest.fixture
async def emu():
    e = KvsEmulator(channels=["robot"], verify_secret=SECRET)
    await e.start()
    yield e
    await e.stop()


async def connect(emu: KvsEmulator, client: str | None = None, **kw):
    role = "MASTER" if client is None else "VIEWER"
    cp = ControlPlane(settings(emu, **kw), role=role)
    url = await asyncio.to_thread(cp.presigned_url, client)
    return await websockets.connect(url, proxy=None)


async def test_control_plane_calls_through_boto3(emu: KvsEmulator) -> None:
    cp = ControlPlane(settings(emu))
    arn, ep = await asyncio.to_thread(cp.resolve)
    assert arn == emu.channel_arn("robot")
    assert ep.wss == f"{emu.ws_url}/ws/master" and ep.https == emu.endpoint_url
    viewer = ControlPlane(settings(emu), role="VIEWER")
    _, vep = await asyncio.to_thread(viewer.resolve)
    assert vep.wss.endswith("/ws/viewer")
    assert await asyncio.to_thread(cp.ice_servers) == []
    # Typed errors: boto3 raises the real exception class from x-amzn-ErrorType.
    with pytest.raises(ControlPlaneError) as err:
        await asyncio.to_thread(ControlPlane(settings(emu, "absent")).resolve)
    assert err.value.fatal and "does not exist" in str(err.value)
    with pytest.raises(ClientError) as ce:
        await asyncio.to_thread(
            cp._kv.create_signaling_channel, ChannelName="robot", ChannelType="SINGLE_MASTER"
        )
    assert ce.value.response["Error"]["Code"] == "ResourceInUseException"
    created = ControlPlane(settings(emu, "fresh", create_channel=True, message_ttl_s=30))
    arn2, _ = await asyncio.to_thread(created.resolve)
    assert arn2 == emu.channel_arn("fresh")
    body = emu.calls_of("createSignalingChannel")[-1]
    assert body["SingleMasterConfiguration"] == {"MessageTtlSeconds": 30}


async def test_turn_entries_and_cors(emu: KvsEmulator) -> None:
    emu.ice_servers = [{"Uris": ["turn:relay.invalid:443?transport=udp"]}]
    emu.ice_ttl = 120
    cp = ControlPlane(settings(emu))
    (turn,) = await asyncio.to_thread(cp.ice_servers)
    assert turn.ttl == 120 and turn.uris == ("turn:relay.invalid:443?transport=udp",)
    expiry, b64arn = turn.username.split(":", 1)
    assert int(expiry) > 0
    assert base64.b64decode(b64arn).decode() == f"v1:{emu.channel_arn('robot')}"
    async with aiohttp.ClientSession() as http:
        async with http.options(
            f"{emu.endpoint_url}/describeSignalingChannel",
            headers={
                "Origin": "http://127.0.0.1:9999",
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type,x-amz-date",
            },
        ) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert "authorization" in r.headers["Access-Control-Allow-Headers"]
        # Unsigned call: refused with a typed error, and still readable cross-origin.
        async with http.post(
            f"{emu.endpoint_url}/describeSignalingChannel", json={"ChannelName": "robot"}
        ) as r:
            assert r.status == 403
            assert r.headers["Access-Control-Allow-Origin"] == "*"
            assert r.headers["x-amzn-ErrorType"].startswith("AccessDeniedException")


async def test_presigned_query_is_checked(emu: KvsEmulator) -> None:
    ws = await connect(emu)
    assert emu.master_connected()
    await ws.close()
    with pytest.raises(websockets.InvalidStatus) as bad:
        await connect(emu, secret="wrong")
    assert bad.value.response.status_code == 403
    assert emu.refused[-1] == (403, "signature does not match")
    cp = ControlPlane(settings(emu))
    url = await asyncio.to_thread(cp.presigned_url)
    for drop in ("X-Amz-Signature", "X-Amz-ChannelARN", "X-Amz-Date"):
        stripped = "&".join(p for p in url.split("?")[1].split("&") if not p.startswith(drop))
        with pytest.raises(websockets.InvalidStatus):
            await websockets.connect(url.split("?")[0] + "?" + stripped, proxy=None)
        assert drop in emu.refused[-1][1]
    # Expired: signed more than X-Amz-Expires ago.
    cp.settings.presign_expires_s = 1
    old = await asyncio.to_thread(cp.presigned_url)
    await asyncio.sleep(2.1)
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(old, proxy=None)
    assert emu.refused[-1][1] == "Signature expired"
    # A viewer needs a client id, and not one of the reserved AWS_ ones.
    with pytest.raises(websockets.InvalidStatus):
        await connect(emu, "AWS_x")


async def test_routing_envelope_buffering_and_limits(emu: KvsEmulator) -> None:
    viewer = await connect(emu, "viewer-1")
    # The viewer's offer arrives before any master: buffered for MessageTtlSeconds.
    await viewer.send(json.dumps({"action": "SDP_OFFER", "messagePayload": b64({"sdp": "x"})}))
    assert await emu.wait_until(lambda: emu.routed("SDP_OFFER"), 5)
    assert emu.routed("SDP_OFFER")[0].outcome == "buffered"
    master = await connect(emu)
    frame = json.loads(await asyncio.wait_for(master.recv(), 5))
    assert frame == {
        "messageType": "SDP_OFFER",
        "messagePayload": b64({"sdp": "x"}),
        "senderClientId": "viewer-1",
    }
    # Master -> viewer, PascalCase keys as the C SDK sends them.
    await master.send(
        json.dumps(
            {
                "action": "SDP_ANSWER",
                "RecipientClientId": "viewer-1",
                "MessagePayload": b64({"type": "answer"}),
                "CorrelationId": "c-1",
            }
        )
    )
    got = json.loads(await asyncio.wait_for(viewer.recv(), 5))
    assert got == {"messageType": "SDP_ANSWER", "messagePayload": b64({"type": "answer"})}
    # Oversized payload, unknown recipient, missing recipient: STATUS_RESPONSE with the id.
    big = base64.b64encode(b"x" * 7600).decode()
    assert len(big) > 10_000
    cases = [
        ({"recipientClientId": "viewer-1", "messagePayload": big}, "exceeds 10000"),
        ({"recipientClientId": "ghost", "messagePayload": b64({})}, "not connected"),
        ({"messagePayload": b64({})}, "recipientClientId is required"),
    ]
    for i, (fields, why) in enumerate(cases):
        await master.send(
            json.dumps({"action": "ICE_CANDIDATE", "correlationId": f"e{i}", **fields})
        )
        status = json.loads(await asyncio.wait_for(master.recv(), 5))
        assert status["messageType"] == "STATUS_RESPONSE"
        assert status["statusResponse"]["correlationId"] == f"e{i}"
        assert why in status["statusResponse"]["description"]
    # Without a correlation id an error is silent (as in KVS); blank frames are ignored.
    await master.send(json.dumps({"action": "BOGUS", "messagePayload": b64({})}))
    await master.send("")
    # Injected control messages.
    await emu.send_go_away()
    assert json.loads(await asyncio.wait_for(master.recv(), 5)) == {"messageType": "GO_AWAY"}
    await emu.send_reconnect_ice_server("viewer-1")
    got = json.loads(await asyncio.wait_for(viewer.recv(), 5))
    assert got == {"messageType": "RECONNECT_ICE_SERVER"}
    # A newer master replaces the old one, whose socket is closed.
    master2 = await connect(emu)
    await asyncio.wait_for(master.wait_closed(), 5)
    assert emu.master_connects() == 2
    for ws in (viewer, master2):
        await ws.close()


async def test_viewer_limit() -> None:
    async with KvsEmulator(channels=["robot"], max_viewers=2) as emu:
        a = await connect(emu, "a")
        b = await connect(emu, "b")
        with pytest.raises(websockets.InvalidStatus):
            await connect(emu, "c")
        assert "too many viewers" in emu.refused[-1][1]
        # The same client id again replaces its own socket rather than counting twice.
        a2 = await connect(emu, "a")
        await asyncio.wait_for(a.wait_closed(), 5)
        assert sorted(emu.viewer_ids()) == ["a", "b"]
        for ws in (a2, b):
            await ws.close()


async def test_presigned_url_with_session_token(emu: KvsEmulator) -> None:
    """Temporary credentials: the token is inside the signed query, as KVS requires."""
    from botocore.credentials import ReadOnlyCredentials

    from sonic_voice.kvs.signing import presign_wss_url

    arn = emu.channel_arn("robot")
    creds = ReadOnlyCredentials("ASIATEST", SECRET, "token/with+chars=")
    url = presign_wss_url(f"{emu.ws_url}/ws/viewer", arn, creds, "us-west-2", client_id="v-1")
    query = url.split("?", 1)[1]
    keys = [p.split("=")[0] for p in query.split("&")]
    assert keys[-1] == "X-Amz-Signature" and "X-Amz-Security-Token" in keys[:-1]
    assert "X-Amz-Expires=299" in query and "X-Amz-SignedHeaders=host" in query
    ws = await websockets.connect(url, proxy=None)  # the stand-in recomputed the signature
    assert emu.viewer_ids() == ["v-1"]
    await ws.close()
    tampered = url.replace("X-Amz-ClientId=v-1", "X-Amz-ClientId=v-2")
    with pytest.raises(websockets.InvalidStatus):
        await websockets.connect(tampered, proxy=None)
