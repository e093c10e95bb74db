"""Adaptive bitrate: the pure controller (sonic_voice/kvs/abr.py), the encoder it drives
(OpusFecTrack(adaptive=True).set_target) and the aiortc/aioice hook points it relies on."""

from __future__ import annotations

import asyncio
import random
import time

import av
import numpy as np
import pytest

from sonic_voice.kvs.abr import AbrConfig, AbrController, Report
from sonic_voice.kvs.jitter import opus_packet_samples
from sonic_voice.kvs.net_hooks import check_hook_points
from sonic_voice.kvs.opus_send import OpusFecTrack, OpusSendConfig

from test.harness.signals import speech_like


def feed(ctl: AbrController, start: float, seconds: float, loss: float, rtt: float = 0.05):
    out = []
    t = start
    while t < start + seconds:
        out.append(ctl.update(Report(t, loss, 0.0, rtt)))
        t += 1.0
    return out


# A link that counts codec bits only (no headers, no RTCP): 20 ms packets always.
PAYLOAD_ONLY = {"overhead_bytes": 0, "rtcp_bps": 0}


def test_plan_fits_the_wire_budget_with_longer_packets() -> None:
    """Headers cost 64 bytes a packet (25.6 kbit/s at 20 ms) and RTCP ~1 kbit/s: a thin
    link is served by longer packets, the shortest that leaves Opus 12 kbit/s, else the
    one that leaves it the most."""
    ctl = AbrController(AbrConfig())
    assert (ctl.bitrate, ctl.ptime_ms, ctl.wire) == (32000, 20, 32000 + 25600 + 1000)
    assert ctl.plan(58600) == (32000, 20)
    assert ctl.plan(30000) == (16200, 40)  # 30000 - 1000 - 64 * 8 * 25
    assert ctl.plan(20000) == (12600, 80)  # 20000 - 1000 - 64 * 8 * 12.5
    assert ctl.plan(16000) == (10733, 120)  # nothing reaches 12k: the most for Opus
    assert ctl.plan(10000) == (6000, 120)  # the floor (min_bps) holds
    for wire in range(12000, 60000, 1000):
        opus, ptime = ctl.plan(wire)
        assert opus + ctl.cfg.overhead_bps(ptime) + 1000 <= wire + 1
    assert AbrController(AbrConfig(**PAYLOAD_ONLY)).plan(12000) == (12000, 20)


def test_drops_in_one_report_to_what_the_link_carries() -> None:
    ctl = AbrController(AbrConfig(min_bps=6000, max_bps=32000, start_bps=32000, **PAYLOAD_ONLY))
    feed(ctl, 0, 5, 0.0)
    assert ctl.bitrate == 32000
    d = ctl.update(Report(5.0, 0.6, 0.0, 0.05))  # 32 kbit/s into a 12 kbit/s link
    assert d.changed and d.reason.startswith("down")
    assert d.bitrate == int(32000 * 0.4 * 0.65)  # heavy loss: under the link at once
    assert d.packet_loss_pct > 5  # FEC provisioned for the loss seen
    # On the wire: from 20 ms packets at 57.6 kbit/s to 120 ms ones.
    ctl = AbrController(AbrConfig())
    d = ctl.update(Report(1.0, 0.75, 0.0, 0.05))
    assert d.wire_bps <= 12000 and d.ptime_ms == 120 and d.bitrate >= 6000, d


def test_the_old_rates_tail_does_not_cut_twice_but_a_short_cut_is_followed() -> None:
    """A report covers the second before it: the part before the last cut took effect is
    charged with the loss that caused it; only the rest decides."""
    ctl = AbrController(AbrConfig(**PAYLOAD_ONLY))
    feed(ctl, 0, 5, 0.0)
    ctl.update(Report(5.0, 0.6, 0.0, 0.3))
    first = ctl.bitrate
    # Half of the next interval (until an RTT and a full queue, 0.3 + 0.2 s, after the
    # cut) was the old rate at 60 % loss: the 0.2 seen is all its tail.
    d = ctl.update(Report(6.0, 0.2, 0.0, 0.3))
    assert d.bitrate == first and not d.reason.startswith("down"), d
    ctl2 = AbrController(AbrConfig(**PAYLOAD_ONLY))
    feed(ctl2, 0, 5, 0.0)
    ctl2.update(Report(5.0, 0.6, 0.0, 0.3))
    d = ctl2.update(Report(6.0, 0.5, 0.0, 0.3))  # (0.5 - 0.3) / 0.5: still losing 40 %
    assert d.reason.startswith("down") and d.bitrate < first, d
    # A report entirely before the cut took effect changes nothing.
    d = ctl2.update(Report(6.05, 0.9, 0.0, 0.3, since=6.0))
    assert not d.changed


