"""The rate controller with transport-cc feedback (AbrController.update_twcc) against a
bottleneck simulated in virtual time (test/harness/abr_sim.py: bench/abr.py's wire model,
64 -> 12 -> 64 kbit/s), in milliseconds: the feedback every 100 ms gets it under the fallen
link in a few hundred ms, where receiver reports alone take a second or more."""

from __future__ import annotations

from itertools import pairwise

import pytest

from sonic_voice.kvs.abr import AbrConfig, AbrController
from sonic_voice.kvs.twcc import TwccSummary

from test.harness.abr_sim import simulate

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_transport_cc_gets_under_a_fallen_link_in_a_few_hundred_ms(seed: int) -> None:
    rr, _ = simulate(twcc_feedback=False, seed=seed)
    tw, abr = simulate(twcc_feedback=True, seed=seed)
    assert tw[1].follow_s is not None and tw[1].follow_s < 0.5, tw[1]
    assert rr[1].follow_s is not None and rr[1].follow_s > 1.0, rr[1]
    assert tw[1].lost_pct <= 2.0, tw[1].lost_pct
    assert rr[1].lost_pct > 2 * tw[1].lost_pct, (rr[1].lost_pct, tw[1].lost_pct)
    assert any("(twcc)" in h[3] for h in abr.history)
    # And back up when the link returns: the up rules, checked at every message.
    assert tw[2].follow_s is not None and tw[2].follow_s < 4.0, tw[2]
    assert tw[0].lost_pct == tw[2].lost_pct == 0.0


def test_a_link_that_keeps_up_is_never_cut() -> None:
    results, abr = simulate(steps=(64.0, 64.0), phase_s=10.0, twcc_feedback=True)
    assert [h for h in abr.history if h[3].startswith("down")] == []
    assert abr.bitrate == 32000 and abr.ptime_ms == 20
    assert all(r.lost == 0 for r in results)


def _summary(
    at: float, queue_s: float, link_bps: float | None = None, lost: int = 0
) -> TwccSummary:
    return TwccSummary(at, 5, lost, queue_s, link_bps, 3 if link_bps else 0)


def test_cut_goes_to_the_links_rate_and_waits_while_the_queue_drains() -> None:
    abr = AbrController(AbrConfig())
    start = abr.wire
    assert not abr.update_twcc(_summary(1.0, 0.004)).changed  # a calm link
    d = abr.update_twcc(_summary(1.1, 0.150, link_bps=20_000))
    assert d.changed and "to the link's 20000 bit/s (twcc)" in d.reason
    assert d.wire_bps == int(20_000 * abr.cfg.backoff) < start
    # The queue still high but no longer growing: what was sent before the cut drains.
    assert abr.update_twcc(_summary(1.2, 0.150, link_bps=20_000)).reason == "hold"
    # Still growing 100 ms later: the cut was not enough, cut again.
    d = abr.update_twcc(_summary(1.3, 0.190, link_bps=9_000))
    assert d.reason.startswith("down") and d.wire_bps <= int(abr.min_wire) + 1


def test_without_a_rate_the_cut_goes_by_the_loss_or_a_fixed_share() -> None:
    abr = AbrController(AbrConfig())
    w = abr.wire
    d = abr.update_twcc(_summary(1.0, 0.0, lost=2))  # 2 of 5 lost, no queue reading
    assert "lost 40%" in d.reason
    assert d.wire_bps == int(w * 0.6 * abr.cfg.backoff)
    abr = AbrController(AbrConfig())
    d = abr.update_twcc(_summary(1.0, 0.2))
    assert f"x{abr.cfg.twcc_cut}" in d.reason and d.wire_bps == int(abr.max_wire * abr.cfg.twcc_cut)


def test_clean_messages_step_up_after_the_hold_and_no_faster_than_allowed() -> None:
    cfg = AbrConfig()
    abr = AbrController(cfg)
    abr.update_twcc(_summary(1.0, 0.150, link_bps=20_000))  # cut
    low = abr.wire
    ups = []
    t = 1.0
    while t < 1.0 + cfg.hold_up_s + 1.05:
        t = round(t + 0.1, 3)
        d = abr.update_twcc(_summary(t, 0.0))
        if d.reason.startswith("up"):
            ups.append((t, d.reason))
    assert ups, "clean transport-cc feedback never stepped up"
    assert ups[0][0] >= 1.0 + cfg.hold_up_s  # not before the hold
    assert all(b - a >= cfg.twcc_up_every_s - 1e-9 for (a, _), (b, _) in pairwise(ups))
    assert all(r.endswith("(twcc)") for _, r in ups) and abr.wire > low
    # A message with a loss is not clean: no step, and the clean time starts again.
    before = abr.wire
    abr.update_twcc(TwccSummary(t + 0.1, 5, 1, 0.0, None, 0))
    assert abr.wire <= before


