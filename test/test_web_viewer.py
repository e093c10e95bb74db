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
import contextlib
import datetime
import json
import subprocess
import tempfile
import urllib.parse
import urllib.request
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
from botocore.auth import SigV4Auth, SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from sonic_voice import web
from sonic_voice.audio.resample import StreamResampler
from sonic_voice.emulators.kvs import KvsEmulatorThread
from sonic_voice.kvs.master import KvsMaster
from sonic_voice.kvs.opus_send import OpusFecTrack
from sonic_voice.kvs.settings import KvsSettings

from test.harness.chromium import Chromium
from test.harness.signals import best_alignment, speech_like

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


@contextlib.asynccontextmanager
async def robot_and_page(
    client_id: str = "v1",
    *,
    fake_mic: Path | None = None,
    capture: bool = False,
    prepare: Callable[[Chromium], Awaitable[None]] | None = None,
    master_callbacks: dict[str, Any] | None = None,
    **settings: Any,
) -> AsyncIterator[tuple[Any, KvsMaster, Chromium]]:
    """The robot's KVS master (``settings``: more :class:`KvsSettings` fields;
    ``master_callbacks``: its ``on_audio``, ``on_message``, ...) on the KVS stand-in, and
    Chromium showing the viewer page, joined as ``client_id`` and connected: yields
    ``(kvs, master, browser)``. ``prepare(browser)`` runs before the page loads (scripts
    to add, CSP to bypass)."""
    server, url = web.serve_in_thread()
    try:
        with KvsEmulatorThread(channels=[CHANNEL], region=REGION, verify_secret=SECRET) as kvs:
            master = KvsMaster(
                KvsSettings(
                    channel_name=CHANNEL,
                    region=REGION,
                    endpoint_url=kvs.endpoint_url,
                    access_key_id="AKIDEXAMPLE",
                    secret_access_key=SECRET,
                    ice_servers_override=[],
                    **settings,
                ),
                **{"on_audio": lambda _c, _p: None, **(master_callbacks or {})},
            )
            await master.start()
            try:
                async with Chromium(fake_mic=fake_mic) as browser:
                    if prepare is not None:
                        await prepare(browser)
                    await open_viewer(browser, url, kvs.endpoint_url, client_id, capture=capture)
                    await browser.wait_for("kvsViewer.connectionState === 'connected'", 40)
                    yield kvs, master, browser
            finally:
                await master.stop()
    finally:
        server.shutdown()
        server.server_close()


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


# -- end to end: page <-> stand-in <-> the robot's master ------------------------------------
def _wav_pcm(path: Path) -> tuple[np.ndarray, int]:
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2 and w.getnchannels() == 1
        return np.frombuffer(w.readframes(w.getnframes()), "<i2").copy(), w.getframerate()


def _resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    return StreamResampler(src, dst).process(x, last=True)


def _rms(x: np.ndarray) -> float:
    return float(np.sqrt(np.mean(x.astype(np.float64) ** 2))) if len(x) else 0.0


def _chunk_matches(
    chunks_of: np.ndarray, inside: np.ndarray, rate: int, min_rms: float, chunk_s: float = 0.25
) -> list[tuple[float, int, float]]:
    """(start s, lag in samples, NCC) of each voiced chunk of ``chunks_of`` found in ``inside``.

    Chunk by chunk, because a browser's jitter buffer (NetEq) stretches time by tens of ms
    while it adapts; that smears one whole-signal correlation but leaves each 250 ms chunk
    intact (measured: whole 3 s NCC 0.4-0.6, chunks 0.8-0.99 on the robot -> page path)."""
    n = int(chunk_s * rate)
    out = []
    for i in range(0, len(chunks_of) - n + 1, n):
        seg = chunks_of[i : i + n]
        if _rms(seg) >= min_rms:
            lag, ncc = best_alignment(seg, inside)
            out.append((i / rate, lag - i, ncc))
    return out


def _summary(matches: list[tuple[float, int, float]]) -> str:
    return ", ".join(f"{t:.2f}s:{ncc:.2f}@{lag}" for t, lag, ncc in matches)


# Recorded before the page's own scripts run: every RTCPeerConnection the page makes, so a
# test can read what Chromium negotiated (the page keeps its connection private).
RECORD_PEERS_JS = """
(() => {
  const Native = window.RTCPeerConnection;
  window.__svPeers = [];
  function Recorded(...args) {
    const pc = new Native(...args);
    window.__svPeers.push(pc);
    return pc;
  }
  Recorded.prototype = Native.prototype;
  Object.setPrototypeOf(Recorded, Native);
  window.RTCPeerConnection = Recorded;
})();
"""