def test_rtt_rise_alone_backs_off_and_floor_holds() -> None:
    ctl = AbrController(AbrConfig(min_bps=8000, max_bps=32000, start_bps=32000))
    feed(ctl, 0, 3, 0.0, rtt=0.04)
    # +50 ms: under rtt_rise_s + one 20 ms packet: a packet ahead, not a queue.
    assert not ctl.update(Report(3.0, 0.0, 0.0, 0.09)).reason.startswith("down")
    d = ctl.update(Report(4.0, 0.0, 0.0, 0.20))  # a queue building, nothing lost yet
    assert d.changed and d.reason.startswith("down: rtt") and d.bitrate < 32000
    for i in range(20):
        ctl.update(Report(5.0 + i * 2, 0.5, 0.0, 0.3 + i * 0.01))
    assert ctl.bitrate == 8000 and ctl.ptime_ms == 120  # never below min_bps


def test_up_only_after_hold_with_hysteresis() -> None:
    cfg = AbrConfig(min_bps=6000, max_bps=32000, start_bps=32000, **PAYLOAD_ONLY)
    ctl = AbrController(cfg)
    ctl.update(Report(0.0, 0.6, 0.0, 0.05))  # the link carried 32000 * 0.4 = 12800
    low = ctl.bitrate
    assert low == 8320 and ctl.ceiling == 12800
    # Clean, but not for long enough; then a loss between the thresholds resets the clock.
    assert ctl.update(Report(1.0, 0.0, 0.0, 0.05)).bitrate == low
    assert ctl.update(Report(2.0, 0.02, 0.0, 0.05)).bitrate == low
    rates = {t: ctl.update(Report(float(t), 0.0, 0.0, 0.05)).bitrate for t in range(3, 12)}
    assert rates[3] == low  # clean since 3: hold_up_s (1 s) not over
    assert rates[4] == int(12800 * 0.9)  # fast (x1.5 a report), but only to the ceiling
    # Then additively, by 5 % of the ceiling, then 10 %, while it stays clean...
    assert [rates[t] for t in (5, 6, 7, 8, 9)] == [12160, 13440, 14720, 16000, 17280]
    assert ctl.ceiling is None  # ... until well past it (x 1.3): the link got better
    assert rates[10] == int(17280 * 1.5) and rates[11] == 32000


def test_a_failed_probe_goes_back_under_the_ceiling() -> None:
    ctl = AbrController(AbrConfig(**PAYLOAD_ONLY))
    ctl.update(Report(0.0, 0.6, 0.0, 0.05))
    feed(ctl, 1, 4, 0.0)  # clean from 1: at 2 to 90 % of the ceiling, then +5 %, +10 %
    assert ctl.wire == 12800 * 1.05
    d = ctl.update(Report(5.0, 0.0, 0.0, 0.25))  # the last step is filling the queue
    assert d.reason.startswith("down: rtt") and d.reason.endswith("after a step up (rr)"), d
    # The rate before that step is the knee now; back under it, small steps again.
    assert ctl.ceiling == 12800 * 0.95 and ctl.wire == 12800 * 0.95 * 0.9 and ctl.step == 0.05


def test_a_thin_link_costs_little_in_steady_state() -> None:
    """A simulated 12 kbit/s link (on the wire; a 200 ms queue: what does not fit is
    lost, what waits raises the RTT) for 60 s of receiver reports 0.5-1.5 s apart (as
    aiortc sends them): after the first cut, under 2 % of what is sent is lost to the
    probes, in 120 ms packets, and the rate stays close to the link. (Its floor, 6 kbit/s
    of Opus in 120 ms packets plus RTCP, is 94 % of this link: the thinnest it serves.)"""
    ctl = AbrController(AbrConfig(min_bps=6000, max_bps=32000, start_bps=32000))
    link, sent, lost, rates, queue = 12000.0, 0.0, 0.0, [], 0.0
    rng, t = random.Random(1), 0.0
    while t < 60:
        dt = 0.5 + rng.random()
        rate = ctl.wire
        queue = max(0.0, queue + (rate - link) * dt)
        over = max(0.0, queue - 0.2 * link)
        queue -= over
        loss = over / (rate * dt)
        rtt = 0.05 + queue / link
        if t >= 3:
            sent += rate * dt
            lost += over
            rates.append(rate)
            assert ctl.ptime_ms == 120
        t += dt
        ctl.update(Report(t, loss, 0.0, rtt))
    assert lost / sent < 0.02, f"{100 * lost / sent:.1f} % lost in steady state"
    assert 0.8 * link <= np.mean(rates) <= 1.05 * link, np.mean(rates)  # (the queue absorbs)


