"""Guests without AWS keys: invite links minted by the robot (sonic_voice/kvs/invite.py) and
Cognito identity pool guest credentials (the stand-in, sonic_voice/emulators/cognito.py),
each through the real SDK (botocore presigning, boto3 cognito-identity) and the real page in
headless Chromium against the KVS stand-in and the robot's KvsMaster."""

from __future__ import annotations

import asyncio
import json
import urllib.parse

import boto3
import numpy as np
import pytest
import segno
from botocore import UNSIGNED
from botocore.config import Config
from botocore.credentials import ReadOnlyCredentials

from sonic_voice import web
from sonic_voice.emulators.cognito import CognitoEmulator
from sonic_voice.emulators.kvs import KvsEmulatorThread
from sonic_voice.kvs.control import ControlPlane
from sonic_voice.kvs.invite import (
    invite_for_channel,
    mint_invite,
    qr_matrix,
    qr_png,
    qr_text,
    read_invite,
)
from sonic_voice.kvs.master import KvsMaster
from sonic_voice.kvs.settings import KvsSettings

from test.harness.chromium import Chromium

SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
CREDS = ReadOnlyCredentials("AKIDROBOT", SECRET, "robot+session/token=")
ARN = "arn:aws:kinesisvideo:us-west-2:123456789012:channel/robot-1/1700000000000"
WSS = "wss://v-1a2b3c4d.kinesisvideo.us-west-2.amazonaws.com"
POOL = "us-west-2:11111111-2222-3333-4444-555555555555"
CHANNEL = "robot-guest"
REGION = "us-west-2"


def test_invite_link_carries_everything_in_the_fragment() -> None:
    turn = [{"Uris": ["turn:1-2-3-4.t-1.kinesisvideo.us-west-2.amazonaws.com:443?transport=udp"],
             "Username": "1700000300:djE6", "Password": "pw", "Ttl": 300}]  # fmt: skip
    inv = mint_invite(
        "https://robots.example.com/viewer/index.html?lang=es",
        wss_endpoint=WSS,
        channel_arn=ARN,
        region="us-west-2",
        credentials=CREDS,
        ice_servers=[{"urls": ["stun:stun.kinesisvideo.us-west-2.amazonaws.com:443"]}, *turn],
        client_id="guest-1",
    )
    parts = urllib.parse.urlsplit(inv.url)
    assert parts.query == "lang=es"  # the page's own query, untouched: nothing added there
    assert parts.fragment.startswith("invite=") and "%" not in parts.fragment
    bundle = read_invite(inv.url)
    assert bundle["clientId"] == "guest-1" and bundle["channel"] == "robot-1"
    assert bundle["region"] == "us-west-2" and bundle["v"] == 1
    assert bundle["iceServers"][1] == {
        "urls": turn[0]["Uris"],
        "username": "1700000300:djE6",
        "credential": "pw",
    }
    signed = urllib.parse.urlsplit(bundle["wss"])
    q = dict(urllib.parse.parse_qsl(signed.query))
    assert q["X-Amz-ClientId"] == "guest-1" and q["X-Amz-ChannelARN"] == ARN
    assert q["X-Amz-Expires"] == "299" and q["X-Amz-SignedHeaders"] == "host"
    assert q["X-Amz-Credential"].startswith("AKIDROBOT/") and "X-Amz-Signature" in q
    assert SECRET not in inv.url and urllib.parse.quote(SECRET, safe="") not in inv.url
    assert abs(bundle["exp"] - inv.expires_at) < 1

    for bad, match in (
        ({"client_id": "AWS_x"}, "client_id"),
        ({"client_id": "a b"}, "client_id"),
        ({"expires_s": 600}, "expires_s"),
    ):
        with pytest.raises(ValueError, match=match):
            mint_invite("https://x.example/", wss_endpoint=WSS, channel_arn=ARN,
                        region="us-west-2", credentials=CREDS, **bad)  # fmt: skip
    with pytest.raises(ValueError, match="fragment"):
        mint_invite("https://x.example/#a", wss_endpoint=WSS, channel_arn=ARN,
                    region="us-west-2", credentials=CREDS)  # fmt: skip


