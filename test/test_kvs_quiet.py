"""OpusFecTrack with ``pause_in_silence``: between utterances it sends nothing (no encode,
no packet) after a few silent frames, and the next utterance's packets carry an RTP
clock that jumped over the pause; without the option it keeps sending silence."""

from __future__ import annotations

import asyncio
import time

import numpy as np
import pytest

from sonic_voice.kvs.opus_send import FRAME, OpusFecTrack, OpusSendConfig

from test.harness.signals import speech_like

pytestmark = pytest.mark.timeout(60)


class Puller:
    """recv() as aiortc's sender calls it: one call at a time, never cancelled (a
    cancelled recv() would lose the frame it took)."""

    def __init__(self, track: OpusFecTrack) -> None:
        self.track = track
        self.pending: asyncio.Future | None = None
        self.times: list[float] = []  # when each packet came out

    async def within(self, seconds: float) -> list:
        out = []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if self.pending is None:
                self.pending = asyncio.ensure_future(self.track.recv())
            done, _ = await asyncio.wait({self.pending}, timeout=left)
            if not done:
                break
            out.append(self.pending.result())
            self.times.append(time.monotonic())
            self.pending = None
        return out


async def test_nothing_is_sent_between_utterances_and_the_clock_jumps() -> None:
    track = OpusFecTrack(OpusSendConfig(pause_in_silence=True, pause_after=3))
    pull = Puller(track)
    track.push(speech_like(0.2, 48000, seed=3))
    first = await pull.within(0.6)
    # 10 frames of speech, then 3 silent ones (the last word's FEC rides on the first):
    # nothing after that.
    assert len(first) == 10 + 3, len(first)
    assert await pull.within(0.4) == []
    track.push(speech_like(0.1, 48000, seed=4))
    second = await pull.within(0.3)
    assert 1 + 5 <= len(second) <= 1 + 5 + 3, len(second)  # a silent frame leads
    # The RTP clock moved on by the pause, as the packets' send times did (to a frame).
    jump = (int(second[0].pts) - int(first[-1].pts)) / 48000
    gap = pull.times[len(first)] - pull.times[len(first) - 1]
    assert jump >= 0.4 and abs(jump - gap) <= 0.045, (jump, gap)
    assert track.paused_frames >= 20  # >= 0.4 s of 20 ms slots never sent
    pts = [int(p.pts) for p in second]
    assert pts[1] - pts[0] == FRAME // 2  # 10 ms of silence lead (pause_preroll_ms)
    assert np.all(np.diff(pts[1:]) == FRAME)  # within an utterance: one frame per packet
    track.stop()


