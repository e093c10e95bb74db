"""The browser viewer page (web/) in real headless Chromium.

- The page's WebCrypto SigV4 signer against botocore, for fixed inputs and a fixed date.
- The static server (sonic_voice.web).
- End to end: the KVS stand-in, the robot's real KvsMaster (aiortc) and the page in
  Chromium with a WAV file as its microphone: the robot hears the page's speech, the page
  plays the robot's speech, and a transcript sent by the robot shows in the page.
"""

from __future__ import annotations

import datetime
import json
import urllib.request
from pathlib import Path
from unittest import mock

import pytest
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from sonic_voice import web

from test.harness.chromium import Chromium

WEB_ROOT = Path(__file__).resolve().parent.parent / "web"
FIXED = datetime.datetime(2024, 3, 9, 17, 5, 42, tzinfo=datetime.UTC)
SECRET = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
TOKEN = "FwoGZXIvYXdzEJr//////////wEaDH+token/with=odd&chars"
ARN = "arn:aws:kinesisvideo:us-west-2:123456789012:channel/robot-1/1700000000000"


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
