"""The signal checks the audio tests rely on: they follow a legitimate drift and still
catch corruption (a check that cannot fail, or that fails on a correct recording, is a
defect of the suite)."""

from __future__ import annotations

import numpy as np

from test.harness.signals import best_alignment, chunk_correlations, speech_like

R = 16000


def _shifted(speech: np.ndarray, at_s: float, frames: int) -> np.ndarray:
    """``speech`` as an adaptive jitter buffer may deliver it: 100 ms late, then
    ``frames`` whole 20 ms frames of silence inserted at ``at_s`` (its depth grew)."""
    i = int(at_s * R)
    hole = np.zeros(frames * R // 50, np.int16)
    return np.concatenate([np.zeros(R // 10, np.int16), speech[:i], hole, speech[i:]])


def test_pieces_follow_frames_a_jitter_buffer_inserts() -> None:
    """7 frames (140 ms) inserted one second in, more than the 100 ms search window: every
    piece is still found (a fixed search window scored the later pieces 0.04, 0.00, 0.22:
    the test_kvs_node flake)."""
    speech = speech_like(2.0, R, seed=21)
    got = _shifted(speech, 1.0, 7)
    pieces = chunk_correlations(speech, got, 4000, 1600, ahead=8000)
    assert len(pieces) == 7  # one 250 ms piece of speech_like(seed=21) is silent
    assert np.median(pieces) >= 0.9 and np.mean(pieces >= 0.8) >= 0.75, np.round(pieces, 2)


def test_pieces_still_catch_corruption() -> None:
    """Reordered 250 ms blocks and a lost second: many pieces fail."""
    speech = speech_like(2.0, R, seed=21)
    blocks = speech[: 8 * 4000].reshape(8, 4000)
    reordered = np.concatenate(blocks[[1, 0, 3, 2, 5, 4, 7, 6]])
    pieces = chunk_correlations(speech, reordered, 4000, 1600, ahead=8000)
    assert np.mean(pieces >= 0.8) < 0.75, np.round(pieces, 2)
    lost = np.concatenate([speech[: R // 2], np.zeros(R, np.int16), speech[3 * R // 2 :]])
    pieces = chunk_correlations(speech, lost, 4000, 1600, ahead=8000)
    assert np.mean(pieces >= 0.8) < 0.75, np.round(pieces, 2)


def test_best_alignment_finds_the_lag() -> None:
    speech = speech_like(1.0, R, seed=5)
    got = np.concatenate([np.zeros(1234, np.int16), speech, np.zeros(100, np.int16)])
    lag, ncc = best_alignment(speech, got)
    assert lag == 1234 and ncc > 0.999
