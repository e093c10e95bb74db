"""The pure audio layer: framing, streaming resampling, the playback buffer."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import soxr

from sonic_voice.audio import FrameChunker, PlaybackBuffer, StreamResampler, samples_per_block
from sonic_voice.audio.pcm import apply_gain, as_pcm16, float_to_pcm16, pcm16_to_float

from test.harness.signals import best_alignment, speech_like


def odd_sizes(total: int, seed: int = 3) -> list[int]:
    rng = np.random.default_rng(seed)
    sizes, n = [], 0
    while n < total:
        s = int(rng.integers(1, 997))
        sizes.append(min(s, total - n))
        n += s
    return sizes


def split(x: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    out, i = [], 0
    for s in sizes:
        out.append(x[i : i + s])
        i += s
    return out


def test_block_sizes() -> None:
    assert samples_per_block(16000, 32) == 512
    assert samples_per_block(24000, 20) == 480
    assert samples_per_block(48000, 20) == 960
    with pytest.raises(ValueError):
        samples_per_block(16000, 0)


def test_pcm_conversions_round_trip_and_clip() -> None:
    x = speech_like(0.2, 16000)
    assert np.array_equal(float_to_pcm16(pcm16_to_float(x)), x)
    assert float_to_pcm16(np.array([2.0, -2.0])).tolist() == [32767, -32768]
    assert apply_gain(np.array([20000, -20000], dtype=np.int16), 2.0).tolist() == [32767, -32768]
    assert as_pcm16(b"\x01\x00\xff\xff").tolist() == [1, -1]
    with pytest.raises(ValueError, match="odd byte count"):
        as_pcm16(b"\x01")


def test_chunker_reframes_without_loss() -> None:
    x = np.arange(10_000, dtype=np.int16)
    ch = FrameChunker(512)
    blocks = [b for part in split(x, odd_sizes(len(x))) for b in ch.push(part)]
    assert all(len(b) == 512 for b in blocks)
    assert len(blocks) == len(x) // 512
    assert np.array_equal(np.concatenate(blocks), x[: len(blocks) * 512])
    assert ch.pending == len(x) % 512


@pytest.mark.parametrize(("rin", "rout"), [(48000, 16000), (44100, 16000), (24000, 48000)])
def test_streaming_resampler_matches_one_shot(rin: int, rout: int) -> None:
    x = speech_like(2.0, rin)
    rs = StreamResampler(rin, rout)
    parts = [rs.process(c) for c in split(x, odd_sizes(len(x)))]
    parts.append(rs.process(np.zeros(0, dtype=np.int16), last=True))
    y = np.concatenate(parts)
    ref = soxr.resample(x, rin, rout, quality="HQ")
    # Same length (no sample lost or duplicated at chunk boundaries), same signal.
    assert abs(len(y) - len(ref)) <= 1
    n = min(len(y), len(ref))
    err = np.abs(y[:n].astype(int) - ref[:n].astype(int))
    assert err.max() <= 2, err.max()
    # And it is really the source, at the new rate.
    back = soxr.resample(y, rout, rin)
    _, ncc = best_alignment(x[rin // 10 : -rin // 10], back)
    assert ncc > 0.99


def test_resampler_passthrough_is_identity() -> None:
    x = speech_like(0.1, 16000)
    assert StreamResampler(16000, 16000).process(x) is x


def test_playback_buffer_is_gap_free_for_any_chunking() -> None:
    x = speech_like(1.0, 24000, level=0.5) | 1  # no exact zeros in the source
    buf = PlaybackBuffer(24000)
    for c in split(x, odd_sizes(len(x))):
        buf.write(c)
    assert buf.queued_samples == len(x)
    assert buf.queued_seconds == pytest.approx(1.0)
    out = []
    block = np.empty(233, dtype=np.int16)  # 24000 % 233 != 0: the last block is partial
    while buf.queued_samples:
        got = buf.read_into(block)
        out.append(block[:got].copy())
    y = np.concatenate(out)
    assert np.array_equal(y, x)  # bit-exact, nothing inserted, nothing dropped
    assert buf.underruns == 1  # only the very last, partial block ran dry
    # Underrun beyond the data: silence, reported as 0 samples taken.
    assert buf.read_into(block) == 0 and not block.any()


def test_playback_buffer_counts_running_dry_at_a_block_boundary_not_a_flush() -> None:
    """A feed that is late exactly at a block boundary is an underrun too (the silence it
    causes must be accounted for); idle before any audio and a flush are not."""
    buf = PlaybackBuffer(16000)
    block = np.empty(160, dtype=np.int16)
    assert buf.read_into(block) == 0 and buf.underruns == 0  # idle: nothing was playing
    buf.write(np.ones(320, dtype=np.int16))
    assert buf.read_into(block) == 160 and buf.read_into(block) == 160
    assert buf.read_into(block) == 0 and buf.underruns == 1  # ran dry at the boundary
    assert buf.read_into(block) == 0 and buf.underruns == 1  # still dry: one underrun
    buf.write(np.ones(480, dtype=np.int16))
    assert buf.read_into(block) == 160
    buf.flush()
    assert buf.read_into(block) == 0 and buf.underruns == 1  # a flush is silence on purpose


def test_playback_flush_drops_everything_at_once() -> None:
    buf = PlaybackBuffer(24000)
    buf.write(np.ones(24000, dtype=np.int16))
    gen = buf.generation
    assert buf.flush() == 24000
    assert buf.queued_samples == 0 and buf.generation == gen + 1
    block = np.full(480, 7, dtype=np.int16)
    assert buf.read_into(block) == 0 and not block.any()
    buf.write(np.full(10, 5, dtype=np.int16))  # new audio after a flush plays
    assert buf.read_into(block) == 10 and block[:10].tolist() == [5] * 10


def test_playback_buffer_bounded() -> None:
    buf = PlaybackBuffer(1000, max_seconds=1.0)
    buf.write(np.ones(900, dtype=np.int16))
    buf.write(np.ones(200, dtype=np.int16))
    assert buf.queued_samples == 900 and buf.dropped_samples == 200


def test_playback_buffer_concurrent_writer_and_reader() -> None:
    x = (np.arange(200_000) % 30000 + 1).astype(np.int16)
    buf = PlaybackBuffer(24000, max_seconds=100)
    out: list[np.ndarray] = []

    def reader() -> None:
        block = np.empty(256, dtype=np.int16)
        got_total = 0
        while got_total < len(x):
            got = buf.read_into(block)
            out.append(block[:got].copy())
            got_total += got

    t = threading.Thread(target=reader)
    t.start()
    for c in split(x, odd_sizes(len(x), seed=9)):
        buf.write(c)
    t.join(10)
    assert np.array_equal(np.concatenate(out), x)
