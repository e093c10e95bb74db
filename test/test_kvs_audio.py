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


def test_remote_blocker_at_the_decode_rate_runs_no_resampler() -> None:
    """The resilient receiver decodes at 16 kHz itself (kvs/peer.py): the blocker then
    only cuts blocks, bit-exact and with nothing held back, where the 48 kHz input still
    goes through soxr (which holds back ~21 ms on average in 20 ms chunks)."""
    from sonic_voice.kvs.audio import RemoteBlocker

    src = speech_like(0.512, 16000, seed=5)  # 16 blocks exactly
    out: list[np.ndarray] = []
    b = RemoteBlocker(out.append, rate=16000, block_ms=32.0, in_rate=16000)
    for i in range(0, len(src), 320):  # 20 ms frames, as the receiver plays them
        b.push(src[i : i + 320])
    assert b._resampler is not None and b._resampler._stream is None  # passthrough
    assert {len(x) for x in out} == {512} and len(out) == 16
    assert np.array_equal(np.concatenate(out), src[: len(out) * 512])

    src48 = speech_like(0.512, 48000, seed=5)
    out48: list[np.ndarray] = []
    b48 = RemoteBlocker(out48.append, rate=16000, block_ms=32.0)
    for i in range(0, len(src48), 960):
        b48.push(src48[i : i + 960])
    assert b48._resampler is not None and b48._resampler._stream is not None
    assert len(out48) < len(out)  # the filter holds the last block back