def test_remb_caps_and_bad_bounds_are_refused() -> None:
    ctl = AbrController(AbrConfig(**PAYLOAD_ONLY))
    d = ctl.update(Report(0.0, 0.0, 0.0, 0.05, remb_bps=20000))
    assert d.bitrate == 18000 and d.changed
    with pytest.raises(ValueError, match="min_bps <= start_bps"):
        AbrConfig(min_bps=40000, start_bps=32000)
    with pytest.raises(ValueError, match="ptimes_ms"):
        AbrConfig(ptimes_ms=(20, 30))


async def test_adaptive_track_changes_bitrate_between_frames() -> None:
    """set_target takes effect from the next frame: packet sizes follow (CBR)."""
    track = OpusFecTrack(OpusSendConfig(bitrate=32000, adaptive=True, input_rate=24000))
    track._start = -1e9  # no pacing: encode as fast as recv() is called
    track.push(speech_like(2.0, 24000, seed=5), 24000)
    sizes_hi = [len(bytes(await track.recv())) for _ in range(25)]
    track.set_target(8000, 20)
    sizes_lo = [len(bytes(await track.recv())) for _ in range(25)]
    assert track.bitrate == 8000 and track.packet_loss_pct == 20
    assert np.mean(sizes_hi[5:]) == pytest.approx(80, abs=4)  # 32 kbit/s * 20 ms
    assert np.mean(sizes_lo[5:]) == pytest.approx(20, abs=3)  # 8 kbit/s * 20 ms
    pkt = await track.recv()
    assert isinstance(pkt, av.Packet) and pkt.pts == 50 * 480  # the 51st frame, no pre-skip shift
    track.set_target(6000, 20, 120)  # a thin link: 120 ms packets, 8.3 packets/s
    longer = [await track.recv() for _ in range(4)]
    assert [opus_packet_samples(bytes(p)) for p in longer] == [5760] * 4  # at 48 kHz
    assert [p.pts for p in longer] == [51 * 480 + i * 2880 for i in range(4)]  # no gap
    assert track.ptime_ms == 120 and track.bitrate == 6000
    with pytest.raises(ValueError, match="ptime_ms"):
        track.set_target(6000, 20, 30)
    track.stop()
    fixed = OpusFecTrack(OpusSendConfig())
    with pytest.raises(RuntimeError, match="adaptive=True"):
        fixed.set_target(8000, 10)
    fixed.stop()
    await asyncio.sleep(0)


def test_net_hook_points_exist() -> None:
    """Fails loudly when an aiortc/aioice upgrade moves what net_hooks.py reaches into."""
    check_hook_points()


def test_a_faster_path_clears_the_ceiling() -> None:
    """On a thin link the RTT's floor is mostly our own packets' serialization (a 120 ms
    packet takes 100 ms to cross 12 kbit/s): an RTT far under it means the link grew, and
    the sender goes up at once instead of probing 5 % at a time."""
    cfg = AbrConfig(probe_after_s=100)  # no probing: only the RTT can clear the ceiling
    ctl = AbrController(cfg)
    ctl.update(Report(0.0, 0.8, 0.0, 0.03))  # 64 -> 12 kbit/s
    for t in range(1, 11):  # 10 s at 12 kbit/s: the floor (rtt_window_s) is 140 ms now
        ctl.update(Report(float(t), 0.0, 0.0, 0.14))
    assert ctl.ceiling is not None and ctl.ptime_ms == 120
    low = ctl.wire
    d = ctl.update(Report(10.5, 0.0, 0.0, 0.03))  # 12 -> 64 kbit/s
    assert ctl.ceiling is None and d.reason == "up: clean link" and ctl.wire == low * 1.5
    # Far under, but by less than 30 ms: noise on a fast link, not a change of link.
    ctl = AbrController(cfg)
    ctl.update(Report(0.0, 0.8, 0.0, 0.03))
    for t in range(1, 11):
        ctl.update(Report(float(t), 0.0, 0.0, 0.04))
    ctl.update(Report(10.5, 0.0, 0.0, 0.02))
    assert ctl.ceiling is not None


