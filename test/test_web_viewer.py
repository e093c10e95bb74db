"""The browser viewer page (web/) in real headless Chromium.

- The page's WebCrypto SigV4 signer against botocore, for fixed inputs and a fixed date.
- The static server (sonic_voice.web).
- End to end: the KVS stand-in, the robot's real KvsMaster (aiortc) and the page in
  Chromium with a WAV file as its microphone: the robot hears the page's speech, the page
  plays the robot's speech, and a transcript sent by the robot shows in the page.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import json
import subprocess
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from unittest import mock

import pytest
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from sonic_voice import web
from sonic_voice.emulators.kvs import KvsEmulatorThread

from test.harness.chromium import Chromium

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
FIXED = datetime.datetime(2024, 3, 9, 17, 5, 42, tzinfo=datetime.UTC)
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
TOKEN = "FwoGZXIvYXdzEJr//////////wEaDH+token/with=odd&chars"
SENTENCE = "Hello robot. Please bring me a cup of coffee from the kitchen, and hurry up."
ARN = "arn:aws:kinesisvideo:us-west-2:123456789012:channel/robot-1/1700000000000"


async def _speech_wav() -> Path:
    """A spoken sentence from espeak-ng (setup.sh installs it), the page's microphone."""
    path = Path(tempfile.mkdtemp(prefix="sv-web-")) / "speech.wav"
    await asyncio.to_thread(
        subprocess.run,
        ["espeak-ng", "-s", "150", "-w", str(path), SENTENCE],
        check=True,
        capture_output=True,
    )
    return path


@pytest.fixture
def page_server():
    server, url = web.serve_in_thread()
    try:
        yield url
    finally:
        server.shutdown()
        server.server_close()


def _creds(token: str | None) -> Credentials:
    return Credentials("AKIDEXAMPLE", SECRET, token)


def _botocore_presign(url: str, params: dict, token: str | None, region: str) -> str:
    request = AWSRequest(method="GET", url=url, params=params)
    with mock.patch("botocore.auth.get_current_datetime", return_value=FIXED):
        SigV4QueryAuth(_creds(token), "kinesisvideo", region, 299).add_auth(request)
    return request.url


def _botocore_headers(url: str, body: str, token: str | None, region: str) -> dict[str, str]:
    request = AWSRequest(
        method="POST", url=url, data=body.encode(), headers={"Content-Type": "application/json"}
    )
    with mock.patch("botocore.auth.get_current_datetime", return_value=FIXED):
        SigV4Auth(_creds(token), "kinesisvideo", region).add_auth(request)
    return dict(request.headers.items())


PRESIGN_CASES = [
    # viewer on real KVS: no port, no path, session token (with characters that need encoding)
    (
        "wss://v-1a2b3c4d.kinesisvideo.us-west-2.amazonaws.com",
        {"X-Amz-ChannelARN": ARN, "X-Amz-ClientId": "viewer-42.a_b"},
        TOKEN,
        "us-west-2",
    ),
    # the local stand-in: plain ws, a port and a path, long-term keys
    (
        "ws://127.0.0.1:41234/ws/viewer",
        {"X-Amz-ChannelARN": ARN, "X-Amz-ClientId": "v1"},
        None,
        "eu-central-1",
    ),
    # master form (ARN only)
    (
        "wss://m-00ff.kinesisvideo.ap-northeast-1.amazonaws.com",
        {"X-Amz-ChannelARN": ARN},
        None,
        "ap-northeast-1",
    ),
]

SIGN_CASES = [
    (
        "https://kinesisvideo.us-west-2.amazonaws.com/describeSignalingChannel",
        json.dumps({"ChannelName": "robot-1"}),
        TOKEN,
        "us-west-2",
    ),
    (
        "https://r-1a2b3c4d.kinesisvideo.us-west-2.amazonaws.com/v1/get-ice-server-config",
        json.dumps({"ChannelARN": ARN, "ClientId": "viewer-42", "Service": "TURN"}),
        None,
        "us-west-2",
    ),
    (
        "http://127.0.0.1:41234/getSignalingChannelEndpoint",
        json.dumps(
            {
                "ChannelARN": ARN,
                "SingleMasterChannelEndpointConfiguration": {
                    "Protocols": ["WSS", "HTTPS"],
                    "Role": "VIEWER",
                },
            }
        ),
        TOKEN,
        "eu-central-1",
    ),
]