NEGOTIATED_JS = """
(async () => {
  const pc = window.__svPeers[window.__svPeers.length - 1];
  const report = await pc.getStats();
  const byId = new Map();
  report.forEach((r) => byId.set(r.id, r));
  const codec = (kind) => {
    let out = null;
    report.forEach((r) => {
      if (r.type === kind && r.kind === "audio" && r.codecId) {
        const c = byId.get(r.codecId) || {};
        out = { mimeType: c.mimeType, fmtp: c.sdpFmtpLine || "" };
      }
    });
    return out;
  };
  return {
    remote: pc.remoteDescription.sdp,
    outbound: codec("outbound-rtp"),
    inbound: codec("inbound-rtp"),
  };
})()
"""


def _opus_fmtp(sdp: str) -> dict[str, str]:
    """Opus ``a=fmtp`` parameters of an SDP's first audio section."""
    lines = sdp.replace("\r\n", "\n").split("\n")
    pt = next(ln.split()[0].split(":")[1] for ln in lines if "opus/48000" in ln.lower())
    fmtp = next((ln for ln in lines if ln.startswith(f"a=fmtp:{pt} ")), None)
    if fmtp is None:
        return {}
    return dict(kv.split("=", 1) for kv in fmtp.split(" ", 1)[1].split(";"))