def test_invite_qr_codes() -> None:
    url = "https://robots.example.com/index.html#invite=" + "A" * 900
    png = qr_png(url, scale=2)
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    matrix = qr_matrix(url)
    code = segno.make(url, error="m", micro=False)
    assert len(matrix) == code.symbol_size(border=0)[0]
    assert matrix[0][:7] == [True] * 7  # a finder pattern in the corner
    text = qr_text("https://x.example/#invite=abc")
    assert text.count("\n") >= 10


async def test_cognito_stand_in_with_boto3() -> None:
    """boto3's cognito-identity client (unsigned, as guests call it) gets an identity and
    credentials; a pool without guest access and an unknown identity give typed errors."""
    no_guests = "us-west-2:99999999-2222-3333-4444-555555555555"
    async with CognitoEmulator(pools={POOL: True, no_guests: False}, secret_key=SECRET) as cog:

        def calls() -> tuple:
            c = boto3.client(
                "cognito-identity",
                region_name="us-west-2",
                endpoint_url=cog.endpoint_url,
                config=Config(signature_version=UNSIGNED),
            )
            ident = c.get_id(IdentityPoolId=POOL)["IdentityId"]
            creds = c.get_credentials_for_identity(IdentityId=ident)
            with pytest.raises(c.exceptions.NotAuthorizedException):
                c.get_id(IdentityPoolId=no_guests)
            with pytest.raises(c.exceptions.ResourceNotFoundException):
                c.get_credentials_for_identity(IdentityId="us-west-2:nope")
            return ident, creds

        ident, creds = await asyncio.to_thread(calls)
    assert ident.startswith("us-west-2:")
    c = creds["Credentials"]
    assert c["AccessKeyId"].startswith("ASIA") and c["SecretKey"] == SECRET
    assert c["SessionToken"] and c["Expiration"].timestamp() > 0  # boto3 parsed the epoch
    assert [op for op, _ in cog.calls] == ["GetId", "GetCredentialsForIdentity", "GetId",
                                           "GetCredentialsForIdentity"]  # fmt: skip


# -- in Chromium ------------------------------------------------------------------------------
@pytest.fixture
def page_server():
    server, url = web.serve_in_thread()
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


def _settings(kvs: KvsEmulatorThread) -> KvsSettings:
    return KvsSettings(
        channel_name=CHANNEL,
        region=REGION,
        endpoint_url=kvs.endpoint_url,
        access_key_id="AKIDROBOT",
        secret_access_key=SECRET,
        ice_servers_override=[],
    )


async def _robot(kvs: KvsEmulatorThread, heard: list[np.ndarray]) -> KvsMaster:
    master = KvsMaster(
        _settings(kvs), on_audio=lambda c, pcm: heard.append(np.frombuffer(pcm, "<i2"))
    )
    await master.start()
    assert await master.wait_connected(10)
    return master


async def _connected_and_talking(browser: Chromium, master: KvsMaster, heard: list) -> None:
    await browser.wait_for(
        "kvsViewer.connectionState === 'connected' && kvsViewer.dataChannelOpen", 40
    )
    assert await master.wait_viewers(1, 10)
    master.broadcast({"type": "transcript", "role": "ASSISTANT", "text": "Welcome, guest.",
                      "stage": "FINAL"})  # fmt: skip
    await browser.wait_for(
        "document.getElementById('transcript').textContent.includes('Welcome, guest.')", 20
    )
    for _ in range(100):  # the fake microphone's speech reaches the robot
        if sum(len(b) for b in heard) >= 16000:
            break
        await asyncio.sleep(0.1)
    got = np.concatenate(heard) if heard else np.zeros(0)
    assert len(got) >= 16000 and np.sqrt(np.mean(got.astype(float) ** 2)) > 100