def _js_creds(token: str | None) -> str:
    creds = {"accessKeyId": "AKIDEXAMPLE", "secretAccessKey": SECRET}
    if token:
        creds["sessionToken"] = token
    return json.dumps(creds)


async def test_signer_matches_botocore(page_server: str) -> None:
    """The page signs exactly as botocore does: same presigned URL (byte for byte) and
    the same Authorization header, for fixed credentials and a fixed date."""
    date_js = f"new Date({json.dumps(FIXED.isoformat().replace('+00:00', 'Z'))})"
    async with Chromium() as browser:
        await browser.goto(page_server + "index.html")
        assert await browser.evaluate("typeof KvsSigV4") == "object"
        for url, params, token, region in PRESIGN_CASES:
            expected = _botocore_presign(url, params, token, region)
            got = await browser.evaluate(
                f"KvsSigV4.presignUrl({{url: {json.dumps(url)}, params: {json.dumps(params)},"
                f" credentials: {_js_creds(token)}, region: {json.dumps(region)},"
                f" date: {date_js}}})"
            )
            assert got == expected, f"presign {url}\n page: {got}\n boto: {expected}"
            assert "X-Amz-Signature=" in got and "X-Amz-Expires=299" in got
        for url, body, token, region in SIGN_CASES:
            expected = _botocore_headers(url, body, token, region)
            got = await browser.evaluate(
                f"KvsSigV4.signRequest({{url: {json.dumps(url)}, body: {json.dumps(body)},"
                f" headers: {{'Content-Type': 'application/json'}},"
                f" credentials: {_js_creds(token)}, region: {json.dumps(region)},"
                f" date: {date_js}}})"
            )
            assert got["Authorization"] == expected["Authorization"], f"sign {url}"
            assert got["X-Amz-Date"] == expected["X-Amz-Date"] == "20240309T170542Z"
            assert got.get("X-Amz-Security-Token") == expected.get("X-Amz-Security-Token")
        # A wrong secret gives a different signature (the comparison above can fail).
        url, params, token, region = PRESIGN_CASES[0]
        other = await browser.evaluate(
            f"KvsSigV4.presignUrl({{url: {json.dumps(url)}, params: {json.dumps(params)},"
            f" credentials: {{accessKeyId: 'AKIDEXAMPLE', secretAccessKey: 'x'}},"
            f" region: {json.dumps(region)}, date: {date_js}}})"
        )
        assert other != _botocore_presign(url, params, None, region)
        assert (
            other.split("X-Amz-Signature=")[0]
            == _botocore_presign(url, params, None, region).split("X-Amz-Signature=")[0]
        )


