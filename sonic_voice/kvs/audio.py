"""Audio between aiortc and the robot.

- ``PacedAudioTrack``: robot output (PCM16 chunks of any size at ``in_rate``) -> 20 ms 48 kHz
  frames, paced in real time (aiortc's RTCRtpSender does not pace; it sends as fast as
  ``recv()`` returns). Chunks are re-framed gap-free: silence is produced only when nothing
  is queued, and ``flush()`` drops everything queued at once (barge-in).
- ``consume_remote``: one viewer's received track (aiortc decodes Opus to 48 kHz stereo s16)
  -> mono at ``rate`` in fixed blocks, with per-viewer resampler state.

One PacedAudioTrack per peer: a track object shared by several senders would have its frames
split between them.
"""

from __future__ import annotations

import asyncio
import contextlib
import fractions
import logging
import time
from collections.abc import Callable

import av
import numpy as np
from aiortc.mediastreams import MediaStreamError, MediaStreamTrack

from sonic_voice.audio.pcm import FrameChunker, samples_per_block
from sonic_voice.audio.resample import StreamResampler

log = logging.getLogger(__name__)

RTC_RATE = 48000
FRAME_MS = 20
FRAME_SAMPLES = RTC_RATE * FRAME_MS // 1000  # 960
_FRAME_BYTES = FRAME_SAMPLES * 2
# A sender this late (event loop stalled) restarts its clock instead of bursting to catch up.
_RESYNC_S = 0.2


class PacedAudioTrack(MediaStreamTrack):
    """Mono s16 48 kHz frames of 20 ms, one every 20 ms, from what ``push()`` queued."""

    kind = "audio"

    def __init__(self, in_rate: int = 24000, hold_ms: float = 40.0) -> None:
        super().__init__()
        # A partly queued frame waits this long after the last push for the rest of it
        # (see OpusFecTrack.hold_ms): no holes inside speech from small or late chunks.
        self.hold_s = hold_ms / 1000
        self._last_push = float("-inf")
        self._pushed: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.in_rate = in_rate
        self._resampler = StreamResampler(in_rate, RTC_RATE)
        self._held = 0  # input samples inside the resampler, not yet out
        self._buf = bytearray()
        self._start: float | None = None
        self._sent = 0  # frames returned
        self.audio_frames = 0  # frames that carried queued audio (not pure silence)
        self.pushed_samples = 0  # at in_rate
        self.on_frame: Callable[[float, np.ndarray], None] | None = None  # probes (bench)

    @property
    def queued_seconds(self) -> float:
        return len(self._buf) / 2 / RTC_RATE + self._held / self.in_rate

    def push(self, samples: np.ndarray) -> None:
        """Queue int16 mono samples at ``in_rate`` (any length)."""
        if self.readyState != "live" or not len(samples):
            return
        out = self._resampler.process(samples)
        self.pushed_samples += len(samples)
        self._held += len(samples) - round(len(out) * self.in_rate / RTC_RATE)
        self._held = max(self._held, 0)
        self._buf += out.astype("<i2", copy=False).tobytes()
        self._last_push = time.monotonic()
        loop, event = self._loop, self._pushed
        if loop is not None and event is not None and not loop.is_closed():
            try:
                same = asyncio.get_running_loop() is loop
            except RuntimeError:
                same = False
            if same:
                event.set()
            else:
                loop.call_soon_threadsafe(event.set)

    def flush(self) -> int:
        """Drop everything queued (barge-in); returns the samples dropped (at 48 kHz)."""
        dropped = len(self._buf) // 2
        self._buf.clear()
        self._last_push = float("-inf")
        self._resampler.reset()
        self._held = 0
        return dropped

    def _short_wait(self) -> float:
        """Seconds to wait for the rest of a partly queued frame (0: send now)."""
        if len(self._buf) >= _FRAME_BYTES or not (self._buf or self._held):
            return 0.0
        return max(0.0, self._last_push + self.hold_s - time.monotonic())

    def _drain(self) -> None:
        """End of queued audio: let the resampler give up the samples it holds back."""
        if self._held:
            tail = self._resampler.process(np.zeros(0, np.int16), last=True)
            self._buf += tail.astype("<i2", copy=False).tobytes()
            self._resampler.reset()
            self._held = 0

    async def recv(self) -> av.AudioFrame:
        if self.readyState != "live":
            raise MediaStreamError
        now = time.monotonic()
        if self._start is None:
            self._start = now
        else:
            due = self._start + self._sent * FRAME_MS / 1000
            if due > now:
                await asyncio.sleep(due - now)
            elif now - due > _RESYNC_S:
                self._start = now - self._sent * FRAME_MS / 1000
        if self._pushed is None:
            self._loop = asyncio.get_running_loop()
            self._pushed = asyncio.Event()
        while (wait := self._short_wait()) > 0:
            self._pushed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._pushed.wait(), wait)
        if self.readyState != "live":
            raise MediaStreamError
        if len(self._buf) < _FRAME_BYTES:
            self._drain()
        if self._buf:
            chunk = bytes(self._buf[:_FRAME_BYTES])
            del self._buf[:_FRAME_BYTES]
            if len(chunk) < _FRAME_BYTES:  # the very end of what was queued
                chunk += bytes(_FRAME_BYTES - len(chunk))
            self.audio_frames += 1
        else:
            chunk = bytes(_FRAME_BYTES)
        frame = av.AudioFrame(format="s16", layout="mono", samples=FRAME_SAMPLES)
        frame.planes[0].update(chunk)
        frame.sample_rate = RTC_RATE
        frame.pts = self._sent * FRAME_SAMPLES
        frame.time_base = fractions.Fraction(1, RTC_RATE)
        self._sent += 1
        if self.on_frame is not None:
            self.on_frame(time.monotonic(), np.frombuffer(chunk, "<i2"))
        return frame