def test_tap_feedback_gives_each_report_its_own_rtt() -> None:
    """Every receiver report as it arrives, with the RTT of the SR it answers (RFC 3550
    §6.4.1), once: a report about an SR already answered (newer ones lost in a full queue)
    has none, where aiortc's getStats() would repeat a smoothed old value. NACKs too."""
    from aiortc.rtp import (
        RTCP_RTPFB_NACK,
        RtcpReceiverInfo,
        RtcpRrPacket,
        RtcpRtpfbPacket,
        RtcpSenderInfo,
        RtcpSrPacket,
    )

    from sonic_voice.kvs.net_hooks import tap_feedback

    class Sender:  # the two methods tap_feedback wraps, as RTCRtpSender has them
        _ssrc = 1234

        def __init__(self) -> None:
            self.sent: list = []
            self.handled: list = []

        async def _send_rtcp(self, packets: list) -> None:
            self.sent += packets

        async def _handle_rtcp_packet(self, packet) -> None:
            self.handled.append(packet)

    async def run() -> list:
        s = Sender()
        got: list = []
        tap_feedback(s, got.append)  # type: ignore[arg-type]
        ntp = 0x1234_5678_9ABC_0000
        await s._send_rtcp([RtcpSrPacket(ssrc=1234, sender_info=RtcpSenderInfo(ntp, 0, 0, 0))])
        await asyncio.sleep(0.15)
        lsr = (ntp >> 16) & 0xFFFFFFFF
        dlsr = int(0.05 * 65536)  # the viewer held the SR 50 ms before reporting

        def rr(lost: int) -> RtcpRrPacket:
            info = RtcpReceiverInfo(1234, lost, 3, 100, 480, lsr, dlsr)
            other = RtcpReceiverInfo(999, 0, 0, 0, 0, 0, 0)  # about another stream
            return RtcpRrPacket(ssrc=5, reports=[other, info])

        await s._handle_rtcp_packet(rr(64))
        await s._handle_rtcp_packet(rr(128))  # the same SR again
        nack = RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=5, media_ssrc=1234)
        nack.lost = [7, 8]
        await s._handle_rtcp_packet(nack)
        assert len(s.sent) == 1 and len(s.handled) == 3  # aiortc still gets everything
        return got

    got = asyncio.run(run())
    assert [f.kind for f in got] == ["rr", "rr", "nack"]
    assert 0.09 <= got[0].rtt_s <= 0.2, got[0]  # 0.15 s since the SR - 0.05 s held
    assert got[0].fraction_lost == 0.25 and got[0].jitter_s == 0.01 and got[0].highest_seq == 100
    assert got[1].rtt_s is None and got[1].fraction_lost == 0.5
    assert got[2].lost == (7, 8)


def test_the_viewers_maxptime_bounds_the_packets() -> None:
    """A viewer that says ``a=maxptime:60`` never gets longer packets, however thin the
    link; none said: RFC 7587's 120 ms. Only the audio section counts."""
    from sonic_voice.kvs.opus_send import max_ptime_ms

    offer = "v=0\r\nm=video 9 UDP 96\r\na=maxptime:20\r\nm=audio 9 UDP 111\r\na=maxptime:60\r\n"
    assert max_ptime_ms(offer) == 60
    assert max_ptime_ms("v=0\r\nm=audio 9 UDP 111\r\na=rtpmap:111 opus/48000/2\r\n") == 120
    assert max_ptime_ms("m=audio 9 UDP 111\r\na=maxptime:abc\r\n") == 120
    ctl = AbrController(AbrConfig())
    ctl.limit_ptime(max_ptime_ms(offer))
    d = ctl.update(Report(1.0, 0.8, 0.0, 0.05))
    assert d.ptime_ms == 60 and ctl.cfg.ptimes_ms == (20, 40, 60)


