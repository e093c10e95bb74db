"""Transport-cc is negotiated only by the peers that use it (sonic_voice/kvs/peer.py,
net_hooks.decline_transport_cc): ``enable_transport_cc`` is process-wide, so once a peer
with adaptive bitrate has enabled it, a later peer without it must still answer without
the extension (else its viewer numbers its packets and waits for feedback no one sends).
A peer that accepts it feeds back about the viewer's audio."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from sonic_voice.kvs import twcc
from sonic_voice.kvs.net_hooks import enable_transport_cc, tap_transport_cc
from sonic_voice.kvs.opus_send import OpusFecTrack, OpusSendConfig
from sonic_voice.kvs.peer import ViewerPeer
from sonic_voice.kvs.settings import KvsSettings

pytestmark = pytest.mark.timeout(60)


def _audio_extmaps(sdp: str) -> list[str]:
    audio = sdp.split("m=audio", 1)[1].split("m=", 1)[0]
    return [line for line in audio.splitlines() if line.startswith("a=extmap:")]


async def _answer(abr: bool) -> str:
    viewer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    viewer.addTransceiver("audio", direction="sendrecv")
    await viewer.setLocalDescription(await viewer.createOffer())
    offer = viewer.localDescription.sdp
    assert any(twcc.URI in x for x in _audio_extmaps(offer))  # the viewer offers it
    peer = ViewerPeer(
        "v-abr" if abr else "v-plain",
        KvsSettings(channel_name="robot", abr=abr),
        RTCConfiguration(iceServers=[]),
        on_audio=lambda *_: None,
        on_inbound=lambda *_: None,
        on_state=lambda *_: None,
    )
    try:
        return await peer.answer({"type": "offer", "sdp": offer}, list)
    finally:
        for t in list(peer.tasks):
            t.cancel()
        peer.out.stop()
        await peer.pc.close()
        await viewer.close()


async def test_only_the_adaptive_peer_accepts_transport_cc() -> None:
    enable_transport_cc()  # as an adaptive peer earlier in this process did
    with_abr, without = await _answer(abr=True), await _answer(abr=False)
    assert any(twcc.URI in x for x in _audio_extmaps(with_abr)), _audio_extmaps(with_abr)
    plain = _audio_extmaps(without)
    assert not any(twcc.URI in x for x in plain), plain
    # the other extensions are untouched (aiortc's audio defaults: mid and audio level)
    assert {x.split()[1] for x in plain} == {
        x.split()[1] for x in _audio_extmaps(with_abr) if twcc.URI not in x
    }


async def test_the_adaptive_peer_feeds_back_about_the_viewers_audio() -> None:
    """A viewer numbering its audio (as Chromium does once the answer accepts the
    extension) gets transport-cc feedback from the robot about every packet."""
    enable_transport_cc()
    viewer = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    voice = OpusFecTrack(OpusSendConfig(bitrate=24000))
    voice.push(np.full(48000 * 4, 800, np.int16))
    viewer.addTrack(voice)
    summaries: list = []
    history = tap_transport_cc(viewer.getSenders()[0], summaries.append)
    await viewer.setLocalDescription(await viewer.createOffer())
    peer = ViewerPeer(
        "v-abr",
        KvsSettings(channel_name="robot", abr=True),
        RTCConfiguration(iceServers=[]),
        on_audio=lambda *_: None,
        on_inbound=lambda *_: None,
        on_state=lambda *_: None,
    )
    try:
        answer = await peer.answer({"type": "offer", "sdp": viewer.localDescription.sdp}, list)
        await viewer.setRemoteDescription(RTCSessionDescription(answer, "answer"))
        for _ in range(100):
            if sum(s.packets for s in summaries) >= 50:
                break
            await asyncio.sleep(0.05)
        reported = sum(s.packets for s in summaries)
        assert reported >= 50, (reported, history.next_seq)  # 1 s of 20 ms packets
        assert sum(s.lost for s in summaries) == 0
    finally:
        await peer.close("test over")
        voice.stop()
        await viewer.close()


def test_a_nack_still_parses_as_a_nack_with_transport_cc_on() -> None:
    """enable_transport_cc replaces aiortc's RTPFB parser (aiortc read FMT 15 as a NACK);
    a real NACK (FMT 1) must still come out as one, with its lost sequence numbers."""
    from aiortc.rtp import RTCP_RTPFB_NACK, RtcpPacket, RtcpRtpfbPacket

    enable_transport_cc()
    nack = RtcpRtpfbPacket(fmt=RTCP_RTPFB_NACK, ssrc=1, media_ssrc=2, lost=[100, 101, 105])
    (parsed,) = RtcpPacket.parse(bytes(nack))
    assert isinstance(parsed, RtcpRtpfbPacket) and parsed.fmt == RTCP_RTPFB_NACK
    assert parsed.lost == [100, 101, 105] and parsed.media_ssrc == 2
