"""Robot and viewer behind a NAT that drops direct traffic, joined only through a real TURN
relay (Debian's coturn) whose time-limited credentials come from the KVS stand-in's
GetIceServerConfig. The robot is the real KvsMaster, the viewer an aiortc viewer, each in
its own network namespace (test/harness/nat.py); the stand-in and coturn live in the
test's namespace ("the internet", 198.18.0.2). Skips with the reason where the machine
cannot build the namespaces (not root, no nftables/coturn, no isolated namespace).
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import soxr
from aioice import turn
from aiortc import RTCConfiguration, RTCIceServer, RTCIceTransportPolicy

from sonic_voice.emulators.kvs.thread import KvsEmulatorThread
from sonic_voice.kvs.control import ControlPlane
from sonic_voice.kvs.master import KvsMaster
from sonic_voice.kvs.net_hooks import consent_timing, selected_pair
from sonic_voice.kvs.settings import KvsSettings

from test.harness.nat import (
    PUBLIC_IP,
    TURN_PORT,
    Coturn,
    NatTopology,
    NsLoop,
    TopologyUnavailable,
    unavailable_reason,
)
from test.harness.signals import chunk_correlations, silence, speech_like
from test.harness.viewer import TEST_SECRET, Viewer

pytestmark = pytest.mark.timeout(150)

CHANNEL = "robot"
STUN = f"stun:{PUBLIC_IP}:{TURN_PORT}"  # coturn answers STUN too (srflx candidates exist)


@dataclass
class World:
    net: NatTopology
    turn: Coturn
    emu: KvsEmulatorThread
    robot: NsLoop
    viewer: NsLoop
    master: KvsMaster | None = None
    heard: dict[str, list[np.ndarray]] = field(default_factory=dict)
    counts: list[int] = field(default_factory=list)

    def settings(self, **kw) -> KvsSettings:
        return KvsSettings(
            CHANNEL,
            endpoint_url=self.emu.endpoint_url,
            access_key_id="AKIDMASTER",
            secret_access_key=TEST_SECRET,
            stun_url=STUN,
            **kw,
        )

    async def start_robot(self, **kw) -> KvsMaster:
        """The real master, on the robot's namespace loop."""
        kw.setdefault("ice_refresh_grace_s", 2.0)
        kw.setdefault("ice_timeout_s", 25.0)
        settings = self.settings(**kw)

        async def start() -> KvsMaster:
            m = KvsMaster(
                settings,
                on_audio=lambda c, b: self.heard.setdefault(c, []).append(np.frombuffer(b, "<i2")),
                on_viewers=self.counts.append,
            )
            await m.start()
            assert await m.wait_connected(10)
            return m

        self.master = await self.robot.run(start())
        return self.master

    async def join(self, client: str, policy: str = "all", timeout: float = 30) -> Viewer:  # noqa: ASYNC109
        """A viewer in the viewer's namespace, with TURN from GetIceServerConfig (VIEWER)."""
        settings = self.settings()

        async def join() -> Viewer:
            control = await asyncio.to_thread(ControlPlane, settings, "VIEWER")
            relays = await asyncio.to_thread(control.ice_servers, client)
            servers = [RTCIceServer(urls=[STUN])] + [
                RTCIceServer(urls=list(t.uris), username=t.username, credential=t.password)
                for t in relays
            ]
            config = RTCConfiguration(
                iceServers=servers, iceTransportPolicy=RTCIceTransportPolicy(policy)
            )
            v = Viewer(self.emu.endpoint_url, CHANNEL, client, config=config)
            try:
                return await v.join(timeout)
            except BaseException:
                await v.close()  # a failed attempt leaves nothing behind (the page tears down)
                raise

        v = await self.viewer.run(join(), timeout + 10)
        # The robot's side may see "connected" a little after the viewer's; play() only
        # reaches connected peers.
        peer_up = lambda: (p := self.master.peers.get(client)) is not None and p.connected.is_set()  # noqa: E731
        assert await wait_for(peer_up, 10), f"{client}: the robot's peer never connected"
        return v

    def robot_heard(self, client: str) -> np.ndarray:
        blocks = list(self.heard.get(client, []))
        return np.concatenate(blocks) if blocks else np.zeros(0, np.int16)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    reason = unavailable_reason()
    if reason:
        pytest.skip(f"NAT/TURN topology unavailable: {reason}")
    try:
        net = NatTopology().up()
    except TopologyUnavailable as e:
        pytest.skip(f"NAT/TURN topology unavailable: {e}")
    secret = secrets.token_hex(16)
    # Allocations live 4 s (aioice refreshes them every ~3.3 s), so refreshes happen
    # mid-call, after the credentials they were made with have expired.
    relay = Coturn(tmp_path, secret, max_lifetime=4)
    emu = robot = viewer = None
    try:
        relay.start()
        emu = KvsEmulatorThread(
            host=PUBLIC_IP,
            channels=(CHANNEL,),
            ice_servers=[{"Uris": [relay.uri]}],
            ice_ttl=300,
            turn_secret=secret,
        ).start()
        robot, viewer = NsLoop(net.robot), NsLoop(net.viewer)
        w = World(net, relay, emu, robot, viewer)
        yield w
        if w.master is not None:
            robot.submit(w.master.stop()).result(20)
    finally:
        for part in (viewer, robot):
            if part is not None:
                part.close()
        if emu is not None:
            emu.stop()
        relay.stop()
        net.down()


