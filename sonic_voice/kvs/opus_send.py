"""Robot -> viewer audio: Opus with in-band FEC, paced exactly, and the SDP that says so.

aiortc's own Opus encoder runs at a fixed 96 kbit/s with no FEC, no expected-loss setting
and no pacing of its own (kvs-signaling.md §6.2). Here the robot's speech is encoded by
libopus (called directly: :class:`LibOpusEncoder`, the libopus PyAV bundles) with

- ``fec=1`` and ``packet_loss=<expected %>``: every packet carries a low-bitrate copy of
  the previous frame (LBRR), so the browser's NetEq rebuilds any single lost packet;
- ``application=voip`` and a speech bitrate (32 kbit/s default: FEC needs headroom, libopus
  only adds LBRR when the bitrate leaves room for it);
- optional DTX (off by default: it saves bandwidth in pauses but adds nothing against loss,
  and with DTX a lost first packet after a pause has no FEC to come from);

and handed to aiortc as ready-made packets (aiortc's public "track yields ``av.Packet``"
path, so aiortc's encoder is never used). The track paces itself on the monotonic clock:
one 20 ms packet per 20 ms (adaptive: up to 120 ms packets on a thin link, each when its
time comes), silence when nothing is queued, no drift.

:func:`munge_sdp` puts ``useinbandfec=1`` (so the browser also sends us FEC), ``minptime``,
``usedtx`` and ``maxaveragebitrate`` in the Opus ``a=fmtp`` line, and ``a=rtcp-fb:<pt> nack``,
into a description aiortc produced (aiortc writes no fmtp/rtcp-fb for audio). Apply it to
``pc.localDescription.sdp`` right before sending it over signaling.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import fractions
import functools
import re
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import av
import numpy as np
from aiortc import MediaStreamTrack
from aiortc.mediastreams import MediaStreamError

from sonic_voice.audio.pcm import as_pcm16
from sonic_voice.audio.resample import StreamResampler

RATE = 48000  # the Opus RTP clock
FRAME = 960
TIME_BASE = fractions.Fraction(1, RATE)


ENCODER_RATES = (8000, 12000, 16000, 24000, 48000)  # what libopus takes as input
# Frame durations (ms) one Opus packet may carry (RFC 7587: up to the receiver's maxptime,
# 120 ms by default); libopus >= 1.2 encodes 80-120 ms as one packet of 20 ms frames.
PTIMES_MS = (10, 20, 40, 60, 80, 100, 120)


@dataclass
class OpusSendConfig:
    bitrate: int = 32000
    fec: bool = True
    packet_loss_pct: int = 10  # what libopus provisions FEC for
    dtx: bool = False
    complexity: int = 10
    max_queue_s: float = 120.0
    # Rate libopus is fed at. Setting it to the producer's rate (24 kHz for Nova Sonic)
    # skips resampling, whose filter would hold ~32 ms of audio back (soxr HQ 24 -> 48 kHz);
    # the RTP clock is 48 kHz whatever this is.
    input_rate: int = RATE
    # A frame that is only partly queued waits for the rest of its 20 ms while the
    # producer pushed within this long (then it is padded with silence: the end of an
    # utterance). Any chunking is allowed, so a small first chunk, or a producer that
    # shares a stalled event loop with this track, must not leave holes inside speech; the
    # frame leaves a little late instead, which the receiver's jitter buffer absorbs.
    hold_ms: float = 40.0
    # Adaptive bitrate (sonic_voice/kvs/abr.py): encode with opuslib, whose bitrate and
    # expected loss can change between two frames (PyAV's encoder is fixed once open).
    adaptive: bool = False
    # Send nothing between utterances (after ``pause_after`` silent frames, so the packet
    # after the last word still carries its FEC copy): the RTP timestamp then jumps over
    # the pause with the sequence numbers continuous, which a receiver takes as the
    # sender's DTX. Saves encoding, SRTP and a send 50 times a second while the robot is
    # quiet, and the bandwidth. Off by default for a worry that the browser's buffer
    # restarts at each utterance; measured in Chromium (bench/first_word.py, 24 utterances
    # a mode after 1.5-3 s of silence, loopback, 8 sessions alternating): the first word
    # plays as soon (play() -> onset p50 55 ms both: 8 ms less on the robot, no wait for a
    # 20 ms slot; 8 ms more in NetEq), not clipped in most utterances (pause_preroll_ms),
    # no loss. And a 400 ms stall of the robot's loop in a silence left Chromium's target
    # delay at 400 ms for the rest of the session with the silent stream (its packets came
    # late, then in a burst), 20 ms with this (nothing was due).
    pause_in_silence: bool = False
    pause_after: int = 3
    # Silence (ms) sent with the first frame after a pause, dated just before it.
    # Chromium's NetEq conceals the pause (expand, faded to silence) and, when packets
    # come again, merges into the first audio it decodes with a linear fade-in over that
    # packet (webrtc merge.cc: from the expand's mute factor, ~0 after a pause, to full
    # gain within the packet): without it the first 10 ms of an utterance played at 0.04-1.0
    # (median 0.59; 14 of 16 below 0.71) of their level, the path's steady gain being 0.89
    # (bench/first_word.py). With a packet of silence ahead the fade falls on the silence:
    # 17 of 24 at 0.94-1.02, 7 still at 0.06-0.66 (the first-20-ms energy ratio p50 0.87,
    # 0.89 without pauses). One Opus frame: 10 or 20 ms; 0: none.
    pause_preroll_ms: int = 10
    # Complexity for the frames of silence the track makes up between utterances (after
    # ``pause_after`` of them, so the packet after the last word, which carries its FEC
    # copy, is encoded as before); None: ``complexity`` throughout. libopus takes the
    # change between two frames. Digital silence decodes to the same silence either way
    # (|x| <= 1) in 7-byte packets instead of 21, and costs 90 us a frame at 0 instead of
    # 298 us at 10 (libopus 1.6.1 here): ~1 % of a core while the robot is quiet. The
    # speech after a pause decodes with the same NCC against its source (0.9588 both,
    # test_opus_send.py).
    silence_complexity: int | None = 0

    def __post_init__(self) -> None:
        if self.pause_preroll_ms not in (0, 10, 20):
            raise ValueError(f"pause_preroll_ms must be 0, 10 or 20, not {self.pause_preroll_ms}")
        for name in ("complexity", "silence_complexity"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= 10:
                raise ValueError(f"{name} must be 0..10, not {value}")
        if self.input_rate not in ENCODER_RATES:
            raise ValueError(f"input_rate must be one of {ENCODER_RATES}, not {self.input_rate}")


def make_opus_encoder(cfg: OpusSendConfig) -> av.CodecContext:
    """A libopus encoder: mono s16 at ``cfg.input_rate`` in, one 20 ms packet per frame out."""
    ctx = av.CodecContext.create("libopus", "w")
    ctx.sample_rate = cfg.input_rate
    ctx.layout = "mono"
    ctx.format = "s16"
    ctx.bit_rate = cfg.bitrate
    ctx.time_base = fractions.Fraction(1, cfg.input_rate)
    ctx.options = {
        "application": "voip",
        "frame_duration": "20",
        "vbr": "on",
        "fec": "1" if cfg.fec else "0",
        "packet_loss": str(int(cfg.packet_loss_pct)),
        "dtx": "1" if cfg.dtx else "0",
        "compression_level": str(int(cfg.complexity)),
    }
    ctx.open()
    return ctx


# libopus CTL requests (opus_defines.h) and the VoIP application.
_SET_BITRATE = 4002
_SET_VBR = 4006
_SET_COMPLEXITY = 4010
_SET_INBAND_FEC = 4012
_SET_PACKET_LOSS_PERC = 4014
_SET_DTX = 4016
_SET_VBR_CONSTRAINT = 4020
_APPLICATION_VOIP = 2048


@functools.cache
def libopus() -> ctypes.CDLL:
    """The libopus PyAV's libavcodec is linked with (the wheel bundles a recent one:
    libopus 1.6.1 in av 19.0.2), else the system's (``libopus0``; 1.3.1 on Ubuntu 22.04,
    ~40 % slower at complexity 10: 411/549 us per silent/speech frame here, 1.6.1
    298/405)."""
    import av.codec  # noqa: F401 - maps libavcodec, and with it its libopus

    path = None
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:  # the mapped one from the wheel (opuslib maps the system's too)
            file = line.split(None, 5)[-1].strip()
            name = file.rsplit("/", 1)[-1]
            if name.startswith("libopus") and ".so" in name and "/av.libs/" in file:
                path = file
                break
    lib = ctypes.CDLL(path or ctypes.util.find_library("opus") or "libopus.so.0")
    lib.opus_encoder_create.restype = ctypes.c_void_p
    lib.opus_encoder_create.argtypes = [
        ctypes.c_int32,
        ctypes.c_int,
        ctypes.c_int,
        ctypes.POINTER(ctypes.c_int),
    ]
    lib.opus_encoder_ctl.restype = ctypes.c_int
    lib.opus_encoder_ctl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
    lib.opus_encode.restype = ctypes.c_int32
    lib.opus_encode.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_void_p,
        ctypes.c_int32,
    ]
    lib.opus_encoder_destroy.restype = None
    lib.opus_encoder_destroy.argtypes = [ctypes.c_void_p]
    lib.opus_get_version_string.restype = ctypes.c_char_p
    return lib


class LibOpusEncoder:
    """libopus called directly (ctypes), with the settings :func:`make_opus_encoder` gives
    libavcodec's ``libopus`` encoder, and the same library: the same packets, bit for bit
    (test_opus_send.py checks it), for less CPU. PyAV's ``encode()`` sends every frame
    through a libavfilter graph (its AudioResampler re-chunks audio to the encoder's frame
    size) and wraps it in AVFrame/AVPacket objects: 115-150 us of a 410-555 us frame at
    complexity 10 (silence/speech), ~0.7 % of a core at 50 frames a second. Here a frame is
    one ``opus_encode`` on the int16 samples.

    :meth:`set_complexity` may change the complexity between two frames (libopus allows
    it at any time; WebRTC does it under CPU load)."""

    MAX_PACKET = 4000  # bytes: libopus's recommended output buffer

    def __init__(self, cfg: OpusSendConfig) -> None:
        self._lib = lib = libopus()
        err = ctypes.c_int(0)
        self._st = lib.opus_encoder_create(cfg.input_rate, 1, _APPLICATION_VOIP, ctypes.byref(err))
        if not self._st or err.value != 0:
            raise RuntimeError(f"opus_encoder_create failed ({err.value})")
        self.complexity = -1
        for request, value in (
            (_SET_BITRATE, cfg.bitrate),
            (_SET_VBR, 1),
            (_SET_VBR_CONSTRAINT, 0),  # libavcodec's vbr=on
            (_SET_PACKET_LOSS_PERC, int(cfg.packet_loss_pct)),
            (_SET_INBAND_FEC, 1 if cfg.fec else 0),
            (_SET_DTX, 1 if cfg.dtx else 0),
        ):
            self._ctl(request, value)
        self.set_complexity(int(cfg.complexity))
        self.rate = cfg.input_rate
        self._out = ctypes.create_string_buffer(self.MAX_PACKET)
        self._time_base = fractions.Fraction(1, cfg.input_rate)

    def _ctl(self, request: int, value: int) -> None:
        rc = self._lib.opus_encoder_ctl(self._st, request, int(value))
        if rc != 0:
            raise ValueError(f"opus_encoder_ctl({request}, {value}) failed ({rc})")

    def set_complexity(self, complexity: int) -> None:
        """0-10, from the next frame on."""
        if complexity != self.complexity:
            self._ctl(_SET_COMPLEXITY, complexity)
            self.complexity = complexity

    def encode_pcm(self, pcm: np.ndarray, pts: int) -> av.Packet:
        """One frame of mono int16 samples (2.5-120 ms) -> its packet, dated ``pts``."""
        pcm = np.ascontiguousarray(pcm, dtype=np.int16)
        n = self._lib.opus_encode(self._st, pcm.ctypes.data, len(pcm), self._out, self.MAX_PACKET)
        if n < 0:
            raise RuntimeError(f"opus_encode failed ({n})")
        pkt = av.Packet(self._out.raw[:n])
        pkt.pts = pkt.dts = pts
        pkt.time_base = self._time_base
        return pkt

    def __del__(self) -> None:
        st, self._st = getattr(self, "_st", None), None
        if st:
            self._lib.opus_encoder_destroy(st)


class _OpuslibEncoder:
    """libopus through opuslib: same settings as :func:`make_opus_encoder`, plus
    :meth:`retarget` between frames. Packets carry the frame's pts (no pre-skip shift)."""

    def __init__(self, cfg: OpusSendConfig) -> None:
        import opuslib
        import opuslib.api.ctl
        import opuslib.api.encoder

        self.enc = opuslib.Encoder(cfg.input_rate, 1, opuslib.APPLICATION_VOIP)
        self.enc.bitrate = cfg.bitrate
        self.enc.vbr = 0  # CBR: the rate it is told is the rate it sends (a thin link)
        # opuslib 3.0.1's inband_fec setter drops its value (a bug): call the ctl directly.
        opuslib.api.encoder.encoder_ctl(
            self.enc.encoder_state, opuslib.api.ctl.set_inband_fec, 1 if cfg.fec else 0
        )
        self.enc.packet_loss_perc = int(cfg.packet_loss_pct)
        self.enc.complexity = self.complexity = int(cfg.complexity)
        self.rate = cfg.input_rate
        if cfg.dtx:
            raise ValueError("dtx is not supported with adaptive=True")

    def retarget(self, bitrate: int, packet_loss_pct: int) -> None:
        self.enc.bitrate = int(bitrate)
        self.enc.packet_loss_perc = int(packet_loss_pct)

    def set_complexity(self, complexity: int) -> None:
        if complexity != self.complexity:
            self.enc.complexity = self.complexity = int(complexity)

    def encode_pcm(self, pcm: np.ndarray, pts: int) -> av.Packet:
        pkt = av.Packet(self.enc.encode(pcm.astype("<i2", copy=False).tobytes(), len(pcm)))
        pkt.pts = pkt.dts = pts
        pkt.time_base = fractions.Fraction(1, self.rate)
        return pkt