async def test_an_utterance_after_a_pause_leads_with_silence() -> None:
    """Chromium's NetEq fades the first packet it decodes after a concealed pause in over
    that packet (bench/first_word.py: the first 10 ms at a median 0.59 of their level
    without this). The track sends 10 ms of silence, dated just before the utterance,
    with its first frame, so the fade falls on the silence."""
    import opuslib

    track = OpusFecTrack(OpusSendConfig(pause_in_silence=True, pause_after=3))
    pull = Puller(track)
    track.push(speech_like(0.2, 48000, seed=3))
    first = await pull.within(0.5)
    assert len(first) == 10 + 3, len(first)
    assert await pull.within(0.3) == []
    track.push(speech_like(0.1, 48000, seed=4, level=0.3))
    second = await pull.within(0.25)
    dec = opuslib.Decoder(48000, 1)
    pcm = [np.frombuffer(dec.decode(bytes(p), FRAME), "<i2") for p in second[:2]]
    assert [len(x) for x in pcm] == [FRAME // 2, FRAME]  # 10 ms, then the first 20 ms
    peak = [int(np.abs(x.astype(np.int32)).max()) for x in pcm]
    assert peak[0] <= 2 and peak[1] > 2000, peak  # silence, then the speech
    assert int(second[1].pts) - int(second[0].pts) == FRAME // 2  # dated just before it
    assert int(second[0].pts) >= int(first[-1].pts) + FRAME  # after everything sent
    # Both out of one wake-up: the speech does not wait for a slot behind the silence
    # (what the browser then hears, when, is bench/first_word.py's).
    assert pull.times[len(first) + 1] - pull.times[len(first)] < 0.02
    track.stop()
    off = OpusFecTrack(OpusSendConfig(pause_in_silence=True, pause_preroll_ms=0))
    pull = Puller(off)
    off.push(speech_like(0.1, 48000, seed=3))
    await pull.within(0.3)
    off.push(speech_like(0.1, 48000, seed=4, level=0.3))
    lead = (await pull.within(0.05))[0]
    assert len(opuslib.Decoder(48000, 1).decode(bytes(lead), FRAME)) == 2 * FRAME  # speech
    off.stop()
    with pytest.raises(ValueError, match="pause_preroll_ms"):
        OpusSendConfig(pause_preroll_ms=15)


async def test_default_keeps_sending_silence() -> None:
    track = OpusFecTrack(OpusSendConfig())
    track.push(speech_like(0.1, 48000, seed=3))
    got = await Puller(track).within(0.5)
    assert len(got) >= 20  # 0.5 s of 20 ms packets (speech, then silence)
    assert track.paused_frames == 0
    track.stop()


async def test_stop_ends_a_paused_recv() -> None:
    track = OpusFecTrack(OpusSendConfig(pause_in_silence=True, pause_after=0))
    pending = asyncio.ensure_future(track.recv())
    await asyncio.sleep(0.1)
    assert not pending.done()  # paused: nothing queued
    track.stop()
    from aiortc.mediastreams import MediaStreamError

    with pytest.raises(MediaStreamError):
        await asyncio.wait_for(pending, 1.0)


@pytest.mark.timeout(120)
async def test_chromium_plays_both_utterances_around_a_pause() -> None:
    """With ``opus_pause_in_silence`` the robot sends Chromium nothing between two
    utterances; Chromium takes the pause as DTX: both utterances play as the robot said
    them (the page's capture matches piece by piece), no packet counted lost."""
    import base64

    from test import test_web_viewer as page

    wav = await page._speech_wav()
    pause = {"opus_pause_in_silence": True}
    async with page.robot_and_page(fake_mic=wav, capture=True, **pause) as (_, master, browser):
        peer = master.peers["v1"]
        await asyncio.sleep(1.0)  # nothing said yet: nothing sent
        idle_sent = peer.out.sent_frames
        first = speech_like(1.5, 24000, seed=11, level=0.3)
        second = speech_like(1.5, 24000, seed=12, level=0.3)
        before = await browser.evaluate("kvsViewer.takeCapture().samples")
        master.play(first)
        await asyncio.sleep(1.5 + 2.0)  # the utterance, then a 2 s pause
        # (a pause's slots are counted when it ends)
        paused = peer.out.paused_frames
        master.play(second)
        await browser.wait_for(
            f"kvsViewer.takeCapture().samples > {before} + 6 * 48000", 30, interval=0.5
        )
        assert idle_sent <= 10, idle_sent  # a few frames before the first pause
        paused = peer.out.paused_frames - paused
        assert paused >= 90, paused  # >= 1.8 s of the 2 s pause not sent
        cap = await browser.evaluate("kvsViewer.takeCapture()")
        played = np.frombuffer(base64.b64decode(cap["pcm16"]), "<i2")
        played24 = page._resample(played, cap["rate"], 24000)
        for says in (first, second):
            chunks = page._chunk_matches(says, played24, 24000, 0.3 * page._rms(says))
            nccs = np.array([ncc for _, _, ncc in chunks])
            assert len(chunks) >= 4 and np.median(nccs) >= 0.8, page._summary(chunks)
        stats = await browser.evaluate("kvsViewer.stats()")
        assert stats["inbound"]["packetsLost"] == 0, stats