async def pairs_of(w: World, v: Viewer, client: str):
    async def robot_side():
        return selected_pair(w.master.peers[client].pc)

    async def viewer_side():
        return selected_pair(v.pc)

    return await w.robot.run(robot_side()), await w.viewer.run(viewer_side())


async def close_viewer(w: World, v: Viewer) -> None:
    await w.viewer.run(v.close())


async def wait_for(pred, timeout: float = 10.0) -> bool:  # noqa: ASYNC109
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.05)
    return True


def audible(x: np.ndarray, threshold: int = 300) -> int:
    """Samples louder than ``threshold``: speech has arrived, not just the silence before it
    (on a loaded machine the robot's speech may reach the viewer a second late)."""
    return int(np.count_nonzero(np.abs(x.astype(np.int32)) > threshold))


def robot_to_viewer_ok(reference24k: np.ndarray, heard48k: np.ndarray) -> float:
    """Median NCC of the robot's speech, 250 ms piece by piece, in what the viewer heard
    (aiortc's receiver may skip a frame under load, which smears one whole-signal NCC)."""
    expected = soxr.resample(reference24k, 24000, 48000)
    pieces = chunk_correlations(expected, heard48k, 12000, 4800)
    return float(np.median(pieces)) if len(pieces) else 0.0


async def test_call_connects_only_through_the_relay_audio_both_ways(world: World) -> None:
    """Host and server-reflexive paths exist on paper but the NAT kills them: ICE nominates
    a relay pair on both ends, the router dropped the direct attempts, and speech crosses
    both ways intact (cross-correlation)."""
    w = world
    await w.start_robot()
    to_viewer = speech_like(2.0, 24000, seed=21)
    to_robot = speech_like(2.0, 16000, seed=22)
    v = await w.join("visitor-1")
    robot_pair, viewer_pair = await pairs_of(w, v, "visitor-1")
    assert robot_pair is not None and viewer_pair is not None
    for pair in (robot_pair, viewer_pair):  # media crosses coturn on both ends' pairs
        assert pair.relayed, pair
        relay_end = pair.local if pair.local_type == "relay" else pair.remote
        assert relay_end[0] == PUBLIC_IP, pair
    drops = w.net.drops()
    assert drops["robot->viewer"] + drops["viewer->robot"] > 0, drops  # direct checks died

    t0 = time.monotonic()
    robot_blocks = len(w.heard.get("visitor-1", []))  # the viewer's silence so far
    w.master.play(np.concatenate([silence(0.2, 24000), to_viewer, silence(0.3, 24000)]))
    w.viewer.loop.call_soon_threadsafe(
        v.say, np.concatenate([silence(0.2, 16000), to_robot, silence(0.3, 16000)])
    )

    def robot_got() -> np.ndarray:
        blocks = list(w.heard.get("visitor-1", []))[robot_blocks:]
        return np.concatenate(blocks) if blocks else np.zeros(0, np.int16)

    assert await wait_for(lambda: len(robot_got()) >= 16000 * 2.4, 15)
    need = 0.8 * audible(soxr.resample(to_viewer, 24000, 48000))
    assert await wait_for(lambda: audible(v.heard(t0)) >= need, 30)
    await asyncio.sleep(1.5)  # the rest of it (comparing a cut recording misaligns)
    ncc = robot_to_viewer_ok(to_viewer, v.heard(t0))
    assert ncc >= 0.85, f"robot -> viewer through TURN: ncc {ncc:.3f}"
    pieces = chunk_correlations(to_robot, robot_got(), 4000, 1600)
    assert np.median(pieces) >= 0.85, f"viewer -> robot through TURN: {np.round(pieces, 2)}"
    await close_viewer(w, v)