class OpusFecTrack(MediaStreamTrack):
    """An audio track for ``pc.addTrack``: PCM pushed in, FEC-protected Opus packets out.

    ``push(pcm, rate)`` from any thread (e.g. a ROS callback with ``audio/out`` at 24 kHz);
    ``flush()`` drops what is queued (barge-in). Between utterances it sends silence (the
    RTP clock never jumps), or with ``pause_in_silence`` nothing (the clock jumps over the
    pause, which the browser takes as DTX: see that setting). Pushed chunks
    are re-framed gap-free: a frame is padded with silence only at the end of what was
    queued, once the producer has been quiet for ``hold_ms``.
    """

    kind = "audio"

    def __init__(self, config: OpusSendConfig | None = None) -> None:
        super().__init__()
        self.cfg = config or OpusSendConfig()
        self.rate = self.cfg.input_rate
        self.frame = self.rate // 50  # 20 ms; adaptive: set_target(ptime_ms=) changes it
        self.ptime_ms = 20
        self._pts = 0  # input-rate samples handed to the encoder (the next frame's pts)
        self._enc = _OpuslibEncoder(self.cfg) if self.cfg.adaptive else LibOpusEncoder(self.cfg)
        # (bit/s, loss %, ptime ms) for the next frame
        self._target: tuple[int, int, int] | None = None
        self.bitrate = self.cfg.bitrate
        self.packet_loss_pct = self.cfg.packet_loss_pct
        self._lock = threading.Lock()
        self._chunks: deque[np.ndarray] = deque()
        self._queued = 0
        self._resamplers: dict[int, StreamResampler] = {}
        self._resampled = False  # a resampler may hold samples back (drained at the end)
        self._pending = np.zeros(0, np.int16)
        self._last_push = float("-inf")
        self._pushed: asyncio.Event | None = None  # set on push; made on recv's loop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._start: float | None = None
        self._n = 0  # frames handed to the encoder
        self._packets: deque[av.Packet] = deque()
        self.sent_frames = 0
        self.speech_frames = 0
        self.padded_frames = 0  # frames completed with silence (ends of utterances)
        self.send_times: dict[int, float] = {}  # pts (48 kHz) -> monotonic time sent (benches)
        self.record_send_times = False
        self._silent_run = 0  # silent frames encoded since the last one with audio
        self.paused_frames = 0  # frame slots not sent (pause_in_silence)

    def set_target(self, bitrate: int, packet_loss_pct: int, ptime_ms: int | None = None) -> None:
        """Encode from the next frame on at ``bitrate`` with FEC for ``packet_loss_pct``, in
        packets of ``ptime_ms`` (unchanged if None; needs ``adaptive=True``; any thread).

        Longer packets are how a thin link fits: each packet costs 64 bytes of IPv4, UDP,
        RTP (with aiortc's header extensions) and SRTP, 25.6 kbit/s at 20 ms, 4.3 kbit/s
        at 120 ms (measured in bench/abr.py)."""
        if not isinstance(self._enc, _OpuslibEncoder):
            raise RuntimeError("set_target needs OpusSendConfig(adaptive=True)")
        ptime = self.ptime_ms if ptime_ms is None else int(ptime_ms)
        if ptime not in PTIMES_MS:
            raise ValueError(f"ptime_ms must be one of {PTIMES_MS}, not {ptime_ms}")
        self._target = (int(bitrate), int(packet_loss_pct), ptime)

    def push(self, pcm: bytes | np.ndarray, rate: int = RATE) -> None:
        """Queue mono PCM16 at ``rate`` to be sent in real time."""
        samples = as_pcm16(pcm).reshape(-1)
        if self.readyState != "live" or not len(samples):
            return
        with self._lock:
            if rate != self.rate:
                rs = self._resamplers.get(rate)
                if rs is None:
                    rs = self._resamplers[rate] = StreamResampler(rate, self.rate)
                samples = rs.process(samples)
                self._resampled = True
            self._last_push = time.monotonic()
            if len(samples):
                self._chunks.append(np.array(samples, dtype=np.int16))
                self._queued += len(samples)
                while self._queued > self.cfg.max_queue_s * self.rate:
                    self._queued -= len(self._chunks.popleft())
        self._wake()

    def _wake(self) -> None:
        """Tell a recv() waiting for the rest of a frame that more audio came."""
        loop, event = self._loop, self._pushed
        if loop is None or event is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        else:
            loop.call_soon_threadsafe(event.set)

    def flush(self) -> int:
        """Drop everything not yet encoded; returns the samples dropped (at ``input_rate``)."""
        with self._lock:
            dropped = self._queued + len(self._pending)
            self._chunks.clear()
            self._queued = 0
            self._pending = np.zeros(0, np.int16)
            self._last_push = float("-inf")
            for rs in self._resamplers.values():
                rs.reset()
            self._resampled = False
        self._wake()
        return dropped

    @property
    def queued_seconds(self) -> float:
        return (self._queued + len(self._pending)) / self.rate

    def _short_wait(self, now: float) -> float:
        """Seconds to wait for the rest of a partly queued frame (0: encode now)."""
        with self._lock:
            have = len(self._pending) + self._queued
            if have >= self.frame or not (have or self._resampled):
                return 0.0
            return max(0.0, self._last_push + self.cfg.hold_ms / 1000 - now)

    def _next_pcm(self) -> tuple[np.ndarray, bool]:
        """The next 20 ms to encode, and whether it carries queued audio."""
        f = self.frame
        with self._lock:
            parts = [self._pending]
            have = len(self._pending)
            while have < f and self._chunks:
                c = self._chunks.popleft()
                self._queued -= len(c)
                parts.append(c)
                have += len(c)
            if have < f and self._resampled:
                # The end of what was queued: take what the resamplers still hold back.
                for rs in self._resamplers.values():
                    parts.append(rs.process(np.zeros(0, np.int16), last=True))
                    rs.reset()
                self._resampled = False
            buf = np.concatenate(parts) if len(parts) > 1 else self._pending
            have = len(buf)
            if have >= f:
                self._pending = buf[f:]
                return buf[:f], True
            self._pending = np.zeros(0, np.int16)
            if have:
                # The end of an utterance: pad the last frame with silence.
                self.padded_frames += 1
                return np.concatenate((buf, np.zeros(f - have, np.int16))), True
            return np.zeros(f, np.int16), False

    async def _pause(self) -> None:
        """Nothing to say: wait, without a timer, until audio is queued, then move the
        clock to now (the frames of the pause are never sent)."""
        assert self._pushed is not None
        while self.readyState == "live":
            with self._lock:
                have = self._queued + len(self._pending)
            if have:
                break
            self._pushed.clear()
            await self._pushed.wait()
        if self.readyState != "live":
            raise MediaStreamError
        assert self._start is not None
        slot = self.frame / self.rate
        behind = time.monotonic() - (self._start + self._pts / self.rate)
        skipped = 1 + max(0, int(behind / slot))  # the silent frame just taken, and the pause
        self._pts += skipped * self.frame
        self.paused_frames += skipped
        preroll = self.rate * self.cfg.pause_preroll_ms // 1000
        if preroll:
            # Silence dated just before the utterance, sent with it (see pause_preroll_ms).
            # Within the frame just taken, so after everything sent before.
            if self.cfg.silence_complexity is not None:
                self._enc.set_complexity(self.cfg.silence_complexity)
            pts = self._pts - preroll
            self._packets.append(self._enc.encode_pcm(np.zeros(preroll, np.int16), pts))
        # The next frame leaves now, not at the next slot of the old clock.
        self._start = time.monotonic() - self._pts / self.rate

    def stop(self) -> None:
        super().stop()
        self._wake()  # a recv() paused in silence ends now

    async def recv(self) -> av.Packet:
        if self.readyState != "live":
            raise MediaStreamError
        while True:
            if self._packets:
                pkt = self._packets.popleft()
                break
            # Exact pacing: the frame starting at sample pts leaves at start + pts / rate
            # on the monotonic clock.
            now = time.monotonic()
            if self._start is None:
                self._start = now
            due = self._start + self._pts / self.rate
            if due > now:
                await asyncio.sleep(due - now)
            elif now - due > 0.2:
                # The loop was blocked for a long time: restart the clock, don't burst.
                self._start = now - self._pts / self.rate
            target, self._target = self._target, None
            if target is not None and isinstance(self._enc, _OpuslibEncoder):
                self._enc.retarget(target[0], target[1])
                self.bitrate, self.packet_loss_pct, self.ptime_ms = target
                self.frame = self.rate * self.ptime_ms // 1000
            if self._pushed is None:
                self._loop = asyncio.get_running_loop()
                self._pushed = asyncio.Event()
            while (wait := self._short_wait(time.monotonic())) > 0:
                self._pushed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._pushed.wait(), wait)
            if self.readyState != "live":
                raise MediaStreamError
            pcm, speech = self._next_pcm()
            self._silent_run = 0 if speech else self._silent_run + 1
            quiet = self._silent_run > self.cfg.pause_after
            if quiet and self.cfg.pause_in_silence:
                await self._pause()
                continue
            if self.cfg.silence_complexity is not None:
                self._enc.set_complexity(
                    self.cfg.silence_complexity if quiet else self.cfg.complexity
                )
            # Packets are dated by their frame (the clock jumps over a pause with it).
            self._packets.append(self._enc.encode_pcm(pcm, self._pts))
            self._pts += self.frame
            self._n += 1
            self.speech_frames += speech
        self.sent_frames += 1
        if self.record_send_times:
            self.send_times[int(pkt.pts) * (RATE // self.rate)] = time.monotonic()
        return pkt


async def run_abr(
    track: OpusFecTrack,
    sender: Any,
    controller: Any,
    poll_s: float = 0.1,
    on_decision: Any = None,
    transport_cc: bool = False,
    payload_only_link: bool = False,
    report_interval_s: float | None = 5.0,
) -> None:
    """Adapt ``track`` to what the viewer reports about ``sender`` (an RTCRtpSender), for as
    long as the track lives. ``controller``: a :class:`sonic_voice.kvs.abr.AbrController`.

    Every receiver report goes to it the moment it arrives
    (:func:`sonic_voice.kvs.net_hooks.tap_feedback`; REMB through ``tap_remb``), and its
    decisions (Opus bitrate, expected loss, packet duration) apply from the next frame on.
    Polling ``getStats()`` instead saw a report up to ``poll_s`` late, with aiortc's
    smoothed RTT. (NACKs are no help here: a receiver with a shallow buffer asks for a
    packet only while its frame can still play, which a tail-dropped packet's rarely can,
    and browsers do not NACK Opus unless it was negotiated.)

    With ``transport_cc`` (negotiated: :func:`sonic_voice.kvs.net_hooks.enable_transport_cc`
    before the offer), every transport-cc feedback message goes to
    ``controller.update_twcc`` too: the way down in ~100 ms instead of a report's 0.5-5 s.
    While that feedback comes (the last within 1 s), our own sender reports go out every
    ``report_interval_s`` (libwebrtc's audio interval, 5 s) instead of aiortc's ~1 s:
    each is 79 ms of a 12 kbit/s link that the packets behind it wait for
    (:func:`sonic_voice.kvs.net_hooks.thin_sender_reports`); None keeps aiortc's.
    ``payload_only_link``: a bench's link model that counts only codec payload."""
    import time

    from sonic_voice.kvs.abr import Report
    from sonic_voice.kvs.net_hooks import (
        Feedback,
        tap_feedback,
        tap_remb,
        tap_transport_cc,
        thin_sender_reports,
    )

    def apply(d: Any) -> None:
        if d.changed:
            track.set_target(d.bitrate, d.packet_loss_pct, d.ptime_ms)
            if on_decision is not None:
                on_decision(d)

    def on_feedback(fb: Feedback) -> None:
        if fb.kind != "rr":
            return
        remb = getattr(sender, "_sv_remb_bps", None)
        apply(controller.update(Report(fb.at, fb.fraction_lost, fb.jitter_s, fb.rtt_s, remb)))

    last_twcc = [-1e9]

    def on_twcc(s: Any) -> None:
        last_twcc[0] = time.monotonic()
        apply(controller.update_twcc(s))

    tap_remb(sender)
    tap_feedback(sender, on_feedback)
    if transport_cc:
        tap_transport_cc(sender, on_twcc, payload_only=payload_only_link)
        if report_interval_s is not None:
            # Outside tap_feedback: a report skipped here is not timed for an RTT there.
            thin_sender_reports(
                sender, report_interval_s, when=lambda: time.monotonic() - last_twcc[0] < 1.0
            )
    while track.readyState == "live":  # noqa: ASYNC110 - the track has no "ended" event to await
        await asyncio.sleep(poll_s)


def max_ptime_ms(sdp: str) -> int:
    """The longest packet (ms) the peer that wrote ``sdp`` takes in its audio section
    (``a=maxptime``; RFC 7587's default for Opus, 120 ms, when it says nothing)."""
    audio = False
    for line in sdp.splitlines():
        if line.startswith("m="):
            audio = line.startswith("m=audio")
        elif audio and line.startswith("a=maxptime:"):
            try:
                return max(10, int(line.split(":", 1)[1].strip()))
            except ValueError:
                return 120
    return 120


_RTPMAP = re.compile(r"^a=rtpmap:(\d+) opus/48000(/2)?\s*$", re.IGNORECASE)


def munge_sdp(
    sdp: str,
    config: OpusSendConfig | None = None,
    *,
    nack: bool = True,
    stereo: bool = False,
    transport_cc: bool = False,
) -> str:
    """Add Opus fmtp (``minptime=10;useinbandfec=1``, ``usedtx``, ``maxaveragebitrate``)
    and ``a=rtcp-fb:<pt> nack`` to every audio section of ``sdp``; with ``transport_cc``
    also ``a=rtcp-fb:<pt> transport-cc`` (a browser sends transport-cc feedback about
    audio only with it; :func:`sonic_voice.kvs.net_hooks.enable_transport_cc` puts the
    header extension into aiortc's descriptions).

    Parameters already present on the fmtp line keep their value unless we set them.
    Idempotent. Only the audio m-sections are touched; line endings are kept.
    """
    cfg = config or OpusSendConfig()
    eol = "\r\n" if "\r\n" in sdp else "\n"
    lines = sdp.split(eol)
    trailing = lines[-1] == ""
    if trailing:
        lines = lines[:-1]
    want = {
        "minptime": "10",
        "useinbandfec": "1" if cfg.fec else "0",
        "usedtx": "1" if cfg.dtx else "0",
        "maxaveragebitrate": str(max(cfg.bitrate, 6000) * 2),
        "stereo": "1" if stereo else "0",
        "sprop-stereo": "1" if stereo else "0",
    }
    out: list[str] = []
    in_audio = False
    i = 0
    while i < len(lines):
        line = lines[i]
        if line is None:  # an fmtp/rtcp-fb line already rewritten after its rtpmap
            i += 1
            continue
        if line.startswith("m="):
            in_audio = line.startswith("m=audio")
        m = _RTPMAP.match(line) if in_audio else None
        out.append(line)
        i += 1
        if not m:
            continue
        pt = m.group(1)
        # Collect this payload type's existing fmtp / rtcp-fb lines anywhere in the section.
        j = i
        section_end = j
        while section_end < len(lines) and not lines[section_end].startswith("m="):
            section_end += 1
        params: dict[str, str] = {}
        order: list[str] = []
        fbs: list[str] = []
        for k in range(j, section_end):
            ln = lines[k]
            if ln.startswith(f"a=fmtp:{pt} "):
                for kv in ln.split(" ", 1)[1].split(";"):
                    if "=" in kv:
                        key, val = kv.strip().split("=", 1)
                        if key not in params:
                            order.append(key)
                        params[key] = val
                lines[k] = None  # type: ignore[call-overload]
            elif ln.startswith(f"a=rtcp-fb:{pt} "):
                fbs.append(ln)
                lines[k] = None  # type: ignore[call-overload]
        for key, val in want.items():
            if key not in params:
                order.append(key)
            params[key] = val
        out.append(f"a=fmtp:{pt} " + ";".join(f"{k}={params[k]}" for k in order))
        if nack and f"a=rtcp-fb:{pt} nack" not in fbs:
            fbs.append(f"a=rtcp-fb:{pt} nack")
        if transport_cc and f"a=rtcp-fb:{pt} transport-cc" not in fbs:
            fbs.append(f"a=rtcp-fb:{pt} transport-cc")
        out.extend(fbs)
    return eol.join(out) + (eol if trailing else "")
