"""Audio helpers: the cases bench/mutation.py found untested.

Each test names the planted bug it kills (a surviving mutant of the benchmark): a
``FrameChunker.reset()`` that keeps the held-back samples, a resampler that accepts a zero rate,
and a multi-channel resampler that mishandles interleaved 1-D input.
"""

from __future__ import annotations

import numpy as np
import pytest

from sonic_voice.audio.pcm import FrameChunker
from sonic_voice.audio.resample import StreamResampler


def test_blocker_reset_drops_the_held_back_samples() -> None:
    """Kills: ``reset()`` that forgets to clear ``_pending`` (the next block would start
    with the tail of audio from before a flush)."""
    b = FrameChunker(4)
    first = b.push(np.arange(6, dtype=np.int16))
    assert [x.tolist() for x in first] == [[0, 1, 2, 3]]
    assert b.pending == 2
    b.reset()
    assert b.pending == 0
    blocks = b.push(np.full(4, 7, dtype=np.int16))
    assert len(blocks) == 1 and blocks[0].tolist() == [7, 7, 7, 7]


@pytest.mark.parametrize(("in_rate", "out_rate"), [(0, 16000), (16000, 0), (-8000, 16000)])
def test_resampler_rejects_a_rate_that_is_not_positive(in_rate: int, out_rate: int) -> None:
    """Kills: ``in_rate <= 0`` weakened to ``in_rate < 0`` (a zero rate would reach soxr)."""
    with pytest.raises(ValueError, match="rates must be positive"):
        StreamResampler(in_rate, out_rate)


def test_stereo_resampler_takes_interleaved_1d_input() -> None:
    """Kills: the reshape of interleaved 1-D input skipped for 2 channels (``channels > 1``
    changed to ``> 2``): left and right must stay apart, at the new rate."""
    rate_in, rate_out = 48000, 24000
    t = np.arange(rate_in // 2) / rate_in
    left = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    right = np.zeros_like(left)
    interleaved = np.stack([left, right], axis=1).reshape(-1)
    r = StreamResampler(rate_in, rate_out, channels=2)
    out = np.concatenate([r.process(interleaved[:9600]), r.process(interleaved[9600:], last=True)])
    assert out.ndim == 2 and out.shape[1] == 2
    assert abs(len(out) - len(left) // 2) <= 2
    assert np.abs(out[:, 1]).max() <= 1  # silence stays silence
    assert np.abs(out[100:-100, 0]).max() > 7000  # the tone stays in its channel


def test_same_rate_is_a_passthrough_and_reset_keeps_it() -> None:
    """Passthrough returns the very samples; reset() must not create a filter for it."""
    r = StreamResampler(16000, 16000)
    x = np.arange(10, dtype=np.int16)
    assert r.process(x) is x
    r.reset()
    assert r.process(x) is x