async def test_credentials_expire_and_refresh_mid_call_without_a_gap(world: World) -> None:
    """TURN credentials that live 6 s; a 14 s call. The master re-fetches them before each
    expiry; the live allocation keeps being refreshed by the relay after the credentials it
    was made with expired; the viewer hears the robot's tone with no gap over 200 ms all
    along (RTP timestamps of the frames it plays, and no silent 100 ms);
    credentials from before the expiry no longer open an allocation, and a second viewer who
    joins after it still connects through the relay (on the refreshed credentials)."""
    w = world
    w.emu.sync(lambda: setattr(w.emu.emulator, "ice_ttl", 6))
    await w.start_robot()
    v = await w.join("visitor-1", policy="relay")
    issued_at_join = len(w.emu.sync(lambda: list(w.emu.emulator.ice_issued)))
    first_user = w.emu.sync(lambda: w.emu.emulator.ice_issued[0][0])

    tone = (0.25 * 32767 * np.sin(2 * np.pi * 440 * np.arange(24000 * 15) / 24000)).astype(np.int16)
    t0 = time.monotonic()
    w.master.play(tone)
    await asyncio.sleep(14.0)
    n = min(len(v.frames), len(v.frame_pts))
    window = [i for i in range(n) if t0 + 1.0 <= v.frames[i][0] <= t0 + 14.0]
    # (Under a load average of 10+ aiortc's receiver drops a few frames: ~86 % seen.)
    assert len(window) >= 0.75 * 13.0 / 0.02, f"only {len(window)} frames in 13 s"
    # No audio missing: consecutive frames' RTP timestamps never skip more than 200 ms
    # (a dead relay would skip seconds); arrival gaps are only bounded loosely, since four
    # event loops share this process's GIL on a loaded 2-core machine.
    pts = np.array([v.frame_pts[i] for i in window], dtype=np.int64)
    worst_skip = float(np.max(np.diff(pts))) / 48000
    assert worst_skip <= 0.2, f"{worst_skip * 1000:.0f} ms of audio missing at one point"
    arrivals = np.array([v.frames[i][0] for i in window])
    worst_gap = float(np.max(np.diff(arrivals)))
    assert worst_gap <= 1.0, f"the audio stopped for {worst_gap * 1000:.0f} ms"
    audio = np.concatenate([v.frames[i][1] for i in window])
    rms = [np.sqrt(np.mean(audio[i : i + 4800].astype(np.float64) ** 2))
           for i in range(0, len(audio) - 4800, 4800)]  # fmt: skip
    assert min(rms) > 0.05 * 32767, f"a silent 100 ms in the tone: min rms {min(rms):.0f}"

    issued = w.emu.sync(lambda: list(w.emu.emulator.ice_issued))
    assert len(issued) - issued_at_join >= 2, f"the master did not refresh: {issued}"
    expiry = int(first_user.split(":", 1)[0])
    assert expiry < time.time(), "the first credentials should have expired during the call"
    log = w.turn.log_text()
    assert "REFRESH processed, success" in log

    # The expired credentials no longer open an allocation (so the refresh was needed) ...
    password = w.emu.sync(lambda: w.emu.emulator._turn_password(first_user))

    async def stale_allocation() -> str:
        try:
            t, _ = await turn.create_turn_endpoint(
                asyncio.DatagramProtocol, (PUBLIC_IP, TURN_PORT), first_user, password
            )
        except Exception as e:  # noqa: BLE001 - the refusal is the point
            return f"{type(e).__name__}: {e}"
        t.close()
        return "allocated"

    refused = await w.robot.run(stale_allocation())
    assert "401" in refused, refused
    # ... and a viewer joining now, relay only, connects on the master's fresh ones.
    v2 = await w.join("visitor-2", policy="relay")
    robot_pair, _ = await pairs_of(w, v2, "visitor-2")
    assert robot_pair is not None and robot_pair.relayed, robot_pair
    await close_viewer(w, v2)
    await close_viewer(w, v)


async def test_relay_only_policy(world: World) -> None:
    """ice_transport_policy=relay on the robot and the viewer: the answer carries relay
    candidates only, and the call connects relay to relay."""
    w = world
    await w.start_robot(ice_transport_policy="relay", abr=True)
    v = await w.join("visitor-1", policy="relay")
    answer = v.pc.remoteDescription.sdp
    cands = [ln for ln in answer.splitlines() if ln.startswith("a=candidate")]
    assert cands and all(" typ relay" in c for c in cands), cands
    offer = v.pc.localDescription.sdp
    assert all(" typ relay" in c for c in offer.splitlines() if c.startswith("a=candidate"))
    robot_pair, viewer_pair = await pairs_of(w, v, "visitor-1")
    assert (robot_pair.local_type, robot_pair.remote_type) == ("relay", "relay"), robot_pair
    assert (viewer_pair.local_type, viewer_pair.remote_type) == ("relay", "relay"), viewer_pair
    t0 = time.monotonic()
    to_viewer = speech_like(1.5, 24000, seed=23)
    w.master.play(np.concatenate([silence(0.2, 24000), to_viewer, silence(0.3, 24000)]))
    need = 0.8 * audible(soxr.resample(to_viewer, 24000, 48000))
    assert await wait_for(lambda: audible(v.heard(t0)) >= need, 30)
    await asyncio.sleep(1.5)  # the rest of it (comparing a cut recording misaligns)
    assert robot_to_viewer_ok(to_viewer, v.heard(t0)) >= 0.85
    # Adaptive bitrate on (settings.abr): the viewer's receiver reports reach the controller.
    peer = w.master.peers["visitor-1"]
    assert peer.out.cfg.adaptive and peer.abr.reports, "no receiver report reached the ABR"
    assert peer.abr.bitrate == 32000  # a clean relay: nothing to adapt
    await close_viewer(w, v)