@pytest.mark.timeout(120)
async def test_chromium_plays_the_long_packets_of_a_thin_link() -> None:
    """The adaptive sender's 120 ms packets of 6 kbit/s Opus (what a 12 kbit/s link gets)
    play in Chromium as the robot's speech: the page's capture matches what the robot said
    piece by piece (measured: median chunk NCC 0.85; 0.91 for 20 ms at 32 kbit/s), no
    packet lost. Chromium's offer names no maxptime, so 120 ms (RFC 7587's default) is
    allowed."""
    import base64

    from sonic_voice.kvs.opus_send import max_ptime_ms

    from test import test_web_viewer as page

    wav = await page._speech_wav()
    async with page.robot_and_page(fake_mic=wav, capture=True, abr=True) as (kvs, master, browser):
        emu = kvs.emulator
        offer = kvs.sync(lambda: emu.routed("SDP_OFFER"))[-1]
        assert max_ptime_ms(page._payload(offer)["sdp"]) == 120
        peer = master.peers["v1"]
        assert peer.abr.cfg.ptimes_ms[-1] == 120
        peer.out.set_target(6000, 10, 120)
        says = speech_like(3.0, 24000, seed=11, level=0.3)
        before = await browser.evaluate("kvsViewer.takeCapture().samples")
        sent_before, t0 = peer.out.sent_frames, time.monotonic()
        master.play(says)
        await browser.wait_for(
            f"kvsViewer.takeCapture().samples > {before} + 5 * 48000", 30, interval=0.5
        )
        assert peer.out.ptime_ms == 120
        rate = (peer.out.sent_frames - sent_before) / (time.monotonic() - t0)
        assert 7 <= rate <= 10, rate  # 8.3 packets a second, not 50
        cap = await browser.evaluate("kvsViewer.takeCapture()")
        played = np.frombuffer(base64.b64decode(cap["pcm16"]), "<i2")
        played24 = page._resample(played, cap["rate"], 24000)
        chunks = page._chunk_matches(says, played24, 24000, 0.3 * page._rms(says))
        nccs = np.array([ncc for _, _, ncc in chunks])
        assert len(chunks) >= 8 and np.median(nccs) >= 0.7, page._summary(chunks)
        stats = await browser.evaluate("kvsViewer.stats()")
        assert stats["inbound"]["packetsLost"] == 0, stats


@pytest.mark.timeout(120)
async def test_chromium_sends_transport_cc_about_the_robots_audio() -> None:
    """With abr on, the robot's answer accepts Chromium's transport-wide sequence numbers
    on audio and asks for transport-cc feedback: Chromium then reports every packet of the
    robot's speech about every 100 ms, and the adaptive sender's controller hears it (the
    fast way down; a receiver report about audio comes only every ~5 s from a browser)."""
    from sonic_voice.kvs import twcc

    from test import test_web_viewer as page

    wav = await page._speech_wav()
    async with page.robot_and_page(fake_mic=wav, capture=True, abr=True) as (_, master, _b):
        peer = master.peers["v1"]
        answer = peer.pc.localDescription.sdp.split("m=audio", 1)[1]
        assert twcc.URI in answer.split("m=", 1)[0]
        master.play(speech_like(3.0, 24000, seed=11, level=0.3))
        await asyncio.sleep(3.0)  # ~30 messages at Chromium's 100 ms
        assert peer.abr.twcc_seen >= 20, peer.abr.twcc_seen
        assert peer.abr.twcc_lost == 0
        # a clean loopback link: no transport-cc cut
        assert not any("(twcc)" in h[3] for h in peer.abr.history), peer.abr.history


def test_one_rtt_from_a_full_queue_is_no_floor_to_be_faster_than() -> None:
    """With sender reports every ~5 s (net_hooks.thin_sender_reports) the RTT window may
    hold a single RTT, taken while the fall's queue was full: the next calm RTT is far
    under it, but the link did not grow (bench/abr.py went x1.5 at 12 kbit/s on it)."""
    cfg = AbrConfig(probe_after_s=100)
    ctl = AbrController(cfg)
    ctl.update(Report(0.0, 0.8, 0.0, None))  # 64 -> 12 kbit/s (its SR was skipped)
    ctl.update(Report(1.0, 0.0, 0.0, 0.30))  # the one RTT of the fall's full queue
    for t in range(2, 7):
        ctl.update(Report(float(t), 0.0, 0.0, None))  # clean reports, no RTT of their own
    assert ctl.ceiling is not None
    d = ctl.update(Report(7.0, 0.0, 0.0, 0.11))
    assert ctl.ceiling is not None and d.reason != "up: clean link", d
