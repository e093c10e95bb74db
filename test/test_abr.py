"""Adaptive bitrate: the pure controller (sonic_voice/kvs/abr.py), the encoder it drives
(OpusFecTrack(adaptive=True).set_target) and the aiortc/aioice hook points it relies on."""

from __future__ import annotations

import asyncio

import av
import numpy as np
import pytest

from sonic_voice.kvs.abr import AbrConfig, AbrController, Report
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


def test_drops_in_one_report_to_what_the_link_carries() -> None:
    ctl = AbrController(AbrConfig(min_bps=6000, max_bps=32000, start_bps=32000))
    feed(ctl, 0, 5, 0.0)
    assert ctl.bitrate == 32000
    d = ctl.update(Report(5.0, 0.6, 0.0, 0.05))  # 32 kbit/s into a 12 kbit/s link
    assert d.changed and d.reason.startswith("down")
    assert 9000 <= d.bitrate <= 11000, d  # 32000 * 0.4 * 0.8 = 10240
    assert d.packet_loss_pct > 5  # FEC provisioned for the loss seen


def test_rtt_rise_alone_backs_off_and_floor_holds() -> None:
    ctl = AbrController(AbrConfig(min_bps=8000, max_bps=32000, start_bps=32000))
    feed(ctl, 0, 3, 0.0, rtt=0.04)
    d = ctl.update(Report(3.0, 0.0, 0.0, 0.20))  # a queue building, nothing lost yet
    assert d.changed and d.bitrate < 32000
    for i in range(20):
        ctl.update(Report(4.0 + i, 0.5, 0.0, 0.3))
    assert ctl.bitrate == 8000  # never below min_bps


def test_up_only_after_hold_with_hysteresis() -> None:
    cfg = AbrConfig(min_bps=6000, max_bps=32000, start_bps=32000, hold_up_s=2.0)
    ctl = AbrController(cfg)
    ctl.update(Report(0.0, 0.6, 0.0, 0.05))  # the link carried 32000 * 0.4 = 12800
    low = ctl.bitrate
    assert low == 10240 and ctl.ceiling == 12800
    # Clean, but not for long enough; then a loss between the thresholds resets the clock.
    assert [ctl.update(Report(t, 0.0, 0.0, 0.05)).bitrate for t in (1.0, 2.0)] == [low, low]
    assert ctl.update(Report(3.0, 0.02, 0.0, 0.05)).bitrate == low
    rates = {t: ctl.update(Report(float(t), 0.0, 0.0, 0.05)).bitrate for t in range(4, 18)}
    assert rates[4] == rates[5] == low
    assert rates[6] == 12160  # after 2 s clean: straight to 95 % of the ceiling, no further
    assert all(rates[t] == 12160 for t in range(7, 11))
    assert rates[11] == int(12160 * 1.15)  # one small probe past it after 5 s
    assert rates[12] > rates[11] and ctl.ceiling is None  # it stayed clean: grow fast again
    assert list(rates.values()) == sorted(rates.values()) and rates[17] == 32000


def test_a_thin_link_costs_little_in_steady_state() -> None:
    """A simulated 12 kbit/s link (what does not fit is lost; a rate over it raises the RTT
    as its queue fills) for 60 s of once-a-second reports: after the first cut, under 2 %
    of what is sent is lost to the probes, and the rate stays close to the link."""
    ctl = AbrController(AbrConfig(min_bps=6000, max_bps=32000, start_bps=32000))
    link, sent, lost, rates = 12000.0, 0.0, 0.0, []
    for t in range(60):
        rate = ctl.bitrate
        loss = max(0.0, 1 - link / rate)
        rtt = 0.05 + (0.15 if rate > link else 0.0)
        if t >= 3:
            sent += rate
            lost += rate * loss
            rates.append(rate)
        ctl.update(Report(float(t), loss, 0.0, rtt))
    assert lost / sent < 0.02, f"{100 * lost / sent:.1f} % lost in steady state"
    assert 0.75 * link <= np.mean(rates) <= link, np.mean(rates)


def test_remb_caps_and_bad_bounds_are_refused() -> None:
    ctl = AbrController(AbrConfig())
    d = ctl.update(Report(0.0, 0.0, 0.0, 0.05, remb_bps=20000))
    assert d.bitrate == 18000 and d.changed
    with pytest.raises(ValueError, match="min_bps <= start_bps"):
        AbrConfig(min_bps=40000, start_bps=32000)


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
    track.stop()
    fixed = OpusFecTrack(OpusSendConfig())
    with pytest.raises(RuntimeError, match="adaptive=True"):
        fixed.set_target(8000, 10)
    fixed.stop()
    await asyncio.sleep(0)


def test_net_hook_points_exist() -> None:
    """Fails loudly when an aiortc/aioice upgrade moves what net_hooks.py reaches into."""
    check_hook_points()
