"""kvs/audio.py without a WebRTC peer: the paced track's framing and counters, and the
viewer audio path (track -> 16 kHz blocks). bench/mutation.py found these covered only by
the slow real-peer tests (test_kvs_link), which it leaves out."""

from __future__ import annotations

import numpy as np
import pytest
from aiortc.mediastreams import MediaStreamError

from sonic_voice.kvs.audio import (
    FRAME_SAMPLES,
    RTC_RATE,
    PacedAudioTrack,
    RemoteBlocker,
    consume_remote,
    frame_to_mono,
)


def _tone(seconds: float, rate: int, freq: float = 440.0, level: int = 8000) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (level * np.sin(2 * np.pi * freq * t)).astype(np.int16)


async def test_paced_track_frames_what_was_pushed_and_counts_it() -> None:
    """Kills: the push guard inverted (nothing queued on a live track) and
    ``audio_frames`` not starting at 0."""
    track = PacedAudioTrack(in_rate=24000, hold_ms=0)
    assert track.audio_frames == 0 and track.queued_seconds == 0
    track.push(np.zeros(0, np.int16))  # nothing: still nothing queued
    assert track.queued_seconds == 0 and track.pushed_samples == 0
    track.push(_tone(0.1, 24000))  # 100 ms = 5 frames of 20 ms at 48 kHz
    assert track.pushed_samples == 2400
    assert track.queued_seconds == pytest.approx(0.1, abs=0.002)
    frames = [await track.recv() for _ in range(7)]
    assert all(f.sample_rate == RTC_RATE and f.samples == FRAME_SAMPLES for f in frames)
    assert [f.pts for f in frames] == [i * FRAME_SAMPLES for i in range(7)]
    loud = [int(np.abs(frame_to_mono(f)).max()) for f in frames]
    assert all(v > 4000 for v in loud[:4]), loud  # the tone (resampled to 48 kHz)...
    assert loud[5:] == [0, 0], loud  # ...then silence
    assert track.audio_frames == 5
    track.stop()
    track.push(_tone(0.1, 24000))  # ended: ignored
    assert track.pushed_samples == 2400
    with pytest.raises(MediaStreamError):
        await track.recv()


async def test_paced_track_flush_drops_the_queue() -> None:
    track = PacedAudioTrack(in_rate=24000, hold_ms=0)
    track.push(_tone(0.5, 24000))
    dropped = track.flush()
    assert dropped > 0.4 * RTC_RATE and track.queued_seconds == 0
    frame = await track.recv()
    assert not frame_to_mono(frame).any()  # silence right after the flush
    assert track.audio_frames == 0


class _Track:
    """A received track as aiortc hands it over: decoded frames, then the end."""

    def __init__(self, frames: list) -> None:
        self.frames = list(frames)

    async def recv(self):
        if not self.frames:
            raise MediaStreamError
        return self.frames.pop(0)


async def test_viewer_audio_becomes_32_ms_blocks_at_16_khz() -> None:
    """Kills: the default block (32 ms = 512 samples at 16 kHz) changed."""
    source = PacedAudioTrack(in_rate=48000, hold_ms=0)
    source.push(_tone(0.5, 48000, freq=300))
    frames = [await source.recv() for _ in range(30)]  # 0.6 s of 48 kHz frames
    blocks: list[np.ndarray] = []
    n = await consume_remote(_Track(frames), blocks.append)
    assert n == len(blocks) > 0
    assert {len(b) for b in blocks} == {512}
    assert all(b.dtype == np.int16 for b in blocks)
    got = np.concatenate(blocks)
    assert len(got) == pytest.approx(0.6 * 16000, abs=600)  # held back: < 1 block + filter
    assert np.abs(got[1000:6000]).max() > 6000  # the tone made it through


def test_remote_blocker_block_size_and_rate_change() -> None:
    out: list[np.ndarray] = []
    b = RemoteBlocker(out.append, rate=16000, block_ms=20.0)
    b.push(_tone(0.2, 48000))
    b.push(_tone(0.2, 16000), in_rate=16000)  # a new source rate: a new resampler
    assert {len(x) for x in out} == {320} and b.blocks == len(out)
    assert sum(len(x) for x in out) == pytest.approx(0.4 * 16000, abs=700)


def test_remote_blocker_defaults_to_32_ms_at_16_khz() -> None:
    """Kills: RemoteBlocker's default block (32 ms, the audio/remote block) changed."""
    out: list[np.ndarray] = []
    b = RemoteBlocker(out.append)
    b.push(_tone(0.3, 48000))
    assert out and {len(x) for x in out} == {512}