def test_long_packets_are_cut_before_their_queue_overflows() -> None:
    """At the floor of a 12 kbit/s link (120 ms packets) a probe fills the 200 ms queue
    slowly; the queue readings must cut it well before it overflows. With a whole
    packet's duration (120 ms) of slack the cut came only past a 170 ms reading, and
    bench/abr.py lost a 120 ms packet (6 frames) to a probe most runs."""
    abr = AbrController(AbrConfig())
    abr.update_twcc(_summary(1.0, 0.200, link_bps=12_000))  # the fall: to the floor
    assert abr.ptime_ms == 120
    t = 1.0
    for q in (0.0, 0.0, 0.0):  # calm: a sender report's 64 ms is no congestion either
        t += 0.1
        assert abr.update_twcc(_summary(t, q)).reason == "hold"
    assert abr.update_twcc(_summary(t + 0.1, 0.064)).reason == "hold"
    d = abr.update_twcc(_summary(t + 0.2, 0.110))  # a probe's queue, growing
    assert d.reason.startswith("down: queue"), d.reason


def test_with_the_receiver_frames_lost_are_the_links_and_few_more() -> None:
    """abr_sim with real Opus into the real jitter buffer (receiver=True), 64 -> 12 -> 64
    kbit/s of 8 s each: what the link dropped at the fall is lost, and the receiver adds
    little to it (a late packet waited for, not concealed and thrown away), on either
    step (the depth a spike left sheds by playing faster, not by dropping frames);
    latency is the path's plus the buffer's, far under the 200 ms queue + 400 ms."""
    res, _ = simulate(phase_s=8.0, seed=1, receiver=True)
    assert res[0].rx_lost == 0 and res[0].frames > 350
    assert res[1].lost > 0  # the fall costs what the queue dropped before the cut
    assert res[1].rx_lost <= res[1].lost + 6, (res[1].lost, res[1].rx_lost)
    assert res[2].rx_lost <= 6, res[2].rx_lost
    assert 100 < res[1].rx_p95_ms() < 400, res[1].rx_p95_ms()


def _at_the_floor() -> tuple[AbrController, float]:
    """A controller on a fast link (one-way delay 29 ms), cut to its floor (120 ms packets)
    by a fall to ~10 kbit/s, then 2 s of clean feedback at the thin link's delay (112 ms):
    the fast link's delays, before the cut, are no floor for the thin one."""
    abr = AbrController(AbrConfig())
    for k in range(5):
        abr.update_twcc(TwccSummary(0.5 + 0.1 * k, 5, 0, 0.0, None, 0, 0.029))
    abr.update_twcc(TwccSummary(1.0, 5, 0, 0.150, 10_000, 3, 0.300))
    assert abr.ptime_ms == 120 and abr.ceiling is not None
    t = 1.0
    for _ in range(20):
        t += 0.1
        abr.update_twcc(TwccSummary(t, 1, 0, 0.0, None, 0, 0.112))
    return abr, t


def test_a_one_way_delay_far_under_its_floor_means_the_link_grew() -> None:
    """With sender reports every ~5 s RTTs are too few to show a faster path; transport-cc
    shows it: our 120 ms packet took 103 ms to cross 12 kbit/s, 19 ms at 64."""
    abr, t = _at_the_floor()
    low = abr.wire
    d = abr.update_twcc(TwccSummary(t + 0.1, 1, 0, 0.0, None, 0, 0.029))
    assert abr.ceiling is None and d.reason == "up: clean link (twcc)", d
    assert abr.wire == pytest.approx(low * abr.cfg.up_factor)


def test_a_smaller_packet_of_ours_or_a_draining_queue_is_not_a_faster_link() -> None:
    # 40 ms under the floor: less than half our own packet's serialization (~55 ms).
    abr, t = _at_the_floor()
    d = abr.update_twcc(TwccSummary(t + 0.1, 1, 0, 0.0, None, 0, 0.072))
    assert abr.ceiling is not None and "clean link" not in d.reason, d
    # After a cut the floor is the one measured since: a queue draining 17 ms a packet.
    abr = AbrController(AbrConfig())
    abr.update_twcc(TwccSummary(1.0, 1, 0, 0.150, 10_000, 3, 0.300))
    for k in range(1, 12):
        d = abr.update_twcc(TwccSummary(1.0 + 0.1 * k, 1, 0, 0.0, None, 0, 0.300 - 0.017 * k))
        assert abr.ceiling is not None and "clean link" not in d.reason, (k, d)