async def test_relay_outage_is_reported_and_the_viewer_reconnects(world: World) -> None:
    """The relay dies mid-call: the viewer notices (ICE consent expires: its connection
    fails), keeps trying to rejoin (fresh GetIceServerConfig each time) and gets back in
    once the relay returns, audio flowing again. The master closes the old peer on its own
    (ICE ended; viewer count 0), then counts the returning viewer.
    """
    w = world
    with consent_timing(1.0, 3):  # report a dead path in ~6 s instead of ~60 s
        await w.start_robot(ice_timeout_s=8.0)
        v = await w.join("visitor-1", policy="relay")
        assert await wait_for(lambda: w.counts and w.counts[-1] == 1, 10)
        w.turn.stop()
        assert await wait_for(lambda: v.pc.connectionState in ("failed", "closed"), 20), (
            v.pc.connectionState
        )
        # ... and so does the robot, on its own: the peer closes with its ICE ended (the
        # same words as for a viewer that leaves: aiortc closes ICE either way).
        assert await wait_for(lambda: w.counts[-1] == 0, 20), w.counts
        reasons = list(w.master.closed_peers)
        assert any(
            c == "visitor-1" and ("ICE failed" in r or "ICE closed" in r) for c, r in reasons
        ), reasons
        await close_viewer(w, v)

    # Normal aioice timing again from here on.
    # The viewer retries while the relay is away, then it comes back.
    attempts: list[str] = []

    async def rejoin() -> Viewer:
        while True:
            try:
                # A new client id per attempt, as the page makes one per connect.
                return await w.join(f"visitor-1-{len(attempts) + 1}", policy="relay", timeout=6)
            except Exception as e:  # noqa: BLE001 - keep trying, like the page does
                attempts.append(f"{type(e).__name__}: {e}")
                if len(attempts) == 1:
                    await asyncio.to_thread(w.turn.start)  # the relay returns

    v2 = await asyncio.wait_for(rejoin(), 60)
    assert attempts, "the first rejoin should fail while the relay is away"
    robot_pair, _ = await pairs_of(w, v2, v2.client_id)
    assert robot_pair is not None and robot_pair.relayed
    assert await wait_for(lambda: w.counts[-1] == 1, 10), w.counts
    t0 = time.monotonic()
    to_viewer = speech_like(1.5, 24000, seed=24)
    w.master.play(np.concatenate([silence(0.2, 24000), to_viewer, silence(0.3, 24000)]))
    need = 0.8 * audible(soxr.resample(to_viewer, 24000, 48000))
    assert await wait_for(lambda: audible(v2.heard(t0)) >= need, 30)
    await asyncio.sleep(1.5)
    assert robot_to_viewer_ok(to_viewer, v2.heard(t0)) >= 0.85
    await close_viewer(w, v2)


async def test_speech_to_a_second_peer_through_the_relay(world: World) -> None:
    """A viewer leaves, another joins (relay only): the master's next peer works through
    the relay too, and it hears the robot's speech intact."""
    w = world
    await w.start_robot()
    v = await w.join("visitor-1", policy="relay")
    await close_viewer(w, v)
    assert await wait_for(lambda: w.counts[-1] == 0, 20), w.counts
    v2 = await w.join("visitor-2", policy="relay")
    t0 = time.monotonic()
    to_viewer = speech_like(1.5, 24000, seed=23)
    w.master.play(np.concatenate([silence(0.2, 24000), to_viewer, silence(0.3, 24000)]))
    need = 0.8 * audible(soxr.resample(to_viewer, 24000, 48000))
    assert await wait_for(lambda: audible(v2.heard(t0)) >= need, 30)
    await asyncio.sleep(1.5)  # the rest of it
    ncc = robot_to_viewer_ok(to_viewer, v2.heard(t0))
    await close_viewer(w, v2)
    assert ncc >= 0.85, f"second peer through TURN: chunk ncc {ncc:.2f}"
