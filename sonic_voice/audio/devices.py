"""PortAudio device streams (sounddevice) for the robot's own microphone and speaker, and
the choice of speaker backend (:func:`open_playback`: libpulse's own API where a
PulseAudio server plays, sonic_voice/audio/pulse.py, else PortAudio).

Both streams work at the rates the rest of the package speaks (16 kHz in, 24 kHz out).
When a device cannot open at that rate, it is opened at its own default rate and the
audio is converted with :class:`StreamResampler`: on capture inside the callback path
(the consumer still gets exact blocks), on playback before the audio is queued (the
device callback only copies).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import sounddevice as sd

from sonic_voice.audio.pcm import FrameChunker, apply_gain, samples_per_block
from sonic_voice.audio.playback import SpeakerQueue
from sonic_voice.audio.pulse import PulsePlayback, PulseUnavailableError, SinkNotFoundError
from sonic_voice.audio.resample import StreamResampler

log = logging.getLogger(__name__)

_alsa_handler: object = None
alsa_messages = 0  # alsa-lib messages swallowed by quiet_alsa() (underruns, mostly)


def quiet_alsa() -> bool:
    """Stop alsa-lib printing to stderr (``snd_pcm_recover`` underrun lines, one per late
    callback). Underruns stay visible: streams count them in ``status_flags`` and audio_io
    reports them on its state topic. Returns False where alsa-lib is not loadable."""
    global _alsa_handler
    if _alsa_handler is not None:
        return True
    try:
        lib = ctypes.CDLL(ctypes.util.find_library("asound") or "libasound.so.2")
    except OSError:
        return False
    proto = ctypes.CFUNCTYPE(
        None, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p
    )

    def swallow(*_: object) -> None:
        global alsa_messages
        alsa_messages += 1

    _alsa_handler = proto(swallow)
    lib.snd_lib_error_set_handler(_alsa_handler)
    return True


class DeviceNotFoundError(LookupError):
    """No device matches the requested name or index; the message lists what exists."""


def list_devices(kind: str) -> list[str]:
    """Human-readable list of devices usable for ``kind`` ('input' or 'output')."""
    key = "max_input_channels" if kind == "input" else "max_output_channels"
    out = []
    for i, d in enumerate(sd.query_devices()):
        if d[key] > 0:
            out.append(f"[{i}] {d['name']} ({int(d['default_samplerate'])} Hz)")
    return out


def refresh_devices() -> None:
    """Re-scan PortAudio's device list (a device may have come or gone)."""
    sd._terminate()
    sd._initialize()


def resolve_device(spec: str | int | None, kind: str) -> int:
    """Find a device by index, exact name, or case-insensitive substring.

    ``None``/``""``/``"default"`` mean the system default. Raises
    :class:`DeviceNotFoundError` naming the devices present when nothing matches.
    """
    if kind not in ("input", "output"):
        raise ValueError(f"kind must be 'input' or 'output', not {kind!r}")
    key = "max_input_channels" if kind == "input" else "max_output_channels"
    devices = sd.query_devices()
    present = list_devices(kind)

    def fail(why: str) -> DeviceNotFoundError:
        listing = "\n  ".join(present) if present else "(none: is a sound server running?)"
        return DeviceNotFoundError(f"{kind} device {spec!r}: {why}. Devices present:\n  {listing}")

    if spec in (None, "", "default"):
        idx = sd.default.device[0 if kind == "input" else 1]
        if idx is None or idx < 0:
            raise fail("no default device")
        return int(idx)
    if isinstance(spec, int) or (isinstance(spec, str) and spec.strip().isdigit()):
        idx = int(spec)
        if not 0 <= idx < len(devices) or devices[idx][key] <= 0:
            raise fail(f"no {kind} device with index {idx}")
        return idx
    matches = [i for i, d in enumerate(devices) if d[key] > 0 and d["name"] == spec]
    if not matches:
        low = str(spec).lower()
        matches = [i for i, d in enumerate(devices) if d[key] > 0 and low in d["name"].lower()]
    if not matches:
        raise fail("not found")
    return matches[0]


def _supports(device: int, kind: str, rate: int) -> bool:
    try:
        if kind == "input":
            sd.check_input_settings(device=device, samplerate=rate, channels=1, dtype="int16")
        else:
            sd.check_output_settings(device=device, samplerate=rate, channels=1, dtype="int16")
        return True
    except (sd.PortAudioError, ValueError):
        return False


@dataclass
class StreamSettings:
    device: str | int | None = None
    rate: int = 16000
    block_ms: float = 32.0
    gain: float = 1.0
    # Suggested device latency: what PortAudio and the sound server hold beyond our
    # queue, so also the floor of flush-to-silence (bench/audio_flush.py: ~24 ms at 15 ms).
    latency: str | float = 0.015
    # 0: open the device at ``rate`` when it can, else at its default rate. Any other
    # value forces that device rate (converted to/from ``rate`` here).
    device_rate: int = 0