@pytest.mark.timeout(120)
async def test_chromium_joins_through_an_invite_link_with_no_keys(page_server: str) -> None:
    """The robot mints an invite (ControlPlane as VIEWER + mint_invite); the page opened at
    that link connects with nothing typed: no control-plane call of its own, the presigned
    URL accepted by the stand-in's signature check, the fragment gone from the address bar."""
    heard: list[np.ndarray] = []
    with KvsEmulatorThread(channels=[CHANNEL], region=REGION, verify_secret=SECRET) as kvs:
        master = await _robot(kvs, heard)
        try:
            control = await asyncio.to_thread(ControlPlane, _settings(kvs), "VIEWER")
            inv = await asyncio.to_thread(invite_for_channel, control, page_server + "index.html")
            calls_before = len(kvs.sync(lambda: kvs.emulator.calls))
            async with Chromium() as browser:
                await browser.goto(inv.url)
                await browser.wait_for("window.kvsViewer && window.kvsViewer.ready", 10)
                assert await browser.evaluate("location.hash") == ""
                assert (
                    await browser.evaluate("document.getElementById('access-key-id').value") == ""
                )
                await browser.evaluate("document.getElementById('connect').click(), true")
                await _connected_and_talking(browser, master, heard)
                assert await browser.evaluate("kvsViewer.joinedWith") == "invite"
                assert await browser.evaluate("kvsViewer.clientId") == inv.client_id
            conns = kvs.sync(lambda: list(kvs.emulator.connections))
            assert ("viewer", inv.client_id, CHANNEL) in conns
            assert kvs.sync(lambda: kvs.emulator.refused) == []
            page_calls = kvs.sync(lambda: kvs.emulator.calls)[calls_before:]
            assert page_calls == [], f"the page called the control plane: {page_calls}"
        finally:
            await master.stop()


@pytest.mark.timeout(120)
async def test_chromium_joins_with_cognito_guest_credentials(page_server: str) -> None:
    """Given only a Cognito pool id, the page gets guest credentials from the Cognito stand-in
    (GetId, GetCredentialsForIdentity) and signs its KVS calls with them: the stand-in, whose
    verify_secret is what the pool hands out, checks every signature."""
    heard: list[np.ndarray] = []
    with KvsEmulatorThread(channels=[CHANNEL], region=REGION, verify_secret=SECRET) as kvs:
        cog = kvs.call(CognitoEmulator(pools={POOL: True}, secret_key=SECRET).start())
        master = await _robot(kvs, heard)
        try:
            query = urllib.parse.urlencode(
                {
                    "region": REGION,
                    "channel": CHANNEL,
                    "endpoint": kvs.endpoint_url,
                    "clientId": "guest-cognito",
                    "cognitoPool": POOL,
                    "cognitoEndpoint": cog.endpoint_url,
                }
            )
            async with Chromium() as browser:
                await browser.goto(f"{page_server}index.html?{query}")
                await browser.wait_for("window.kvsViewer && window.kvsViewer.ready", 10)
                await browser.evaluate("document.getElementById('connect').click(), true")
                await _connected_and_talking(browser, master, heard)
                assert await browser.evaluate("kvsViewer.joinedWith") == "cognito"
            ops = kvs.sync(lambda: [op for op, _ in cog.calls])
            assert ops == ["GetId", "GetCredentialsForIdentity"], ops
            issued_key = kvs.sync(lambda: cog.issued[0][1])
            assert ("viewer", "guest-cognito", CHANNEL) in kvs.sync(
                lambda: list(kvs.emulator.connections)
            )
            assert kvs.sync(lambda: kvs.emulator.refused) == []
            describe = kvs.sync(lambda: kvs.emulator.calls_of("describeSignalingChannel"))
            assert describe[-1] == {"ChannelName": CHANNEL}
            assert json.dumps(issued_key)  # the guest's key id, recorded by the pool
        finally:
            await master.stop()
            kvs.call(cog.stop())
