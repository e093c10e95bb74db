"""The playback buffer between a bursty producer (Nova Sonic speaks faster than real time)
and a device callback that wants exactly N samples every few milliseconds.

- gap-free: a callback takes its samples across chunk boundaries, so chunks of any size
  play back to back; silence is only ever produced when nothing is queued (an underrun),
  never inserted into or between chunks that are there;
- ``flush()`` drops everything queued at once (barge-in);
- ``queued_samples`` / ``queued_seconds`` say how much is waiting.

Thread-safe: producers write from any thread, the device callback reads from PortAudio's.
The callback path takes a lock for a few microseconds and never allocates more than the
output block.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import numpy as np

from sonic_voice.audio.pcm import apply_gain, as_pcm16
from sonic_voice.audio.resample import StreamResampler


class PlaybackBuffer:
    def __init__(self, rate: int, max_seconds: float = 120.0) -> None:
        self.rate = rate
        self.max_samples = int(rate * max_seconds)
        self._chunks: deque[np.ndarray] = deque()
        self._head_offset = 0
        self._queued = 0
        self._lock = threading.Lock()
        self._generation = 0
        self.underruns = 0  # times the queue ran dry while playing (the producer was late)
        self._playing = False
        self.dropped_samples = 0
        self.played_samples = 0

    @property
    def queued_samples(self) -> int:
        return self._queued

    @property
    def queued_seconds(self) -> float:
        return self._queued / self.rate

    @property
    def generation(self) -> int:
        """Incremented by every flush, so a writer can tell its audio was discarded."""
        return self._generation

    def write(self, samples: np.ndarray) -> None:
        """Queue int16 samples (the array is kept, not copied: do not reuse it)."""
        if not len(samples):
            return
        with self._lock:
            if self._queued + len(samples) > self.max_samples:
                # A producer far ahead of real time: refuse the overflow rather than grow
                # without bound. Counted, so it shows in diagnostics.
                self.dropped_samples += len(samples)
                return
            self._chunks.append(samples)
            self._queued += len(samples)

    def flush(self) -> int:
        """Drop everything queued; returns the number of samples dropped."""
        with self._lock:
            dropped = self._queued
            self._chunks.clear()
            self._head_offset = 0
            self._queued = 0
            self._generation += 1
            self._playing = False  # silence on purpose, not an underrun
        return dropped

    def read_into(self, out: np.ndarray) -> int:
        """Fill ``out`` (int16, 1-D) from the queue; zero-fill the rest on underrun.

        Returns how many samples came from the queue.
        """
        need = len(out)
        filled = 0
        with self._lock:
            while filled < need and self._chunks:
                head = self._chunks[0]
                avail = len(head) - self._head_offset
                take = min(avail, need - filled)
                out[filled : filled + take] = head[self._head_offset : self._head_offset + take]
                filled += take
                self._head_offset += take
                if self._head_offset == len(head):
                    self._chunks.popleft()
                    self._head_offset = 0
            self._queued -= filled
            self.played_samples += filled
            if filled < need and not self._chunks and (filled or self._playing):
                # ran dry while playing (mid-block, or right after a full block): the
                # producer fell behind real time, or the utterance ended
                self.underruns += 1
            self._playing = filled == need
        if filled < need:
            out[filled:] = 0
        return filled


class SpeakerQueue:
    """The producer side both speaker backends share (devices.PlaybackStream on PortAudio,
    pulse.PulsePlayback on libpulse): PCM16 at ``settings.rate`` in chunks of any size from
    any thread, converted to the device's rate, ``settings.gain`` applied, queued in
    ``buffer`` for the device's callback."""

    settings: Any  # StreamSettings: rate, gain (read at every write: it may change live)

    def _open_queue(self, device_rate: int) -> None:
        self.buffer = PlaybackBuffer(device_rate)
        self._resampler = StreamResampler(self.settings.rate, device_rate)
        self._write_lock = threading.Lock()

    def write(self, pcm: bytes | np.ndarray) -> None:
        """Queue PCM16 at ``settings.rate`` (any chunk size, any thread)."""
        samples = as_pcm16(pcm)
        with self._write_lock:
            samples = self._resampler.process(samples)
            samples = apply_gain(samples, self.settings.gain)
            self.buffer.write(samples)

    def _drop_queued(self) -> int:
        """Empty the queue (and the resampler's tail); returns the samples dropped."""
        with self._write_lock:
            self._resampler.reset()
            return self.buffer.flush()
