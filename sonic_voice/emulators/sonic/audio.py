"""Audio for the stand-in: what it says (tones, WAV files, espeak-ng) and what it hears.

Output is 24 kHz PCM16 LE mono (the rate every client asks for in ``promptStart``; other
rates are resampled on request). Input end-of-utterance and barge-in use a plain energy
detector over the received 16 kHz PCM, timed by sample count, not wall clock, so a test
that streams faster than real time still gets the same decisions.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import shutil
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soxr

OUT_RATE = 24000
IN_RATE = 16000


def tone(
    freq: float = 440.0, duration_s: float = 1.0, rate: int = OUT_RATE, amp: float = 0.3
) -> bytes:
    """A sine with 5 ms fades (no clicks), PCM16 LE."""
    n = max(1, round(duration_s * rate))
    t = np.arange(n) / rate
    x = amp * np.sin(2 * np.pi * freq * t)
    ramp = min(n // 2, int(0.005 * rate))
    if ramp:
        env = np.linspace(0.0, 1.0, ramp)
        x[:ramp] *= env
        x[-ramp:] *= env[::-1]
    return (x * 32767).astype("<i2").tobytes()


def _to_mono_rate(data: bytes, width: int, channels: int, rate: int, out_rate: int) -> bytes:
    if width != 2:
        raise ValueError(f"only 16-bit WAV files are supported (got {8 * width}-bit)")
    x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        x = x.reshape(-1, channels).mean(axis=1)
    if rate != out_rate:
        x = soxr.resample(x, rate, out_rate)
    return (np.clip(x, -1.0, 1.0) * 32767).astype("<i2").tobytes()


def load_wav(path: str | Path | io.BytesIO, out_rate: int = OUT_RATE) -> bytes:
    """A 16-bit WAV file as mono PCM16 at ``out_rate`` (resampled with soxr if needed).

    A streamed WAV (espeak-ng ``--stdout``) claims ~2**30 frames: what is there is read."""
    with wave.open(path if isinstance(path, io.BytesIO) else str(path), "rb") as w:
        return _to_mono_rate(
            w.readframes(w.getnframes()),
            w.getsampwidth(),
            w.getnchannels(),
            w.getframerate(),
            out_rate,
        )


def espeak_available() -> bool:
    return shutil.which("espeak-ng") is not None


async def synthesize(
    text: str, voice: str = "en-us", speed_wpm: int = 175, out_rate: int = OUT_RATE
) -> bytes:
    """Speech for ``text`` from espeak-ng in language/voice ``voice`` (e.g. ``es``, ``fr``).

    Runs the program as a subprocess (never blocks the loop); raises RuntimeError with
    espeak's own message when it fails, FileNotFoundError when it is not installed.
    """
    exe = shutil.which("espeak-ng")
    if exe is None:
        raise FileNotFoundError("espeak-ng is not installed")
    # The WAV comes on stdout (no temporary file to leave behind when a run is stopped mid
    # sentence); the program is killed if the synthesis is cancelled.
    proc = await asyncio.create_subprocess_exec(
        exe,
        "-v",
        voice,
        "-s",
        str(speed_wpm),
        "--stdout",
        "--",
        text,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await proc.communicate()
    except BaseException:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        raise
    if proc.returncode != 0 or len(out) <= 44:
        raise RuntimeError(
            f"espeak-ng -v {voice} failed ({proc.returncode}): {err.decode(errors='replace')}"
        )
    return await asyncio.to_thread(load_wav, io.BytesIO(out), out_rate)


def resample_pcm(pcm: bytes, in_rate: int, out_rate: int) -> bytes:
    if in_rate == out_rate:
        return pcm
    return _to_mono_rate(pcm, 2, 1, in_rate, out_rate)


def rms_dbfs(pcm: bytes) -> float:
    """RMS level of PCM16 in dBFS (-inf for digital silence)."""
    if len(pcm) < 2:
        return float("-inf")
    x = np.frombuffer(pcm[: len(pcm) // 2 * 2], dtype="<i2").astype(np.float32)
    r = float(np.sqrt(np.mean(x * x))) / 32768.0
    return 20 * np.log10(r) if r > 0 else float("-inf")


@dataclass
class VadEvent:
    kind: str  # "speech_start" | "speech_end"
    at_s: float  # stream audio time (seconds of received audio) when it was decided
    speech_s: float  # seconds of speech in the utterance so far


class EnergyDetector:
    """Speech above ``threshold_dbfs`` for ``min_speech_ms``, then ``end_silence_ms`` quiet.

    Feed it every received chunk; it returns the events the chunk caused. Decisions are
    made on 10 ms sub-frames so chunk size does not matter.
    """

    def __init__(
        self,
        rate: int = IN_RATE,
        threshold_dbfs: float = -35.0,
        min_speech_ms: float = 60.0,
        end_silence_ms: float = 600.0,
    ) -> None:
        self.rate = rate
        self.threshold_dbfs = threshold_dbfs
        self.min_speech_ms = min_speech_ms
        self.end_silence_ms = end_silence_ms
        self._frame = rate // 100 * 2  # bytes in 10 ms
        self._buf = bytearray()
        self._pos = 0  # samples consumed
        self._speech_ms = 0.0
        self._quiet_ms = 0.0
        self.in_speech = False

    def reset(self) -> None:
        self._speech_ms = self._quiet_ms = 0.0
        self.in_speech = False

    def feed(self, pcm: bytes) -> list[VadEvent]:
        self._buf += pcm
        out: list[VadEvent] = []
        f = self._frame
        while len(self._buf) >= f:
            frame = bytes(self._buf[:f])
            del self._buf[:f]
            self._pos += f // 2
            loud = rms_dbfs(frame) >= self.threshold_dbfs
            if loud:
                self._speech_ms += 10.0
                self._quiet_ms = 0.0
                if not self.in_speech and self._speech_ms >= self.min_speech_ms:
                    self.in_speech = True
                    out.append(VadEvent("speech_start", self._pos / self.rate, self._speech_ms))
            else:
                self._quiet_ms += 10.0
                if not self.in_speech and self._quiet_ms >= 100.0:
                    self._speech_ms = 0.0  # a click, not speech
                if self.in_speech and self._quiet_ms >= self.end_silence_ms:
                    out.append(VadEvent("speech_end", self._pos / self.rate, self._speech_ms))
                    self.reset()
        return out
