"""Acoustic echo cancellation, noise suppression and high-pass for the robot's microphone.

The speaker sits next to the microphone: without AEC the robot hears its own answers and
barges in on itself. This wraps WebRTC's AudioProcessingModule (AEC3, NS, HPF) as shipped
in the ``livekit`` wheel (``livekit.rtc.AudioProcessingModule``): a maintained, prebuilt
binding of the same code browsers run, with wheels for Python 3.12 on x86_64/arm64 Linux,
and no compiler or network needed at run time. Alternatives looked at: the
``webrtc-audio-processing`` PyPI binding (last release 2019, needs SWIG and a build, old
AEC2) and ``speexdsp`` (2018, weaker AEC). No ROS and no asyncio in here.

Threading: :meth:`EchoCanceller.process_far` may be called from any thread (the speaker's
PortAudio callback); it only queues. :meth:`EchoCanceller.process_near` runs the module on
the caller's thread: it first hands every queued far-end block to the module, then the
microphone block, so both streams reach the APM in time order from one thread.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np

from sonic_voice.audio.pcm import FrameChunker, as_pcm16
from sonic_voice.audio.resample import StreamResampler

log = logging.getLogger(__name__)

APM_RATES = (8000, 16000, 32000, 48000)


class EchoCanceller:
    """WebRTC APM on a mono PCM16 stream at ``rate``.

    - ``process_far(pcm, rate)``: exactly what the speaker plays, when it plays it (any
      block size, any rate: resampled to ``rate`` here);
    - ``process_near(pcm) -> pcm``: the microphone block with the echo removed (same
      length out as in; the APM works in 10 ms frames, so up to 10 ms is held back
      internally and the output lags the input by that much).

    ``stream_delay_ms`` is the hint AEC3 starts from (device output + input latency); it
    then tracks the real delay itself.
    """

    def __init__(
        self,
        rate: int = 16000,
        *,
        echo_cancellation: bool = True,
        noise_suppression: bool = True,
        high_pass_filter: bool = True,
        auto_gain_control: bool = False,
        stream_delay_ms: int = 60,
        max_far_queue_s: float = 2.0,
    ) -> None:
        if rate not in APM_RATES:
            raise ValueError(f"EchoCanceller rate must be one of {APM_RATES}, not {rate}")
        from livekit.rtc import AudioFrame, AudioProcessingModule

        self.rate = rate
        self.frame = rate // 100
        self.echo_cancellation = echo_cancellation
        self.stream_delay_ms = int(stream_delay_ms)
        self._apm = AudioProcessingModule(
            echo_cancellation=echo_cancellation,
            noise_suppression=noise_suppression,
            high_pass_filter=high_pass_filter,
            auto_gain_control=auto_gain_control,
        )
        # One 10 ms buffer per direction, wrapped once in a livekit AudioFrame: a frame is
        # copied in, processed in place, copied out (no per-frame AudioFrame, bytearray or
        # bytes). The module keeps the stream delay it was given (AEC3 reads it at every
        # capture frame), so it is set once, and again only when it changes: each FFI call
        # costs ~35 us of protobuf and ctypes, and the APM runs 200 times a second. On
        # test_echo's synthetic echo, 8 runs each: ERLE 43.1-43.7 dB and person NCC
        # 0.960-0.963 with the delay set before every frame, the same once. The echo path
        # of one 16 kHz mic went from 4.1-4.4 % to 3.1-3.8 % of a core.
        self._AudioFrame = AudioFrame
        self._near = _Buffer(rate, AudioFrame)
        self._calls = _DirectApmCalls.make(self._apm)
        if self._calls is not None:
            self._calls.add(False, self._near)
        # The far end goes to the APM at the speaker's own rate when 10 ms of it is a whole
        # number of samples (24 kHz for Nova Sonic's voice): the APM converts its reference
        # itself (ERLE 66.8 dB on a synthetic echo, 24 kHz far end, 16 kHz mic), where a
        # soxr stream per speaker block cost the speaker's thread a resampler call and a
        # copy 50 times a second. Other rates are resampled to ``rate`` here, as before.
        self._far_bufs: dict[int, _Buffer] = {}
        self._delay_set: int | None = None
        self._far: deque[tuple[np.ndarray, int]] = deque()
        self._far_lock = threading.Lock()
        self._far_queued = 0.0  # seconds
        self._far_max = float(max_far_queue_s)
        self._far_resamplers: dict[int, StreamResampler] = {}
        self._near_chunker = FrameChunker(self.frame)
        # Output FIFO: processed 10 ms frames waiting to fill caller-sized blocks.
        self._out = np.zeros(0, dtype=np.int16)
        self._primed = False
        self.far_samples = 0
        self.near_samples = 0
        self.far_dropped = 0

    # -- far end (speaker) -------------------------------------------------------------
    def process_far(self, pcm: bytes | np.ndarray, rate: int | None = None) -> None:
        """Queue what the speaker just played (``pcm`` is copied: it may be the device's
        buffer). Thread-safe and cheap (no APM call here)."""
        rate = rate or self.rate
        samples = as_pcm16(pcm).reshape(-1)
        with self._far_lock:
            if rate % 100:  # 10 ms is not whole samples: to our rate
                rs = self._far_resamplers.get(rate)
                if rs is None:
                    rs = self._far_resamplers[rate] = StreamResampler(rate, self.rate)
                samples, rate = rs.process(samples), self.rate
            else:
                samples = np.array(samples, dtype=np.int16, copy=True)
            if not len(samples):
                return
            self._far.append((samples, rate))
            self._far_queued += len(samples) / rate
            # Nobody is processing the microphone: keep memory bounded.
            while self._far_queued > self._far_max:
                old, old_rate = self._far.popleft()
                self._far_queued -= len(old) / old_rate
                self.far_dropped += len(old)

    def _drain_far(self) -> None:
        with self._far_lock:
            blocks = list(self._far)
            self._far.clear()
            self._far_queued = 0.0
        for blk, rate in blocks:
            far = self._far_bufs.get(rate)
            if far is None:
                far = self._far_bufs[rate] = _Buffer(rate, self._AudioFrame)
                if self._calls is not None:
                    self._calls.add((True, rate), far)
            for frame in far.chunker.push(blk):
                far.view[:] = frame
                if self._calls is not None:
                    self._calls.process((True, rate))
                else:
                    self._apm.process_reverse_stream(far.frame)
                self.far_samples += self.frame  # counted at the canceller's rate

    # -- near end (microphone) ---------------------------------------------------------
    def process_near(self, pcm: bytes | np.ndarray) -> np.ndarray:
        """Microphone block in, cleaned block of the same length out (int16)."""
        samples = as_pcm16(pcm).reshape(-1)
        self._drain_far()
        frames = self._near_chunker.push(samples)
        if frames and self.echo_cancellation and self._delay_set != self.stream_delay_ms:
            self._apm.set_stream_delay_ms(self.stream_delay_ms)
            self._delay_set = self.stream_delay_ms
        if frames:
            self._out = np.concatenate((self._out, *(self._run(f) for f in frames)))
            self.near_samples += sum(len(f) for f in frames)
        if not self._primed:
            # Pad once with what the chunker holds back so every call returns len(in).
            self._out = np.concatenate(
                (np.zeros(self._near_chunker.pending, dtype=np.int16), self._out)
            )
            self._primed = True
        n = len(samples)
        if len(self._out) < n:  # cannot happen after priming; keep the contract anyway
            self._out = np.concatenate((np.zeros(n - len(self._out), np.int16), self._out))
        out, self._out = self._out[:n], self._out[n:]
        return out

    def _run(self, frame: np.ndarray) -> np.ndarray:
        """One 10 ms microphone frame through the APM (in place), a copy out."""
        near = self._near
        near.view[:] = frame
        if self._calls is not None:
            self._calls.process(False)
        else:
            self._apm.process_stream(near.frame)
        return near.view.astype(np.int16)

    def reset_far(self) -> None:
        """Forget queued far-end audio (e.g. the speaker stream was re-opened)."""
        with self._far_lock:
            self._far.clear()
            self._far_queued = 0.0


class _Buffer:
    """One fixed 10 ms buffer at ``rate`` for the APM, wrapped once in a livekit AudioFrame
    (the module processes it in place; its address never changes)."""

    def __init__(self, rate: int, audio_frame: Any) -> None:
        self.rate = rate
        n = rate // 100
        self.data = bytearray(2 * n)
        self.view = np.frombuffer(self.data, dtype="<i2")
        self.frame = audio_frame(self.data, rate, 1, n)
        self.chunker = FrameChunker(n)


class _DirectApmCalls:
    """``process_stream`` / ``process_reverse_stream`` on our fixed 10 ms buffers, with
    livekit's own FFI entry point and request, minus its per-call Python.

    livekit's ``AudioProcessingModule.process_stream`` builds and serializes a protobuf
    request, parses the protobuf response and wraps the response's handle in an
    ``FfiHandle`` (a weak set entry) to drop it: 92.7 us a call where the same native call
    with the request serialized once is 47.4 us (16 kHz, AEC3 + NS + HPF, 3000 calls;
    ~200 calls a second, so ~0.9 % of a core). Our requests never change (same module, same
    buffer address, size, rate), so each is serialized once; the response is compared with
    the one a success gave (an error is parsed and raised as livekit does). The same native
    library, the same calls in the same order: test_echo checks the output is bit for bit
    livekit's own path. Any livekit without these internals: None, and the public methods
    are used.
    """

    def __init__(self, apm: Any, lib: Any, proto: Any, address: Callable[[Any], int]) -> None:
        self._handle = apm._ffi_handle.handle
        self._request = lib.livekit_ffi_request
        self._drop = lib.livekit_ffi_drop_handle
        self._proto = proto
        self._address = address
        self._reqs: dict[Any, tuple[Any, int, bytes, bool]] = {}
        self._ok: dict[bool, bytes] = {}
        self._resp = ctypes.POINTER(ctypes.c_ubyte)()
        self._resp_len = ctypes.c_size_t()
        self._refs = (ctypes.byref(self._resp), ctypes.byref(self._resp_len))

    @classmethod
    def make(cls, apm: Any) -> _DirectApmCalls | None:
        try:
            from livekit.rtc._ffi_client import FfiClient
            from livekit.rtc._proto import ffi_pb2
            from livekit.rtc._utils import get_address

            return cls(apm, FfiClient.instance._ffi_lib, ffi_pb2, get_address)
        except Exception as e:  # noqa: BLE001 - another livekit: its public API then
            log.debug("livekit APM internals not as expected (%r): its public calls", e)
            return None

    def add(self, key: Any, buf: _Buffer) -> None:
        """The request for ``buf``: the microphone's (``key`` False) or a far end's
        (``key`` ``(True, rate)``)."""
        reverse = key is not False
        req = self._proto.FfiRequest()
        body = req.apm_process_reverse_stream if reverse else req.apm_process_stream
        body.apm_handle = self._handle
        body.data_ptr = self._address(buf.data)
        body.size = len(buf.data)
        body.sample_rate = buf.rate
        body.num_channels = 1
        data = req.SerializeToString()
        ptr = ctypes.cast(ctypes.c_char_p(data), ctypes.POINTER(ctypes.c_ubyte))
        self._reqs[key] = (ptr, len(data), data, reverse)  # data: what ptr points into

    def process(self, key: Any) -> None:
        ptr, size, _data, reverse = self._reqs[key]
        handle = self._request(ptr, size, *self._refs)
        try:
            resp = ctypes.string_at(self._resp, self._resp_len.value)
        finally:
            self._drop(ctypes.c_uint64(handle))
        if resp != self._ok.get(reverse):
            parsed = self._proto.FfiResponse.FromString(resp)
            body = parsed.apm_process_reverse_stream if reverse else parsed.apm_process_stream
            if body.error:
                raise RuntimeError(body.error)
            self._ok[reverse] = resp


def tap_playback(playback: object, on_played: Callable[[np.ndarray, int], None]) -> None:
    """Call ``on_played(samples, device_rate)`` with every block a
    :class:`sonic_voice.audio.devices.PlaybackStream` hands to its device, from its
    callback thread, right after the block is filled: the exact far-end signal, at the time
    it is played (silence on underrun included, so AEC3's clock keeps running).
    ``samples`` is the device's own block, valid during the call: copy what you keep
    (:meth:`EchoCanceller.process_far` does).

    Wraps the stream's buffer ``read_into`` on that one instance; nothing else changes.
    """
    buffer = playback.buffer  # type: ignore[attr-defined]
    rate = int(playback.device_rate)  # type: ignore[attr-defined]
    inner = buffer.read_into

    def read_into(out: np.ndarray, *args, **kwargs):
        result = inner(out, *args, **kwargs)
        on_played(out.reshape(-1), rate)
        return result

    buffer.read_into = read_into