@pytest.mark.timeout(120)
async def test_chromium_viewer_talks_with_robot_master() -> None:
    """Chromium's fake microphone (espeak-ng speech) reaches the robot's master as 16 kHz
    audio that matches the WAV; the robot's speech plays in the page (its capture matches
    what the robot sent); a transcript and state the robot broadcasts show in the DOM; the
    page's chat text and mute reach the robot, validated.

    With the master's default audio paths (issue 7): the answer Chromium receives and applies
    carries ``useinbandfec=1`` (munged by the master), Chromium's Opus encoder and decoder
    run with it, the viewer's audio comes through our adaptive jitter buffer and the robot's
    through the Opus FEC sender."""
    wav = await _speech_wav()
    speech, speech_rate = _wav_pcm(wav)
    speech16 = _resample(speech, speech_rate, 16000)
    heard: list[np.ndarray] = []  # robot side: the viewer's audio at 16 kHz
    inbound: list[tuple[str, dict]] = []
    viewers: list[object] = []
    got_audio = asyncio.Event()
    got_message = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_audio(client_id: str, pcm: bytes) -> None:
        assert client_id == "visitor-e2e"
        heard.append(np.frombuffer(pcm, "<i2"))
        if sum(len(b) for b in heard) >= 5 * 16000:
            loop.call_soon_threadsafe(got_audio.set)

    def on_message(client_id: str, msg: dict) -> None:
        inbound.append((client_id, msg))
        loop.call_soon_threadsafe(got_message.set)

    async def prepare(browser: Chromium) -> None:
        await browser.send("Page.addScriptToEvaluateOnNewDocument", {"source": RECORD_PEERS_JS})

    callbacks = {"on_audio": on_audio, "on_viewers": viewers.append, "on_message": on_message}
    robot = robot_and_page(
        "visitor-e2e", fake_mic=wav, capture=True, prepare=prepare, master_callbacks=callbacks
    )
    async with robot as (kvs, master, browser):
        await browser.wait_for("kvsViewer.dataChannelOpen", 40)

        # The changed SDP: what the stand-in routed to the page, what Chromium
        # applied, and what its Opus encoder/decoder run with.
        emu = kvs.emulator
        routed = kvs.sync(lambda: emu.routed("SDP_ANSWER"))
        routed = [r for r in routed if r.recipient == "visitor-e2e"]
        sent = _opus_fmtp(_payload(routed[-1])["sdp"])
        assert sent["useinbandfec"] == "1" and sent["usedtx"] == "0", sent
        nego = await browser.evaluate(NEGOTIATED_JS)
        applied = _opus_fmtp(nego["remote"])
        assert applied["useinbandfec"] == "1", applied
        print(f"Chromium audio codecs: out {nego['outbound']} in {nego['inbound']}")
        for way in ("outbound", "inbound"):
            assert nego[way]["mimeType"].lower() == "audio/opus", nego
            assert "useinbandfec=1" in nego[way]["fmtp"], nego
        peer = master.peers["visitor-e2e"]
        assert isinstance(peer.out, OpusFecTrack) and peer.rx is not None

        # page -> robot: several seconds of the fake microphone, before the robot
        # speaks (so echo cancellation has nothing to cancel).
        await asyncio.wait_for(got_audio.wait(), 30)
        received = np.concatenate(heard)[4000:]  # from 0.25 s: AGC settles
        assert _rms(received) > 300, f"robot heard near silence (rms {_rms(received):.0f})"
        looped = np.tile(speech16, 1 + len(received) // len(speech16) + 1)
        mic = _chunk_matches(received, looped, 16000, min_rms=300)
        print(f"page->robot chunks: {_summary(mic)}")
        assert len(mic) >= 8, f"too little speech reached the robot: {_summary(mic)}"
        nccs = np.array([ncc for _, _, ncc in mic])
        # Opus + Chromium's echo cancellation, noise suppression and AGC reshape the
        # speech; measured here: chunk NCC 0.57-0.93, median ~0.72.
        assert np.median(nccs) >= 0.6, f"robot heard something else: {_summary(mic)}"
        assert np.mean(nccs >= 0.45) >= 0.7, _summary(mic)
        # ...and in order: every chunk sits at the same place of the looped WAV.
        phase = np.array([lag % len(speech16) for _, lag, _ in mic])
        ref_phase = np.median(phase)
        near = np.abs((phase - ref_phase + len(speech16) / 2) % len(speech16) - len(speech16) / 2)
        assert np.mean(near <= 0.1 * 16000) >= 0.7, _summary(mic)

        # robot -> page: a known signal, captured by the page as it plays it.
        robot_says = speech_like(3.0, 24000, seed=11, level=0.3)
        before = await browser.evaluate("kvsViewer.takeCapture().samples")
        master.play(robot_says)
        master.broadcast(
            {
                "type": "transcript",
                "role": "ASSISTANT",
                "text": "Coffee is on its way.",
                "stage": "FINAL",
            }
        )
        master.broadcast({"type": "state", "state": "speaking"})
        # Two messages: a poll may fall between them, so wait for both to show.
        await browser.wait_for(
            "document.getElementById('transcript').textContent.includes("
            "'Coffee is on its way.') && document.getElementById('robot-state')"
            ".textContent === 'robot: speaking'",
            20,
        )
        # The page's capture now holds the robot's 3 s (plus 2 s for the way there).
        await browser.wait_for(
            f"kvsViewer.takeCapture().samples > {before} + 5 * 48000", 30, interval=0.5
        )
        cap = await browser.evaluate("kvsViewer.takeCapture()")
        played = np.frombuffer(base64.b64decode(cap["pcm16"]), "<i2")
        played24 = _resample(played, cap["rate"], 24000)
        played_back = _chunk_matches(robot_says, played24, 24000, 0.3 * _rms(robot_says))
        print(f"robot->page chunks: {_summary(played_back)}")
        assert len(played_back) >= 8, _summary(played_back)
        nccs = np.array([ncc for _, _, ncc in played_back])
        assert np.median(nccs) >= 0.8, f"page played something else: {_summary(played_back)}"
        assert np.mean(nccs >= 0.6) >= 0.8, _summary(played_back)
        # In order: NetEq may stretch or a busy machine may leave a gap (up to 340 ms
        # seen), so chunks may slide later, never earlier, and stay within 1 s.
        lags = np.array([lag for _, lag, ncc in played_back if ncc >= 0.6])
        assert np.all(np.diff(lags) >= -0.05 * 24000), _summary(played_back)
        assert lags.max() - lags.min() <= 1.0 * 24000, _summary(played_back)
        # The viewer's speech came through our jitter buffer, the robot's through
        # the FEC sender.
        rx = peer.rx.stats
        print(f"robot receive path: {rx}".split(", delays_ms")[0])
        assert rx.normal >= 5 / 0.02 and rx.plc + rx.silence <= 0.1 * rx.played, rx
        assert peer.out.speech_frames >= 3 / 0.02, peer.out.speech_frames
        stats = await browser.evaluate("kvsViewer.stats()")
        assert stats["inbound"]["totalSamplesReceived"] > 3 * 48000, stats
        assert stats["inbound"]["totalAudioEnergy"] > 0.01, stats
        assert stats["outbound"]["packetsSent"] > 100, stats
        local = stats["selectedPair"]["local"]
        assert local.startswith("127."), f"Chromium used {local}"
        for c in await browser.evaluate("kvsViewer.candidates.local"):
            assert c.split()[4].startswith("127."), c

        # chat and mute: validated by the robot, delivered to on_message
        await browser.evaluate("kvsViewer.sendText('Where is the kitchen?')")
        await browser.evaluate("kvsViewer.setMuted(true)")
        deadline = loop.time() + 10
        while len(inbound) < 2 and loop.time() < deadline:
            got_message.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(got_message.wait(), 1)
        assert inbound == [
            ("visitor-e2e", {"type": "text", "text": "Where is the kitchen?"}),
            ("visitor-e2e", {"type": "mute"}),
        ]

        # GO_AWAY to the page: it re-presigns and reconnects; media stays up.
        await asyncio.to_thread(kvs.send_go_away, "visitor-e2e")
        assert await asyncio.to_thread(
            kvs.wait_until,
            lambda: [c for _, c, _ in emu.connections].count("visitor-e2e") == 2,
            15,
        ), browser.console[-20:]
        assert await browser.evaluate("kvsViewer.signaling.received.GO_AWAY") == 1
        assert await browser.evaluate("kvsViewer.connectionState") == "connected"
