"""Transport-cc between two real aiortc peers on loopback (sonic_voice/kvs/net_hooks.py):
the header extension negotiated for audio, every packet numbered, the receiver's feedback
every 100 ms parsed by the sender and matched to what it sent; through a 24 kbit/s
bottleneck (test/harness/netimpair.py) the sender reads the link's rate from it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from sonic_voice.kvs import twcc
from sonic_voice.kvs.net_hooks import TransportCcFeedback, enable_transport_cc, tap_transport_cc
from sonic_voice.kvs.opus_send import OpusFecTrack, OpusSendConfig, munge_sdp

from test.harness.netimpair import Impairment, UdpImpairRelay, connect_through
from test.harness.signals import speech_like

pytestmark = pytest.mark.timeout(90)


async def _call(relay: UdpImpairRelay, seconds: float) -> dict[str, Any]:
    enable_transport_cc()
    track = OpusFecTrack(OpusSendConfig(bitrate=32000))
    track.push(speech_like(seconds + 2, 48000, seed=4))
    got: dict[str, Any] = {"summaries": []}
    pulls: list[asyncio.Task] = []

    async def pull(t: Any) -> None:
        while True:
            await t.recv()

    def on_track(pc: Any, t: Any) -> None:
        rx = next(tr.receiver for tr in pc.getTransceivers() if tr.receiver.track is t)
        got["feedback"] = TransportCcFeedback(rx)
        pulls.append(asyncio.ensure_future(pull(t)))

    pc_a, pc_b = await connect_through(
        relay, track, on_track, munge=lambda s: munge_sdp(s, transport_cc=True)
    )
    try:
        got["hist"] = tap_transport_cc(pc_a.getSenders()[0], got["summaries"].append)
        got["sdp"] = (pc_a.localDescription.sdp, pc_b.localDescription.sdp)
        await asyncio.sleep(seconds)
    finally:
        got["feedback"].stop()
        for p in pulls:
            p.cancel()
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