class CaptureStream:
    """Microphone capture delivering exact ``block_ms`` blocks of int16 at ``rate``.

    ``on_block`` is called from PortAudio's thread with each block; keep it short
    (hand the block to a queue or an event loop).
    """

    def __init__(self, settings: StreamSettings, on_block: Callable[[np.ndarray], None]) -> None:
        self.settings = settings
        self.on_block = on_block
        self.device_index = resolve_device(settings.device, "input")
        self.block = samples_per_block(settings.rate, settings.block_ms)
        info = sd.query_devices(self.device_index)
        if settings.device_rate:
            self.device_rate = settings.device_rate
        elif _supports(self.device_index, "input", settings.rate):
            self.device_rate = settings.rate
        else:
            self.device_rate = int(info["default_samplerate"])
            log.info(
                "input device %s cannot open at %d Hz; capturing at %d Hz and resampling",
                info["name"],
                settings.rate,
                self.device_rate,
            )
        self.device_name = info["name"]
        self._resampler = StreamResampler(self.device_rate, settings.rate)
        self._chunker = FrameChunker(self.block)
        self.last_callback = 0.0
        self.status_flags = 0
        self._stream = sd.RawInputStream(
            device=self.device_index,
            samplerate=self.device_rate,
            channels=1,
            dtype="int16",
            blocksize=samples_per_block(self.device_rate, settings.block_ms),
            latency=settings.latency,
            callback=self._callback,
        )

    def _callback(self, indata, frames, time_info, status) -> None:
        self.last_callback = time.monotonic()
        if status:
            self.status_flags += 1
        samples = np.frombuffer(bytes(indata), dtype=np.int16)
        samples = self._resampler.process(samples)
        samples = apply_gain(samples, self.settings.gain)
        for blk in self._chunker.push(samples):
            self.on_block(blk)

    @property
    def active(self) -> bool:
        return bool(self._stream.active)

    def start(self) -> None:
        self.last_callback = time.monotonic()
        self._stream.start()

    def close(self) -> None:
        try:
            self._stream.abort(ignore_errors=True)
        finally:
            self._stream.close(ignore_errors=True)


class PlaybackStream(SpeakerQueue):
    """Speaker playback from a :class:`PlaybackBuffer`, fed with int16 at ``rate``.

    ``write()`` accepts PCM16 chunks of any size from any thread; ``flush()`` drops
    everything not yet handed to the device.
    """

    backend = "portaudio"

    def __init__(self, settings: StreamSettings) -> None:
        self.settings = settings
        self.device_index = resolve_device(settings.device, "output")
        info = sd.query_devices(self.device_index)
        self.device_name = info["name"]
        if settings.device_rate:
            self.device_rate = settings.device_rate
        elif _supports(self.device_index, "output", settings.rate):
            self.device_rate = settings.rate
        else:
            self.device_rate = int(info["default_samplerate"])
            log.info(
                "output device %s cannot open at %d Hz; resampling to %d Hz",
                info["name"],
                settings.rate,
                self.device_rate,
            )
        self._open_queue(self.device_rate)
        self.last_callback = 0.0
        self.status_flags = 0
        self._stream = sd.OutputStream(
            device=self.device_index,
            samplerate=self.device_rate,
            channels=1,
            dtype="int16",
            blocksize=samples_per_block(self.device_rate, settings.block_ms),
            latency=settings.latency,
            callback=self._callback,
        )

    def _callback(self, outdata, frames, time_info, status) -> None:
        self.last_callback = time.monotonic()
        if status.output_underflow:
            self.status_flags += 1
        self.buffer.read_into(outdata[:, 0])

    def flush(self) -> int:
        """Drop everything queued. What the device already holds (``latency``) still plays:
        aborting the stream would drop it too, but ALSA's pulse plugin garbles the audio
        that follows an abort/restart, so the bound is kept small instead."""
        return self._drop_queued()

    @property
    def active(self) -> bool:
        return bool(self._stream.active)

    def start(self) -> None:
        self.last_callback = time.monotonic()
        self._stream.start()

    def close(self) -> None:
        try:
            self._stream.abort(ignore_errors=True)
        finally:
            self._stream.close(ignore_errors=True)


SPEAKER_BACKENDS = ("auto", "pulse", "portaudio")


def open_playback(
    settings: StreamSettings, backend: str = "auto", server: str | None = None
) -> PlaybackStream | PulsePlayback:
    """Open the speaker on ``backend``; both results have the same surface.

    - ``pulse``: libpulse's own API (:class:`PulsePlayback`): a flush also drops what the
      sound server holds (bench/audio_flush.py: flush -> silence p50 3-7 ms, p99 7-14 ms
      when the process gets its CPU, instead of p50 48-69 ms, p99 64-82 ms). Raises
      :class:`PulseUnavailableError` when no server answers and
      :class:`DeviceNotFoundError` when ``settings.device`` names no sink.
    - ``portaudio``: :class:`PlaybackStream` (any device PortAudio sees; a flush leaves what
      PortAudio, ALSA and the server hold playing).
    - ``auto``: ``pulse`` when a PulseAudio (or pipewire-pulse) server answers and the
      device is the default or names one of its sinks, else ``portaudio``; says which.

    ``server``: the PulseAudio server to ask (None: libpulse's own search, $PULSE_SERVER).
    """
    if backend not in SPEAKER_BACKENDS:
        choices = ", ".join(SPEAKER_BACKENDS)
        raise ValueError(f"speaker backend {backend!r}: choose one of {choices}")
    spec = settings.device
    if backend == "auto" and (isinstance(spec, int) or str(spec or "").strip().isdigit()):
        log.info("speaker: PortAudio (device %r is a PortAudio index)", spec)
        return PlaybackStream(settings)
    if backend in ("auto", "pulse"):
        try:
            pb = PulsePlayback(settings, server=server)
        except PulseUnavailableError as e:
            if backend == "pulse":
                raise PulseUnavailableError(
                    f"speaker_backend 'pulse': {e} (PULSE_SERVER="
                    f"{os.environ.get('PULSE_SERVER', 'unset')}). Start PulseAudio or "
                    "PipeWire's pulse server, or set speaker_backend to 'portaudio'."
                ) from None
            log.info("speaker: PortAudio (%s)", e)
        except SinkNotFoundError as e:
            if backend == "pulse":
                raise DeviceNotFoundError(f"output device: {e}") from None
            log.info("speaker: PortAudio (%s)", e)
        else:
            log.info("speaker: PulseAudio stream on sink %s", pb.device_name)
            return pb
    return PlaybackStream(settings)
