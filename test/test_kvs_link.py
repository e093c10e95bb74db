"""aiortc viewer <-> KVS stand-in <-> KvsMaster on loopback, all real: boto3, botocore
presigning, websockets, aiortc (DTLS-SRTP, Opus, SCTP)."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import soxr

from sonic_voice.emulators.kvs import KvsEmulator
from sonic_voice.kvs.audio import PacedAudioTrack
from sonic_voice.kvs.master import KvsMaster
from sonic_voice.kvs.messages import RejectedMessage, parse_inbound
from sonic_voice.kvs.opus_send import OpusFecTrack
from sonic_voice.kvs.settings import KvsSettings

from test.harness.signals import (
    best_alignment,
    chunk_correlations,
    longest_silent_run,
    silence,
    speech_like,
)
from test.harness.viewer import TEST_SECRET, Viewer

CHANNEL = "robot"
ROOT = str(Path(__file__).resolve().parent.parent)


class Robot:
    """A master plus what it delivered."""

    def __init__(self, emu: KvsEmulator, **kw) -> None:
        self.audio: dict[str, list[np.ndarray]] = {}
        self.counts: list[int] = []
        self.messages: list[tuple[str, dict]] = []
        settings = KvsSettings(
            CHANNEL,
            endpoint_url=emu.endpoint_url,
            access_key_id="AKIDMASTER",
            secret_access_key=TEST_SECRET,
            ice_servers_override=[],
            **kw,
        )
        self.master = KvsMaster(
            settings,
            on_audio=lambda c, b: self.audio.setdefault(c, []).append(np.frombuffer(b, "<i2")),
            on_viewers=self.counts.append,
            on_message=lambda c, m: self.messages.append((c, m)),
        )

    def heard(self, client: str) -> np.ndarray:
        blocks = self.audio.get(client, [])
        return np.concatenate(blocks) if blocks else np.zeros(0, np.int16)


@pytest.fixture
async def emu():
    e = KvsEmulator(channels=[CHANNEL], verify_secret=TEST_SECRET)
    await e.start()
    yield e
    await e.stop()


@pytest.fixture
async def robot(emu: KvsEmulator):
    r = Robot(emu)
    await r.master.start()
    assert await r.master.wait_connected(10)
    yield r
    await r.master.stop()


def viewer(emu: KvsEmulator, client: str, **kw) -> Viewer:
    return Viewer(emu.endpoint_url, CHANNEL, client, **kw)


async def wait_for(pred, timeout: float = 10.0) -> bool:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def opus_fmtp(sdp: str) -> dict[str, str]:
    """The Opus ``a=fmtp`` parameters of the first audio section (empty when none)."""
    lines = sdp.replace("\r\n", "\n").split("\n")
    pt = next(ln.split()[0].split(":")[1] for ln in lines if "opus/48000" in ln.lower())
    fmtp = [ln for ln in lines if ln.startswith(f"a=fmtp:{pt} ")]
    if not fmtp:
        return {}
    return dict(kv.split("=", 1) for kv in fmtp[0].split(" ", 1)[1].split(";"))


def answer_sdp(emu: KvsEmulator, client: str) -> str:
    """The SDP answer the stand-in routed to ``client`` (what the viewer received)."""
    rec = [r for r in emu.routed("SDP_ANSWER") if r.recipient == client][-1]
    return json.loads(base64.b64decode(rec.payload))["sdp"]


def check_viewer_speech(speech: np.ndarray, got: np.ndarray, resilient: bool) -> None:
    """The viewer's speech arrived: whole-signal NCC for aiortc's stock path (it only
    delays); for our adaptive jitter buffer, which grows and shrinks its depth by whole
    20 ms frames (by design, as a browser's NetEq does), every 250 ms piece in order."""
    lag, ncc = best_alignment(speech, got)
    if not resilient:
        assert ncc >= 0.9, f"viewer -> robot: ncc {ncc:.3f} at lag {lag}"
        return
    # ahead: the buffer deepens by whole frames after a stall (up to 0.5 s here).
    pieces = chunk_correlations(speech, got, 4000, 1600, ahead=8000)
    assert len(pieces) >= 7, pieces
    assert np.median(pieces) >= 0.9 and np.mean(pieces >= 0.8) >= 0.75, (
        f"viewer -> robot pieces {np.round(pieces, 2)} (whole ncc {ncc:.3f})"
    )


def longest_hole(got: np.ndarray, source: np.ndarray, win: int = 120, audible: float = 100) -> int:
    """Longest run of exact zeros in ``got`` where the aligned ``source`` is audible
    (RMS over ``win`` samples above ``audible``): a hole the sender or the path made."""
    n = min(len(got), len(source))
    power = np.convolve(source[:n].astype(np.float64) ** 2, np.ones(win) / win, mode="same")
    zeros = (got[:n] == 0) & (np.sqrt(power) > audible)
    return longest_silent_run(np.where(zeros, 0, 1), 0)


@pytest.mark.parametrize("resilient", [True, False], ids=["ours", "aiortc-stock"])
async def test_audio_both_ways_with_trickled_candidates(emu: KvsEmulator, resilient: bool) -> None:
    """Viewer speech reaches on_audio at 16 kHz in 32 ms blocks; robot speech played in odd
    chunks reaches the viewer whole and gap-free. The viewer trickles its candidates, one
    before its offer, so the master's early-candidate buffer is on the path. Both with our
    audio paths (the default: adaptive jitter buffer in, Opus FEC out, munged answer) and
    with aiortc's stock ones."""
    robot = Robot(emu, resilient_receive=resilient, opus_fec=resilient)
    await robot.master.start()
    try:
        await _both_ways(emu, robot, resilient)
    finally:
        await robot.master.stop()


async def _both_ways(emu: KvsEmulator, robot: Robot, resilient: bool) -> None:
    # Made before the call: ~0.2 s of numpy on this loop (shared by both peers) would
    # stall the media it is meant to measure.
    speech = speech_like(2.0, 16000, seed=3)
    robot_speech = speech_like(2.5, 24000, seed=4)
    v = await viewer(emu, "visitor-1", trickle=True).join()
    assert emu.routed("ICE_CANDIDATE", "visitor-1"), "the viewer should have trickled"
    assert "a=candidate" not in emu.routed("SDP_OFFER")[0].payload  # (base64, so trivially)
    assert await robot.master.wait_viewers(1)
    assert robot.counts[-1] == 1

    peer = robot.master.peers["visitor-1"]
    kinds: Counter[str] = Counter()  # our buffer's frames from here on (start-up excluded)
    if resilient:
        peer.rx.on_frame = lambda f: kinds.update([f.kind])
    v.say(np.concatenate([silence(0.2, 16000), speech, silence(0.4, 16000)]))
    t0 = time.monotonic()
    rng = np.random.default_rng(1)
    i = 0
    while i < len(robot_speech):  # odd chunk sizes, faster than real time like Nova Sonic
        n = int(rng.integers(7, 2000))
        robot.master.play(robot_speech[i : i + n].tobytes())
        i += n
        await asyncio.sleep(0.003)
    assert await wait_for(lambda: len(robot.heard("visitor-1")) >= 16000 * 2.5, 15)
    assert await wait_for(lambda: len(v.heard(t0)) >= 48000 * 2.7, 15)
    await asyncio.sleep(0.3)

    got = robot.heard("visitor-1")
    assert {len(b) for b in robot.audio["visitor-1"]} == {512}  # 32 ms at 16 kHz
    check_viewer_speech(speech, got, resilient)
    fmtp = opus_fmtp(answer_sdp(emu, "visitor-1"))
    if resilient:
        assert isinstance(peer.out, OpusFecTrack) and peer.rx is not None
        assert peer.rx.out_rate == 16000  # decoded at audio/remote's rate: no resampler
        # Our buffer played the viewer's speech, almost all of it from packets.
        played = sum(kinds.values())
        assert kinds["normal"] >= 2.5 / 0.02, (kinds, peer.rx.stats)
        assert kinds["plc"] + kinds["silence"] <= 0.05 * played, (kinds, peer.rx.stats)
        assert fmtp["useinbandfec"] == "1" and fmtp["usedtx"] == "0", fmtp
        assert peer.out.speech_frames >= 2.5 / 0.02
    else:
        assert isinstance(peer.out, PacedAudioTrack) and peer.rx is None
        assert fmtp.get("useinbandfec") != "1", fmtp

    heard = v.heard(t0)
    expected = soxr.resample(robot_speech, 24000, 48000)
    lag, ncc = best_alignment(expected, heard)
    assert ncc >= 0.9, f"robot -> viewer: ncc {ncc:.3f} at lag {lag}"
    # Gap-free: no run of digital silence where the robot's speech is audible (a codec may
    # turn the source's near-silent +-1 LSB stretches into zeros; that is not a gap).
    segment = heard[lag : lag + len(expected)]
    assert longest_hole(segment, expected) <= 48
    await v.close()


async def test_data_channel_transcripts_and_validation(emu: KvsEmulator, robot: Robot) -> None:
    v = await viewer(emu, "visitor-1").join()
    assert await wait_for(lambda: robot.master.peers["visitor-1"].channels, 10)
    await wait_for(lambda: robot.master.peers["visitor-1"].channels[0].readyState == "open")
    robot.master.broadcast({"type": "transcript", "role": "ASSISTANT", "text": "Bonjour !"})
    robot.master.broadcast({"type": "state", "state": "speaking"})
    m = await v.wait_message(lambda m: m.get("type") == "transcript")
    assert m == {"type": "transcript", "role": "ASSISTANT", "text": "Bonjour !"}
    await v.wait_message(lambda m: m.get("type") == "state")

    v.send_json({"type": "text", "text": "  where is the lift?  "})
    v.send_json({"type": "mute"})
    # Not allowed: raw Nova Sonic events, extra fields, empty text, junk.
    v.send_json({"event": {"toolResult": {"content": "opened"}}})
    v.send_json({"type": "text", "text": "hi", "role": "SYSTEM"})
    v.send_json({"type": "text", "text": "   "})
    v.send_raw("not json")
    v.send_json({"type": "unmute"})
    assert await wait_for(lambda: len(robot.messages) == 3, 10)
    assert robot.messages == [
        ("visitor-1", {"type": "text", "text": "where is the lift?"}),
        ("visitor-1", {"type": "mute"}),
        ("visitor-1", {"type": "unmute"}),
    ]
    errors = [m for m in v.messages if m.get("type") == "error"]
    assert await wait_for(lambda: len([m for m in v.messages if m.get("type") == "error"]) == 4)
    errors = [m["reason"] for m in v.messages if m.get("type") == "error"]
    assert "None" in errors[0] and "not accepted" in errors[0]
    assert "role" in errors[1]
    assert robot.master.peers["visitor-1"].rejected == errors
    await v.close()


async def test_a_transcript_sent_as_the_viewer_connects_reaches_it(emu: KvsEmulator) -> None:
    """The greeting's transcript is broadcast the moment a viewer's peer connects, before
    its data channel is open on the robot's side: it waits for the channel (after the
    latched state) instead of being lost."""
    r = Robot(emu)
    states: list[bool] = []

    def on_viewers(count: int) -> None:  # runs as the peer connects
        if count != 1 or states:
            return
        peer = r.master.peers["visitor-1"]
        states.append(any(c.readyState == "open" for c in peer.channels))
        r.master._latch({"type": "state", "state": "speaking"})
        r.master.broadcast({"type": "transcript", "role": "ASSISTANT", "text": "Welcome!"})

    r.master.on_viewers = on_viewers
    await r.master.start()
    assert await r.master.wait_connected(10)
    try:
        v = await viewer(emu, "visitor-1").join()
        m = await v.wait_message(lambda m: m.get("type") == "transcript")
        assert m == {"type": "transcript", "role": "ASSISTANT", "text": "Welcome!"}
        assert states[:1] == [False], "the channel was already open: nothing was tested"
        await v.wait_message(lambda m: m.get("type") == "state")
        kinds = [m.get("type") for m in v.messages]
        assert kinds[:2] == ["transcript", "state"] and kinds.count("state") == 1, kinds
        await v.close()
    finally:
        await r.master.stop()


async def test_mute_drops_viewer_audio(emu: KvsEmulator, robot: Robot) -> None:
    v = await viewer(emu, "visitor-1").join()
    v.send_json({"type": "mute"})
    assert await wait_for(lambda: robot.master.peers["visitor-1"].muted, 10)
    # (the viewer's silence before the mute arrived may have been delivered: count from now)
    delivered = len(robot.heard("visitor-1"))
    v.say(speech_like(1.0, 16000, seed=9))
    peer = robot.master.peers["visitor-1"]
    start = peer.remote_blocks
    assert await wait_for(lambda: peer.remote_blocks > start + 40, 10)
    assert len(robot.heard("visitor-1")) == delivered  # decoded and consumed, not delivered
    await v.close()


def test_parse_inbound_rules() -> None:
    assert parse_inbound('{"type":"text","text":" hi "}') == {"type": "text", "text": "hi"}
    for bad, why in [
        ('{"type":"text","text":"' + "x" * 2001 + '"}', "too long"),
        ('{"type":"audioInput","content":"AAAA"}', "not accepted"),
        ('{"type":"mute","x":1}', "Additional properties"),
        ("[1]", "not a JSON object"),
        ('{"type":"text","text":"' + "é" * 2100 + '"}', "exceeds 4096"),
    ]:
        with pytest.raises(RejectedMessage, match=why):
            parse_inbound(bad)


async def test_go_away_reconnect_then_new_viewer(emu: KvsEmulator, robot: Robot) -> None:
    v1 = await viewer(emu, "visitor-1").join()
    sig = robot.master.signaling
    await emu.send_go_away()
    assert await emu.wait_until(lambda: emu.master_connects() == 2, 10)
    assert "go_away" in sig.reconnect_reasons
    # The new connection is freshly presigned (the stand-in checked its signature).
    assert await wait_for(lambda: sig.connects == 2) and not emu.refused
    # The existing peer is media-only and survives the signaling reconnect.
    assert robot.master.viewer_count == 1
    v2 = await viewer(emu, "visitor-2").join()
    assert await robot.master.wait_viewers(2)
    # RECONNECT_ICE_SERVER -> a new GetIceServerConfig.
    before = len(emu.calls_of("getIceServerConfig"))
    await emu.send_reconnect_ice_server()
    assert await emu.wait_until(lambda: len(emu.calls_of("getIceServerConfig")) > before, 10)
    # STATUS_RESPONSE: logged and matched to what we sent under that correlation id.
    answer = emu.routed("SDP_ANSWER")[-1]
    await emu.send_status_response(answer.correlation_id, description="test failure")
    assert await wait_for(lambda: sig.status_responses, 5)
    assert sig.status_responses[-1]["about"] == "SDP_ANSWER to visitor-2"
    # Blank keep-alives and foreign JSON do not disturb the connection.
    await emu.send_raw("")
    await emu.send_raw('{"message":"Endpoint request timed out","connectionId":"x"}')
    # A dropped socket (no GO_AWAY) is reconnected with backoff.
    await emu.drop()
    assert await emu.wait_until(lambda: emu.master_connects() == 3, 15)
    assert await wait_for(lambda: sig.connects == 3)
    v3 = await viewer(emu, "visitor-3").join()
    assert await robot.master.wait_viewers(3)
    for v in (v1, v2, v3):
        await v.close()
    assert await robot.master.wait_viewers(0)


async def test_reconnects_before_the_connection_limit(emu: KvsEmulator) -> None:
    r = Robot(emu, max_connection_s=1.0)
    await r.master.start()
    try:
        assert await emu.wait_until(lambda: emu.master_connects() >= 3, 10)
        assert r.master.signaling.reconnect_reasons[:2] == ["max_age", "max_age"]
    finally:
        await r.master.stop()


async def test_viewer_that_leaves_is_freed(emu: KvsEmulator, robot: Robot) -> None:
    v = await viewer(emu, "visitor-1").join()
    peer = robot.master.peers["visitor-1"]
    assert robot.master.peer_tasks()
    await v.close()
    assert await robot.master.wait_viewers(0, 10)
    assert await wait_for(lambda: "visitor-1" not in robot.master.peers, 10)
    assert peer.closed.is_set() and peer.pc.connectionState == "closed"
    assert peer.out.readyState == "ended"
    assert not [t for t in peer.tasks if not t.done()]
    assert not robot.master.peer_tasks()
    assert not [t for t in asyncio.all_tasks() if "visitor-1" in t.get_name()]
    assert robot.counts == [1, 0]


async def test_viewer_that_vanishes_is_freed(emu: KvsEmulator, robot: Robot) -> None:
    """A viewer process killed outright (no DTLS close, no goodbye) is noticed by ICE
    consent freshness (~30 s in aioice) and its peer is closed and freed."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "test.harness.viewer",
        "--endpoint-url",
        emu.endpoint_url,
        "--channel",
        CHANNEL,
        "--client-id",
        "ghost",
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        line = await asyncio.wait_for(proc.stdout.readline(), 60)
        assert line.strip() == b"connected"
        assert await robot.master.wait_viewers(1)
        assert await wait_for(lambda: len(robot.heard("ghost")) > 16000, 15)  # it talks
        peer = robot.master.peers["ghost"]
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 10)
        assert await robot.master.wait_viewers(0, 90)
        assert await wait_for(lambda: peer.closed.is_set(), 10)
        assert "ghost" not in robot.master.peers
        assert peer.pc.connectionState == "closed"
        assert not robot.master.peer_tasks()
        # The room is usable again.
        v = await viewer(emu, "visitor-2").join()
        assert await robot.master.wait_viewers(1)
        await v.close()
    finally:
        if proc.returncode is None:
            proc.kill()
            await asyncio.wait_for(proc.wait(), 5)


async def test_two_viewers_each_hear_everything(emu: KvsEmulator, robot: Robot) -> None:
    a, b = await asyncio.gather(viewer(emu, "a").join(), viewer(emu, "b").join())
    assert await robot.master.wait_viewers(2)
    robot_speech = speech_like(2.0, 24000, seed=6)
    t0 = time.monotonic()
    robot.master.play(robot_speech.tobytes())
    expected = soxr.resample(robot_speech, 24000, 48000)
    for v in (a, b):
        assert await wait_for(lambda v=v: len(v.heard(t0)) >= len(expected) + 9600, 15)
    for v in (a, b):
        _lag, ncc = best_alignment(expected, v.heard(t0))
        assert ncc >= 0.9, f"{v.client_id}: ncc {ncc:.3f}"
    # Each peer has its own track (frames are not split between senders).
    tracks = {id(p.out) for p in robot.master.peers.values()}
    assert len(tracks) == 2
    # flush() drops queued speech for everyone at once.
    robot.master.play(speech_like(3.0, 24000, seed=7).tobytes())
    await asyncio.sleep(0.3)
    robot.master.flush()
    assert all(p.out.queued_seconds < 0.02 for p in robot.master.peers.values())
    await asyncio.gather(a.close(), b.close())


async def test_max_viewers_and_large_answers(emu: KvsEmulator) -> None:
    r = Robot(emu, max_viewers=1, max_message_chars=400)
    await r.master.start()
    try:
        # The answer is over the (lowered) limit: candidates go out as ICE_CANDIDATE frames.
        a = await viewer(emu, "a").join()
        # (paced after the answer: they may leave after the viewer connected)
        assert await emu.wait_until(lambda: emu.routed("ICE_CANDIDATE", "MASTER"), 5)
        assert await r.master.wait_viewers(1)
        b = viewer(emu, "b")
        with pytest.raises(TimeoutError):
            await b.join(timeout=3)
        assert r.master.rejected_offers == [("b", "max_viewers (1) reached")]
        assert r.master.viewer_count == 1
        await asyncio.gather(a.close(), b.close())
    finally:
        await r.master.stop()


async def test_fatal_configuration_is_reported(emu: KvsEmulator) -> None:
    from sonic_voice.kvs.control import ControlPlaneError

    settings = KvsSettings(
        "no-such-channel",
        endpoint_url=emu.endpoint_url,
        access_key_id="AKIDMASTER",
        secret_access_key=TEST_SECRET,
    )
    m = KvsMaster(settings)
    with pytest.raises(ControlPlaneError, match="does not exist"):
        await m.start()
    await m.stop()
    settings.create_channel = True
    m = KvsMaster(settings)
    await m.start()
    assert await m.wait_connected()
    assert emu.calls_of("createSignalingChannel")
    await m.stop()