def test_static_server_serves_page(page_server: str) -> None:
    """The page and its scripts are served with no caching; no directory listings."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(page_server) as resp:
        html = resp.read().decode()
        assert resp.headers["Cache-Control"] == "no-store"
    assert "sigv4.js" in html and "viewer.js" in html
    for name in ("sigv4.js", "viewer.js", "style.css"):
        with opener.open(page_server + name) as resp:
            assert resp.read() == (WEB_ROOT / name).read_bytes()
    with pytest.raises(urllib.error.HTTPError) as err:
        opener.open(page_server + "../sonic_voice/web.py")
    assert err.value.code == 404


# -- the page against the KVS stand-in ------------------------------------------------------
CHANNEL = "robot-web"
REGION = "us-west-2"


async def open_viewer(
    browser: Chromium,
    page_url: str,
    endpoint: str,
    client_id: str,
    secret: str = SECRET,
    capture: bool = False,
) -> None:
    """Load the page with its non-secret settings in the URL, type the credentials into
    the form (as a visitor would) and press Connect."""
    query = urllib.parse.urlencode(
        {"region": REGION, "channel": CHANNEL, "endpoint": endpoint, "clientId": client_id}
    )
    await browser.goto(f"{page_url}index.html?{query}{'&capture=1' if capture else ''}")
    await browser.wait_for("window.kvsViewer && window.kvsViewer.ready", 10)
    await browser.evaluate(
        f"""(() => {{
            document.getElementById('access-key-id').value = 'AKIDEXAMPLE';
            document.getElementById('secret-access-key').value = {json.dumps(secret)};
            document.getElementById('connect').click();
            return true;
        }})()"""
    )


def _payload(record) -> dict:
    return json.loads(base64.b64decode(record.payload))


async def test_page_joins_stand_in_as_viewer(page_server: str) -> None:
    """Without a master: the page makes the three control-plane calls as VIEWER, opens the
    signaling socket with a presigned URL the stand-in verifies (botocore, known secret),
    sends a trickle offer (audio + data channel, no candidates inside) and then its
    candidates, all on loopback. A wrong secret is refused and the page says so."""
    with KvsEmulatorThread(channels=[CHANNEL], region=REGION, verify_secret=SECRET) as kvs:
        emu = kvs.emulator
        async with Chromium(fake_mic=await _speech_wav()) as browser:
            await open_viewer(browser, page_server, kvs.endpoint_url, "visitor-1")
            assert await asyncio.to_thread(
                kvs.wait_until,
                lambda: (
                    emu.routed("SDP_OFFER", "visitor-1")
                    and emu.routed("ICE_CANDIDATE", "visitor-1")
                ),
                20,
            ), browser.console[-20:]
            describe = kvs.sync(lambda: emu.calls_of("describeSignalingChannel"))
            endpoint = kvs.sync(lambda: emu.calls_of("getSignalingChannelEndpoint"))
            ice = kvs.sync(lambda: emu.calls_of("getIceServerConfig"))
            arn = kvs.sync(lambda: emu.channel_arn(CHANNEL))
            assert describe == [{"ChannelName": CHANNEL}]
            assert endpoint == [
                {
                    "ChannelARN": arn,
                    "SingleMasterChannelEndpointConfiguration": {
                        "Protocols": ["WSS", "HTTPS"],
                        "Role": "VIEWER",
                    },
                }
            ]
            assert ice == [{"ChannelARN": arn, "ClientId": "visitor-1"}]
            assert kvs.sync(lambda: emu.connections) == [("viewer", "visitor-1", CHANNEL)]

            offer_rec = kvs.sync(lambda: emu.routed("SDP_OFFER", "visitor-1"))[0]
            assert offer_rec.correlation_id  # the page always sends one
            offer = _payload(offer_rec)
            assert offer["type"] == "offer"
            sdp = offer["sdp"]
            assert "m=audio" in sdp and "m=application" in sdp
            assert "a=ice-options:trickle" in sdp
            assert "a=candidate" not in sdp  # trickled instead
            assert "a=sendrecv" in sdp  # the microphone goes out, the robot comes back
            await asyncio.to_thread(
                kvs.wait_until, lambda: len(emu.routed("ICE_CANDIDATE", "visitor-1")) >= 1, 10
            )
            cands = [_payload(r) for r in kvs.sync(lambda: emu.routed("ICE_CANDIDATE"))]
            for c in cands:
                assert c["candidate"].startswith("candidate:") and "sdpMid" in c
                address = c["candidate"].split()[4]
                assert address.startswith("127."), f"non-loopback candidate {c['candidate']}"
            assert await browser.evaluate("kvsViewer.status") == "negotiating"

            # A wrong secret: the stand-in refuses the socket and the page reports it.
            refused_before = len(kvs.sync(lambda: emu.refused))
            await open_viewer(browser, page_server, kvs.endpoint_url, "visitor-2", secret="bad")
            status = await browser.wait_for("kvsViewer.status === 'failed' && kvsViewer.error", 20)
            assert "WebSocket" in status
            refused = kvs.sync(lambda: emu.refused)[refused_before:]
            assert refused == [(403, "signature does not match")]
