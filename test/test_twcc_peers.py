"""Transport-cc between two real aiortc peers on loopback (sonic_voice/kvs/net_hooks.py):
the header extension negotiated for audio, every packet numbered, the receiver's feedback
every 100 ms (every 250 ms when it rides a thin link of its own) parsed by the sender and
matched to what it sent; through a 24 kbit/s bottleneck (test/harness/netimpair.py) the
sender reads the link's rate from it; while that feedback comes the adaptive sender's own
RTCP sender reports go out every ~5 s instead of every ~1 s."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sonic_voice.kvs import twcc
from sonic_voice.kvs.net_hooks import (
    TransportCcFeedback,
    enable_transport_cc,
    feedback_interval_s,
    tap_transport_cc,
)
from sonic_voice.kvs.opus_send import OpusFecTrack, OpusSendConfig, munge_sdp

from test.harness.netimpair import Impairment, UdpImpairRelay, connect_through
from test.harness.signals import speech_like

pytestmark = pytest.mark.timeout(90)


async def _call(
    relay: UdpImpairRelay,
    seconds: float,
    send_bps: float | None = None,
    abr: bool = False,
    report_interval_s: float | None = 5.0,
) -> dict[str, Any]:
    """A call through ``relay`` with transport-cc negotiated and the viewer feeding back
    (every 100 ms, or by ``send_bps``). The sender's feedback summaries are collected, or
    with ``abr`` the adaptive sender runs on them as kvs/peer.py runs it (``run_abr``, our
    sender reports thinned to ``report_interval_s``). ``srs``: sender reports the viewer
    received."""
    from aiortc.rtp import RtcpSrPacket

    from sonic_voice.kvs.abr import AbrController
    from sonic_voice.kvs.opus_send import run_abr

    enable_transport_cc()
    track = OpusFecTrack(OpusSendConfig(bitrate=32000, adaptive=abr))
    track.push(speech_like(seconds + 2, 48000, seed=4))
    got: dict[str, Any] = {"summaries": [], "srs": 0}
    tasks: list[asyncio.Future] = []

    async def pull(t: Any) -> None:
        while True:
            await t.recv()

    def on_track(pc: Any, t: Any) -> None:
        rx = next(tr.receiver for tr in pc.getTransceivers() if tr.receiver.track is t)
        rate = None if send_bps is None else (lambda: send_bps)
        got["feedback"] = TransportCcFeedback(rx, send_bps=rate)
        handle = rx._handle_rtcp_packet

        async def count(packet: Any) -> None:
            got["srs"] += isinstance(packet, RtcpSrPacket)
            await handle(packet)

        rx._handle_rtcp_packet = count
        tasks.append(asyncio.ensure_future(pull(t)))

    pc_a, pc_b = await connect_through(
        relay, track, on_track, munge=lambda s: munge_sdp(s, transport_cc=True)
    )
    try:
        sender = pc_a.getSenders()[0]
        if abr:
            run = run_abr(
                track, sender, AbrController(), transport_cc=True,
                report_interval_s=report_interval_s,
            )  # fmt: skip
            tasks.append(asyncio.ensure_future(run))
        else:
            got["hist"] = tap_transport_cc(sender, got["summaries"].append)
        got["sdp"] = (pc_a.localDescription.sdp, pc_b.localDescription.sdp)
        await asyncio.sleep(seconds)
    finally:
        got["feedback"].stop()
        for task in tasks:
            task.cancel()
        track.stop()
        await pc_a.close()
        await pc_b.close()
        relay.close()
    return got


async def test_feedback_flows_and_accounts_for_every_packet() -> None:
    got = await _call(UdpImpairRelay(Impairment()), 3.0)
    for sdp in got["sdp"]:  # offered by A, accepted by B
        assert f"a=extmap:5 {twcc.URI}" in sdp.split("m=audio", 1)[1]
    summaries = got["summaries"]
    assert got["feedback"].sent >= 20  # every 100 ms for 3 s, from the first packet on
    assert len(summaries) >= 20
    reported = sum(s.packets for s in summaries)
    numbered = got["hist"].next_seq
    # 50 packets a second; all reported but those sent in the last ~100 ms
    assert reported >= 120 and numbered - reported <= 10, (reported, numbered)
    assert sum(s.lost for s in summaries) == 0
    assert max(s.queue_s for s in summaries) < 0.05  # loopback: no queue


async def test_the_sender_reads_a_bottlenecks_rate() -> None:
    """58 kbit/s on the wire (32 kbit/s Opus in 20 ms packets) into a 24 kbit/s link."""
    relay = UdpImpairRelay(Impairment(rate_kbps=24, warmup_packets=0))
    got = await _call(relay, 3.0)
    late = [s for s in got["summaries"][10:] if s.link_bps is not None]
    assert len(late) >= 10
    for s in late:
        assert 0.85 * 24_000 < s.link_bps < 1.1 * 24_000, s
    assert max(s.queue_s for s in late) > 0.1
    assert sum(s.lost for s in got["summaries"]) > 20  # tail-dropped, and seen to be


def test_feedback_interval_follows_libwebrtcs_rule() -> None:
    """5 % of what the feedback's sender sends, between 50 and 250 ms."""
    assert feedback_interval_s(12_000) == 0.25
    assert feedback_interval_s(0) == 0.25
    assert feedback_interval_s(58_600) == pytest.approx(68 * 8 / (0.05 * 58_600))
    assert feedback_interval_s(1_000_000) == 0.05


async def test_feedback_on_a_thin_link_of_ours_comes_every_250_ms() -> None:
    got = await _call(UdpImpairRelay(Impairment()), 3.0, send_bps=12_000)
    # ~12 in 3 s (every 250 ms from the first packet), not ~30
    assert 8 <= got["feedback"].sent <= 13, got["feedback"].sent
    assert got["feedback"].interval_s == 0.25
    reported = sum(s.packets for s in got["summaries"])
    assert got["hist"].next_seq - reported <= 15  # still every packet, in fewer messages


async def test_sender_reports_thin_out_to_one_in_5_s_while_feedback_comes() -> None:
    """aiortc's report every 0.5-1.5 s is 79 ms of a 12 kbit/s link (net_hooks)."""
    thinned = (await _call(UdpImpairRelay(Impairment()), 7.0, abr=True))["srs"]
    stock = (await _call(UdpImpairRelay(Impairment()), 7.0, abr=True, report_interval_s=None))[
        "srs"
    ]
    assert stock >= 5, stock  # 7 s at 0.5-1.5 s each
    assert 1 <= thinned <= 3, thinned  # the first, then one every 2.5-7.5 s
