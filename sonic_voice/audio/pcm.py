"""PCM16 little-endian mono helpers.

Every audio topic and every Nova Sonic audio event carries raw PCM16LE mono; these
helpers convert and re-frame it without copying more than needed.
"""

from __future__ import annotations

import numpy as np

PCM16 = np.dtype("<i2")


def samples_per_block(rate: int, block_ms: float) -> int:
    """Samples in one block of ``block_ms`` at ``rate`` (32 ms at 16 kHz -> 512)."""
    n = round(rate * block_ms / 1000.0)
    if n <= 0:
        raise ValueError(f"block of {block_ms} ms at {rate} Hz holds no samples")
    return n


def as_pcm16(data: bytes | bytearray | memoryview | np.ndarray) -> np.ndarray:
    """View bytes (or an int16 array) as little-endian int16 samples, without copying."""
    if isinstance(data, np.ndarray):
        if data.dtype != np.int16:
            raise TypeError(f"expected int16 samples, got {data.dtype}")
        return data
    if len(data) % 2:
        raise ValueError(f"PCM16 data has an odd byte count ({len(data)})")
    return np.frombuffer(data, dtype=PCM16)


def pcm16_to_float(data: bytes | np.ndarray) -> np.ndarray:
    """PCM16 -> float32 in [-1, 1)."""
    return as_pcm16(data).astype(np.float32) / 32768.0


def float_to_pcm16(x: np.ndarray) -> np.ndarray:
    """float in [-1, 1] -> int16, clipped (never wrapped)."""
    return np.clip(np.rint(np.asarray(x, dtype=np.float32) * 32768.0), -32768, 32767).astype(
        np.int16
    )


def apply_gain(samples: np.ndarray, gain: float) -> np.ndarray:
    """Scale int16 samples by ``gain`` with saturation; gain 1.0 returns the input as is."""
    if gain == 1.0:
        return samples
    out = samples.astype(np.float32) * gain
    return np.clip(out, -32768, 32767).astype(np.int16)


class FrameChunker:
    """Re-frames a stream of int16 chunks of any size into blocks of exactly ``block`` samples.

    Keeps the remainder between calls, so no sample is dropped or repeated.
    """

    def __init__(self, block: int) -> None:
        if block <= 0:
            raise ValueError("block must be positive")
        self.block = block
        self._pending = np.zeros(0, dtype=np.int16)

    @property
    def pending(self) -> int:
        """Samples held back, waiting for the rest of their block."""
        return len(self._pending)

    def push(self, samples: np.ndarray) -> list[np.ndarray]:
        """Add samples; return every complete block now available (possibly none)."""
        if len(self._pending):
            samples = np.concatenate((self._pending, samples))
        n = len(samples) // self.block
        blocks = [samples[i * self.block : (i + 1) * self.block] for i in range(n)]
        self._pending = samples[n * self.block :].copy()
        return blocks

    def reset(self) -> None:
        self._pending = np.zeros(0, dtype=np.int16)
