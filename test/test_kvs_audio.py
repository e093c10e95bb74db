"""Robot speech to a viewer through ``PacedAudioTrack`` (the ``opus_fec=False`` path)."""

from __future__ import annotations

import numpy as np

from sonic_voice.kvs.audio import PacedAudioTrack

from test.harness.signals import speech_like


async def _take(track: PacedAudioTrack, samples: int) -> np.ndarray:
    out: list[np.ndarray] = []
    while sum(len(x) for x in out) < samples:
        frame = await track.recv()
        out.append(frame.to_ndarray().reshape(-1).copy())
    return np.concatenate(out)[:samples]


async def test_flush_leaves_no_tail_of_the_old_answer() -> None:
    """Barge-in: after ``flush()`` the next answer starts exactly as it would on a fresh
    track. The 24 -> 48 kHz resampler holds back the end of what it was given; if flush
    kept that state, the interrupted answer's last milliseconds would play first
    (issue 16: the planted bug "flush() without resetting its resampler" went unseen)."""
    old = (np.random.default_rng(1).standard_normal(24000) * 9000).astype(np.int16)
    new = speech_like(0.3, 24000, seed=2)
    track = PacedAudioTrack(24000)
    track.push(old[:12345])  # an odd length: the resampler is mid-filter
    await _take(track, 960 * 2)
    assert track.queued_seconds > 0.2
    dropped = track.flush()
    assert dropped > 0 and track.queued_seconds == 0
    track.push(new)
    got = await _take(track, 48000 * 3 // 10)

    fresh = PacedAudioTrack(24000)
    fresh.push(new)
    want = await _take(fresh, 48000 * 3 // 10)
    assert np.abs(want.astype(np.int32)).max() > 3000  # the new answer is audible
    head = got[:480]  # the first 10 ms after the flush
    assert np.array_equal(got, want), (
        f"first 10 ms after flush differ from a fresh track by up to "
        f"{int(np.abs(head.astype(np.int32) - want[:480]).max())}"
    )
    track.stop()
    fresh.stop()