def frame_to_mono(frame: av.AudioFrame) -> np.ndarray:
    """Any decoded audio frame -> int16 mono (channels averaged)."""
    arr = frame.to_ndarray()
    channels = len(frame.layout.channels)
    if frame.format.is_planar:
        data = arr.reshape(channels, -1)
        mono = data.mean(axis=0) if channels > 1 else data[0]
    else:
        data = arr.reshape(-1, channels)
        mono = data.mean(axis=1) if channels > 1 else data[:, 0]
    if np.issubdtype(mono.dtype, np.floating) and frame.format.name.startswith(("flt", "dbl")):
        mono = mono * 32768.0
    return np.clip(np.rint(mono), -32768, 32767).astype(np.int16)


# soxr quality of the viewer -> audio/remote resampler. A streaming resampler holds back
# about its filter's length: 48 -> 16 kHz is 21 ms with "HQ", 15 ms with "MQ" (measured),
# with the same passband for speech (flat to 7 kHz, -0.5 dB at 7.5 kHz) and 16-bit
# precision, which is what int16 carries anyway. Every ms here is added to every word.
# Fed 20 ms at a time, "MQ" holds back 21 ms on average (7-34 ms, it gives out in bursts;
# "HQ" 23 ms): the resilient receiver therefore decodes straight at 16 kHz (libopus) and
# this runs only for aiortc's path or a rate libopus does not decode at.
REMOTE_QUALITY = "MQ"


class RemoteBlocker:
    """One viewer's received audio (mono int16 at any rate, any chunk size) -> mono int16
    blocks of exactly ``block_ms`` at ``rate`` for ``deliver``; resampler state per viewer.

    Fed by :func:`consume_remote` (aiortc's decoded frames) or by the resilient receiver
    (:func:`sonic_voice.kvs.jitter.install_receiver`), which decodes at ``rate`` itself
    when libopus can (``in_rate == rate``: no resampler runs, only the chunker). ``in_rate``
    is the rate of what ``push`` gets when it names none.
    """

    def __init__(
        self,
        deliver: Callable[[np.ndarray], None],
        rate: int = 16000,
        block_ms: float = 32.0,
        in_rate: int = RTC_RATE,
    ) -> None:
        self.deliver = deliver
        self.rate = rate
        self.in_rate = in_rate
        self.blocks = 0
        self._chunker = FrameChunker(samples_per_block(rate, block_ms))
        self._resampler: StreamResampler | None = None

    def push(self, mono: np.ndarray, in_rate: int | None = None) -> None:
        in_rate = in_rate or self.in_rate
        if self._resampler is None or self._resampler.in_rate != in_rate:
            self._resampler = StreamResampler(in_rate, self.rate, quality=REMOTE_QUALITY)
        for block in self._chunker.push(self._resampler.process(mono)):
            self.deliver(block)
            self.blocks += 1


async def consume_remote(
    track: MediaStreamTrack,
    deliver: Callable[[np.ndarray], None],
    rate: int = 16000,
    block_ms: float = 32.0,
) -> int:
    """Read ``track`` until it ends; ``deliver`` gets mono int16 blocks at ``rate``.

    The one consumer of this track (aiortc queues decoded frames without bound when nobody
    reads). Returns the number of blocks delivered. This is aiortc's stock receive path
    (``KvsSettings.resilient_receive=False``).
    """
    blocker = RemoteBlocker(deliver, rate, block_ms)
    while True:
        try:
            frame = await track.recv()
        except MediaStreamError:
            return blocker.blocks
        blocker.push(frame_to_mono(frame), frame.sample_rate)
