"""Adaptive jitter buffer with Opus loss concealment, for audio the robot receives.

aiortc's own audio receive path waits for every missing packet until its 16-slot buffer
overflows (kvs-signaling.md §6.3): one loss stalls audio ~300 ms and leaves latency raised.
This buffer plays on its own clock instead, the way a browser's NetEq does:

- **Playout clock.** A frame is due at ``(rtp_ts / 48000) + base + target``, where ``base``
  is the fastest transit seen recently and ``target`` the jitter allowance. When a frame is
  due something is played, whatever has or has not arrived: the buffer never stalls. When
  nothing at or after the frame due has arrived, its packet is more likely late than lost
  (a queue filling delays every packet at once): the buffer conceals and waits for it
  (NetEq's expand), up to ``max_delay_ms``; when what comes next is later (a pause, or a
  loss), the time waited counts against the gap.
- **Adaptive depth.** ``target`` is the ``quantile`` of recent transit variation plus a
  margin, clamped to ``[min_delay_ms, max_delay_ms]``. It grows at once when packets come
  late (one concealed frame inserted = +20 ms) and shrinks by playing faster when the
  link calms down (:func:`accelerate`: a pitch period less per 20 ms, no frame dropped).
  On a clean link it settles near
  ``min_delay_ms`` (20 ms), well under aiortc's fixed ~80 ms.
- **Concealment with Opus's own tools.** A missing frame is rebuilt from the in-band FEC
  (LBRR) data of the next packet when it is there and carries FEC (``opus_decode`` with
  ``decode_fec=1``), otherwise libopus packet-loss concealment (``opus_decode`` of an empty
  packet). After ``max_plc_ms`` of concealment it fades to silence.
- **NACK.** On a sequence gap, the missing packets are NACKed at once (and once more a
  frame later) while they can still be played; a retransmission that arrives in time is
  used like the original.
- **DTX.** A jump in RTP timestamp without a sequence gap is the sender's discontinuous
  transmission: it is filled with PLC/comfort output and not counted as loss.

Opus decoding is libopus through ``opuslib`` (ctypes): PyAV's decoder cannot decode FEC
data or run PLC. The module has two layers: :class:`AdaptiveJitterBuffer` (pure, clock
passed in, tested without a network) and :class:`ResilientAudioReceiver` (asyncio, fed by
the aiortc hook in :mod:`sonic_voice.kvs.aiortc_hooks`).

**Output rate.** libopus decodes at 8/12/16/24/48 kHz (``out_rate``), band-limiting and
resampling inside the decoder; the RTP timestamps stay on Opus's 48 kHz clock (RFC 7587)
and so does the whole timeline here, only PCM lengths are at ``out_rate``. The robot needs
16 kHz (``audio/remote``): decoding at 16 kHz rather than at 48 kHz and then resampling
(soxr) is what issue 10 measured (bench/rx_decode.py).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

log = logging.getLogger(__name__)

RATE = 48000  # Opus's RTP clock (RFC 7587), whatever rate the decoder gives PCM at
FRAME = 960  # 20 ms at 48 kHz, what browsers and aiortc send
# Rates libopus decodes at natively (opus_decoder_create): it band-limits and resamples
# inside the decoder, where a separate resampler afterwards costs CPU and delay.
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)


def opus_decode_rate(want: int) -> int:
    """The rate to decode at for audio wanted at ``want`` Hz: ``want`` itself when libopus
    decodes at it (no resampler afterwards), else 48 kHz (to be resampled)."""
    return want if want in OPUS_RATES else RATE


# -- Opus helpers -------------------------------------------------------------------------
def opus_packet_samples(payload: bytes, rate: int = RATE) -> int:
    """Samples (per channel, at ``rate``) in one Opus packet, from its TOC byte (RFC 6716
    §3.1). 0 for an empty or malformed packet."""
    if not payload:
        return 0
    toc = payload[0]
    config = toc >> 3
    if config < 12:  # SILK: 10, 20, 40, 60 ms
        ms10 = (1, 2, 4, 6)[config & 3]
    elif config < 16:  # hybrid: 10, 20 ms
        ms10 = (1, 2)[config & 1]
    else:  # CELT: 2.5, 5, 10, 20 ms
        ms10 = (0.25, 0.5, 1, 2)[config & 3]
    code = toc & 3
    if code == 0:
        count = 1
    elif code in (1, 2):
        count = 2
    else:
        if len(payload) < 2:
            return 0
        count = payload[1] & 0x3F
    return round(rate * 0.01 * ms10 * count)


def packet_has_fec(payload: bytes) -> bool:
    """Whether an Opus packet carries in-band FEC (LBRR) data for the previous frame.

    Same test as libwebrtc's ``WebRtcOpus_PacketHasFec``: CELT-only packets never do;
    for SILK/hybrid the LBRR flag of each channel sits right after the per-frame VAD bits
    at the start of the first frame's range-coded data.
    """
    if len(payload) < 2 or payload[0] & 0x80:  # empty, or CELT-only (config >= 16)
        return False
    config = payload[0] >> 3
    ms = (10, 20, 40, 60)[config & 3] if config < 12 else (10, 20)[config & 1]
    silk_frames = {10: 1, 20: 1, 40: 2, 60: 3}[ms]
    channels = 2 if payload[0] & 0x04 else 1
    code = payload[0] & 3
    if code == 0:
        first = payload[1:]
    elif code == 1:
        first = payload[1:]
    elif code == 2:
        if len(payload) < 3:
            return False
        size0 = payload[1]
        off = 2 if size0 < 252 else 3
        first = payload[off:] if size0 else b""
    else:
        if len(payload) < 3:
            return False
        off = 2
        if payload[1] & 0x40:  # padding
            pad = 0
            while off < len(payload):
                b = payload[off]
                off += 1
                pad += 254 if b == 255 else b
                if b != 255:
                    break
        first = payload[off:]
    if len(first) < 1:
        return False
    for ch in range(channels):
        if first[0] & (0x80 >> ((ch + 1) * (silk_frames + 1) - 1)):
            return True
    return False


def accelerate(pcm: np.ndarray, max_cut: int, rate: int = RATE) -> tuple[np.ndarray, int]:
    """``pcm`` (at ``rate``) played faster by at most ``max_cut`` samples, with its pitch
    and content kept: in each 20 ms block the best-matching period (2.5-10 ms) is
    cross-faded into the next and one copy removed, as NetEq's accelerate does; a block
    with no period that matches (correlation under 0.7) and some level is left alone.
    Returns the new PCM and the samples removed."""
    lo, hi = rate // 400, rate // 100  # 2.5 .. 10 ms
    step = max(1, rate // 12000)  # the lag grid: 4 samples (83 us) at 48 kHz, 1 at 16 kHz
    block = rate // 50  # 20 ms
    out: list[np.ndarray] = []
    cut = 0
    for b in range(0, len(pcm), block):
        seg = pcm[b : b + block]
        room = max_cut - cut
        if room < lo or len(seg) < 2 * lo:
            out.append(seg)
            continue
        x = seg.astype(np.float64)
        top = min(hi, room, len(seg) // 2)
        best, best_l = -1.0, 0
        quiet = float(np.sqrt(np.mean(x**2))) < 300
        for lag in range(lo, top + 1, step):
            a, c = x[:lag], x[lag : 2 * lag]
            den = np.sqrt(np.dot(a, a) * np.dot(c, c))
            r = np.dot(a, c) / den if den > 0 else 1.0
            if r > best:
                best, best_l = r, lag
        if best < 0.7 and not quiet:
            out.append(seg)
            continue
        lag = best_l
        w = np.linspace(0.0, 1.0, lag, endpoint=False)
        mixed = x[:lag] * (1 - w) + x[lag : 2 * lag] * w
        out.append(np.concatenate([mixed, x[2 * lag :]]).round().astype(np.int16))
        cut += lag
    return (np.concatenate(out) if out else pcm), cut


class OpusDecoder:
    """libopus decoder (via opuslib) giving mono int16 at ``rate`` (one of
    :data:`OPUS_RATES`), with FEC and PLC. Frame lengths are in samples at ``rate``.

    Decodes with opuslib's own ctypes binding of ``opus_decode``
    (``opuslib.api.decoder.libopus_decode``) into one preallocated buffer: opuslib's
    ``Decoder.decode`` allocates a buffer per call and copies the PCM out through a Python
    list of ints, which took more CPU than libopus itself (bench/rx_decode.py,
    rx_opuslib_decode_* -> rx_opus_decoder_*: 142 -> 55 us per 20 ms at 48 kHz,
    77 -> 40 us at 16 kHz).
    """

    def __init__(self, channels: int = 1, rate: int = RATE) -> None:
        import opuslib
        import opuslib.api
        import opuslib.api.decoder

        if rate not in OPUS_RATES:
            raise ValueError(f"OpusDecoder: libopus decodes at {OPUS_RATES} Hz, not {rate}")
        self.channels = channels
        self.rate = rate
        self.frame = rate // 50  # 20 ms
        self._dec = opuslib.Decoder(rate, channels)
        self._error = opuslib.OpusError
        self._opus_decode = opuslib.api.decoder.libopus_decode
        self._int16_p = opuslib.api.c_int16_pointer
        self._alloc(rate * 120 // 1000)  # Opus's longest packet: 120 ms

    def _alloc(self, frame: int) -> None:
        self._buf = np.zeros(frame * self.channels, np.int16)
        self._cap = frame
        self._ptr = self._buf.ctypes.data_as(self._int16_p)

    def _call(self, data: bytes, frame: int, fec: bool) -> int:
        if frame > self._cap:  # libopus writes up to frame samples per channel
            self._alloc(frame)
        return self._opus_decode(self._dec.decoder_state, data, len(data), self._ptr, frame, fec)

    def _run(self, data: bytes, frame: int, fec: bool) -> np.ndarray:
        n = self._call(data, frame, fec)
        if n < 0:
            log.debug("opus decode failed (%s): concealing", self._error(n))
            n = self._call(b"", frame, False)
            if n < 0:
                raise self._error(n)
        if self.channels > 1:
            pcm = self._buf[: n * self.channels].reshape(-1, self.channels)
            return pcm.mean(axis=1).astype(np.int16)
        return self._buf[:n].copy()

    def decode(self, payload: bytes) -> np.ndarray:
        n = opus_packet_samples(payload, self.rate) or self.frame
        return self._run(payload, n, False)

    def decode_fec(self, next_payload: bytes, frame: int | None = None) -> np.ndarray:
        """Rebuild the frame *before* ``next_payload`` from its FEC data (PLC if none);
        ``frame`` samples at the decoder's rate (20 ms by default)."""
        return self._run(next_payload, frame or self.frame, True)

    def conceal(self, frame: int | None = None) -> np.ndarray:
        return self._run(b"", frame or self.frame, False)


# -- sequence / timestamp unwrapping ------------------------------------------------------
class _Unwrapper:
    """Extends a wrapping counter (16-bit seq, 32-bit ts) to an int that keeps growing."""

    def __init__(self, bits: int) -> None:
        self.mod = 1 << bits
        self.half = self.mod >> 1
        self.last: int | None = None

    def __call__(self, value: int) -> int:
        if self.last is None:
            self.last = value
            return value
        delta = (value - self.last) % self.mod
        if delta >= self.half:
            delta -= self.mod
        ext = self.last + delta
        if delta > 0:
            self.last = ext
        return ext


# -- transit window -------------------------------------------------------------------------
class TransitWindow:
    """The (arrival, transit) pairs of the last ``window_s``, with the transits also kept
    sorted, so the minimum and any quantile cost O(1) per frame.

    The buffer asks for both on every played frame. Copying the window into numpy and
    running ``np.quantile`` each time took ~23 % of the KVS loop thread per viewer (profile
    on main 53e7a54, findings.md); a sorted list updated with ``bisect`` as packets come
    and go (~200 entries at 50 packets/s over 4 s: a short memmove) gives bit-identical
    results (:meth:`quantile_above_min` follows numpy's "linear" method step by step).
    """

    def __init__(self) -> None:
        self._items: deque[tuple[float, float]] = deque()
        self._sorted: list[float] = []

    def append(self, item: tuple[float, float]) -> None:
        self._items.append(item)
        bisect.insort(self._sorted, item[1])

    def popleft(self) -> tuple[float, float]:
        item = self._items.popleft()
        del self._sorted[bisect.bisect_left(self._sorted, item[1])]
        return item

    def clear(self) -> None:
        self._items.clear()
        self._sorted.clear()

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, i: int) -> tuple[float, float]:
        return self._items[i]

    def min(self) -> float:
        return self._sorted[0]

    def quantile_above_min(self, q: float) -> float:
        """``np.quantile(transits - transits.min(), q)``, without the copy."""
        s = self._sorted
        n = len(s)
        base = s[0]
        virtual = q * (n - 1)
        lo = math.floor(virtual)
        hi = min(lo + 1, n - 1)
        gamma = virtual - lo
        a, b = s[lo] - base, s[hi] - base
        diff = b - a
        # numpy's _lerp: from the nearer end, for accuracy
        return b - diff * (1 - gamma) if gamma >= 0.5 else a + diff * gamma


# -- the buffer ---------------------------------------------------------------------------
@dataclass
class JitterConfig:
    """Tuning. Defaults suit speech over the Internet; every value in milliseconds."""

    min_delay_ms: float = 20.0
    # A bottleneck queue filling (200 ms in bench/abr.py) plus a longer packet's
    # serialization (100 ms for 120 ms of Opus at 12 kbit/s) delays packets by ~300 ms
    # at once: at 240 ms every frame of such a spike was lost (NetEq has no such cap).
    max_delay_ms: float = 400.0
    initial_delay_ms: float = 30.0
    margin_ms: float = 4.0
    quantile: float = 0.97
    window_s: float = 4.0
    max_plc_ms: float = 200.0  # then fade to silence
    idle_stop_s: float = 1.0  # no packet this long: stop the clock until packets return
    nack: bool = True
    nack_retries: int = 1
    # When frames had to be concealed recently (more than this fraction in the window),
    # hold one more frame: FEC for frame n travels in packet n+1, which must be there.
    fec_hold_loss: float = 0.01
    # Deeper than the target by more than this: play frames faster (a pitch period less
    # per 20 ms) until it is half this over again.
    accelerate_over_ms: float = 20.0


@dataclass
class Frame:
    """One 20 ms (usually) output frame: mono int16 at the buffer's ``out_rate``."""

    pcm: np.ndarray
    kind: str  # "normal" | "fec" | "plc" | "dtx" | "silence" | "stretch"
    rtp_ts: int  # extended RTP timestamp the frame stands for
    due: float  # monotonic time it was due to play


@dataclass
class JitterStats:
    packets: int = 0
    fec_packets: int = 0  # packets that carried in-band FEC (LBRR) for the frame before
    duplicates: int = 0
    late: int = 0  # arrived after their frame had been played (or concealed)
    normal: int = 0
    fec: int = 0  # rebuilt from the next packet's in-band FEC
    plc: int = 0  # concealed by libopus PLC (unrecoverable loss)
    dtx: int = 0
    silence: int = 0
    stretched: int = 0  # frames inserted to grow the delay
    shrunk: int = 0  # frames played faster to cut the delay (accelerate)
    accelerated_ms: float = 0.0  # the time that cut
    nacks_sent: int = 0
    nack_recovered: int = 0
    target_ms: float = 0.0
    delays_ms: list[float] = field(default_factory=list)  # current delay per played frame

    @property
    def played(self) -> int:
        return self.normal + self.fec + self.plc + self.dtx + self.silence + self.stretched


class AdaptiveJitterBuffer:
    """Clock-driven jitter buffer; no I/O, no asyncio: ``push()`` packets as they arrive,
    ``pop_due(now)`` frames when their time comes, ``nacks_due(now)`` seqs to NACK.

    ``out_rate``: the rate of the PCM it plays (one of :data:`OPUS_RATES`; 48 kHz by
    default, what the callers comparing against a 48 kHz source use). Everything on the
    timeline (``_next_ts``, frame steps, the wait, packet lengths) stays in RTP ticks of
    Opus's 48 kHz clock; only PCM is at ``out_rate`` (:meth:`_pcm_len`). Decoding at
    16 kHz, what the robot needs, costs less than decoding at 48 kHz and resampling
    (bench/rx_decode.py).
    """

    def __init__(
        self, config: JitterConfig | None = None, channels: int = 1, out_rate: int = RATE
    ) -> None:
        self.cfg = config or JitterConfig()
        self.decoder = OpusDecoder(channels, out_rate)
        self.out_rate = out_rate
        self.stats = JitterStats(target_ms=self.cfg.initial_delay_ms)
        self._seq = _Unwrapper(16)
        self._ts = _Unwrapper(32)
        self._by_ts: dict[int, tuple[int, bytes]] = {}  # ext ts -> (ext seq, payload)
        self._transit = TransitWindow()  # (arrival, transit) of the last window_s
        self._base = 0.0
        self._target = self.cfg.initial_delay_ms / 1000
        self._next_ts: int | None = None
        self._next_due = 0.0
        self._last_seq: int | None = None  # ext seq of the last frame played from a packet
        self._highest_seq: int | None = None
        self._last_arrival = 0.0
        self._plc_run = 0
        self._dtx_run = 0  # frames concealed so far in the sender's pause (DTX)
        # RTP ticks of output inserted while waiting, on an empty buffer, for the frame due
        # (a delay spike: its packet is probably late, not lost); a packet that then comes
        # with a later timestamp (a sender's pause, or a loss) skips this much of the gap.
        self._waited = 0
        self._nack: dict[int, tuple[float, int]] = {}  # ext seq -> (next send time, tries)
        self._nacked: dict[int, float] = {}  # ext seq -> when first NACKed
        self._last_frame = FRAME  # RTP ticks
        self._losses: deque[float] = deque()  # due times of frames not played from a packet
        self.ssrc: int | None = None

    def _pcm_len(self, ticks: int) -> int:
        """Samples at ``out_rate`` for ``ticks`` of the 48 kHz RTP clock."""
        return ticks * self.out_rate // RATE

    # -- input ----------------------------------------------------------------------------
    def push(self, seq: int, timestamp: int, payload: bytes, arrival: float) -> None:
        st = self.stats
        st.packets += 1
        if packet_has_fec(payload):
            st.fec_packets += 1
        eseq = self._seq(seq)
        ets = self._ts(timestamp)
        self._last_arrival = arrival
        transit = arrival - ets / RATE
        retransmitted = eseq in self._nacked
        if not retransmitted:
            # A retransmission's transit says nothing about the path's jitter; a late
            # packet's does, and is exactly what the depth must grow for.
            self._transit.append((arrival, transit))
            while self._transit and self._transit[0][0] < arrival - self.cfg.window_s:
                self._transit.popleft()
        if self._next_ts is not None and ets < self._next_ts:
            st.late += 1
            return
        if ets in self._by_ts:
            st.duplicates += 1
            return
        if retransmitted:
            st.nack_recovered += 1
        if len(self._nacked) > 512:
            horizon = arrival - self.cfg.window_s
            self._nacked = {k: v for k, v in self._nacked.items() if v > horizon}
        self._nack.pop(eseq, None)
        if self._waited and self._next_ts is not None and ets > self._next_ts:
            # We waited for the frame due, and what came is later: the wait stands for
            # (part of) the gap, which is not played a second time (a pause after it would
            # otherwise keep the whole wait as extra delay).
            if not any(k < ets for k in self._by_ts):
                skip = min(ets - self._next_ts, self._waited)
                self._next_ts += skip
                if self._next_ts == ets and self._last_seq is not None:
                    self._last_seq = eseq - 1
            self._waited = 0
        self._by_ts[ets] = (eseq, payload)
        if self._next_ts is None:
            # First packet (or first after an idle stop): start the clock.
            self._base = transit
            self._next_ts = ets
            self._next_due = arrival + self._target
            self._highest_seq = eseq
            self._last_seq = eseq - 1
            return
        if self._highest_seq is not None and eseq > self._highest_seq:
            if self.cfg.nack and eseq > self._highest_seq + 1:
                for missing in range(self._highest_seq + 1, eseq):
                    if missing - eseq > -50:
                        self._nack[missing] = (arrival, 0)
            self._highest_seq = eseq
        if transit < self._base:
            # This packet came faster than any before: frames can be due earlier now.
            self._base = transit

    def nacks_due(self, now: float) -> list[int]:
        """Sequence numbers (16-bit) to NACK now; each is asked at most 1 + retries times,
        and only while its frame has not been played."""
        out = []
        frame_s = self._last_frame / RATE
        for eseq, (when, tries) in list(self._nack.items()):
            if self._last_seq is not None and eseq <= self._last_seq:
                del self._nack[eseq]
                continue
            if when <= now:
                out.append(eseq & 0xFFFF)
                self._nacked.setdefault(eseq, now)
                self.stats.nacks_sent += 1
                if tries >= self.cfg.nack_retries:
                    del self._nack[eseq]
                else:
                    self._nack[eseq] = (now + frame_s, tries + 1)
        return out

    # -- adaptation -----------------------------------------------------------------------
    def _update_target(self) -> None:
        if len(self._transit) < 5:
            return
        self._base = self._transit.min()
        need = self._transit.quantile_above_min(self.cfg.quantile)
        now = self._transit[-1][0]
        while self._losses and self._losses[0] < now - self.cfg.window_s:
            self._losses.popleft()
        if len(self._losses) > self.cfg.fec_hold_loss * len(self._transit):
            need += self._last_frame / RATE
        lo, hi = self.cfg.min_delay_ms / 1000, self.cfg.max_delay_ms / 1000
        self._target = min(hi, max(lo, need + self.cfg.margin_ms / 1000))
        self.stats.target_ms = self._target * 1000

    @property
    def next_due(self) -> float | None:
        """When the next frame is due (monotonic seconds), or None while idle."""
        return None if self._next_ts is None else self._next_due

    @property
    def target_ms(self) -> float:
        return self._target * 1000

    # -- output ---------------------------------------------------------------------------
    def pop_due(self, now: float) -> list[Frame]:
        """Every frame due by ``now`` (usually one; more if the caller woke up late)."""
        out: list[Frame] = []
        while self._next_ts is not None and self._next_due <= now + 0.0005:
            if now - self._last_arrival > self.cfg.idle_stop_s and not self._by_ts:
                self._idle()
                break
            out.extend(self._play_one())
        return out

    def _idle(self) -> None:
        """The sender stopped: stop the clock; the next packet starts it again."""
        self._next_ts = None
        self._transit.clear()
        self._nack.clear()
        self._seq = _Unwrapper(16)
        self._ts = _Unwrapper(32)
        self._highest_seq = self._last_seq = None

    def _play_one(self) -> list[Frame]:
        st = self.stats
        self._update_target()
        ts = self._next_ts
        due = self._next_due
        # How late this frame plays relative to its earliest possible arrival.
        delay = due - (self._base + ts / RATE)
        frame = self._last_frame  # RTP ticks (48 kHz) throughout; its PCM: _pcm_len(frame)
        entry = self._by_ts.pop(ts, None)
        # Nothing at or after this frame has come: its packet may be late rather than
        # lost (a bottleneck queue filling delays every packet at once: +100-300 ms in
        # bench/abr.py when the link falls to 12 kbit/s). Wait for it, as a browser's NetEq
        # expands without moving on, while the delay stays under max_delay_ms: conceal
        # now and play the packet when it comes, instead of concealing its frame and
        # throwing the packet away as late (which lost every frame of the spike).
        wait = (
            entry is None
            and not self._by_ts
            and self._last_seq is not None
            and delay + FRAME / RATE <= self.cfg.max_delay_ms / 1000
        )
        if wait:
            frame = min(frame, FRAME)  # wait in 20 ms steps, not a long packet's 120
        if entry is None and (wait or delay < self._target - 0.002):
            # The buffer runs too shallow for the measured jitter: grow it by one frame
            # before the frame would have to be concealed. Also in the middle of a
            # concealment run: after a delay step (a queue filling: +200 ms in
            # bench/abr.py) the first frames are concealed before any late packet shows
            # the new delay, and growing is then the only way back to playing packets
            # (without it every packet stayed "late" and the buffer played silence).
            run = self._plc_run + self._waited // frame
            silent = run * frame / RATE * 1000 >= self.cfg.max_plc_ms
            if self._last_seq is None or silent:
                pcm = np.zeros(self._pcm_len(frame), np.int16)
            else:
                pcm = self._fade(self.decoder.conceal(self._pcm_len(frame)), run)
            if wait:
                self._waited += frame
            st.stretched += 1
            self._next_due += frame / RATE
            return [Frame(pcm, "stretch", ts, due)]
        if entry is not None:
            eseq, payload = entry
            pcm = self.decoder.decode(payload)
            frame = len(pcm) * RATE // self.out_rate or FRAME
            self._last_frame = frame
            self._last_seq = eseq
            self._plc_run = 0
            self._dtx_run = 0
            self._waited = 0
            kind = "normal"
            st.normal += 1
        else:
            later = min(self._by_ts) if self._by_ts else None
            if later is not None and ts < later < ts + frame:
                # The packets got longer or shorter (abr on a thin link): conceal only up
                # to the next packet, or the step would pass its timestamp and never play it.
                frame = later - ts
            nxt = self._by_ts.get(ts + frame)
            dtx = (
                later is not None
                and self._last_seq is not None
                and self._by_ts[later][0] == self._last_seq + 1
            )
            if dtx:
                # The sender paused (DTX, pause_in_silence): its next packet is the next
                # sequence number. Not a loss, for the whole gap: conceal, fading, then
                # silence after max_plc_ms (libopus would drone on).
                kind = "dtx"
                self._dtx_run += 1
                if self._dtx_run * frame / RATE * 1000 > self.cfg.max_plc_ms:
                    pcm = np.zeros(self._pcm_len(frame), np.int16)
                else:
                    pcm = self._fade(self.decoder.conceal(self._pcm_len(frame)), self._dtx_run)
                st.dtx += 1
            elif self._plc_run * frame / RATE * 1000 >= self.cfg.max_plc_ms:
                kind = "silence"
                pcm = np.zeros(self._pcm_len(frame), np.int16)
                st.silence += 1
            elif nxt is not None and packet_has_fec(nxt[1]):
                kind = "fec"
                pcm = self.decoder.decode_fec(nxt[1], self._pcm_len(frame))
                st.fec += 1
            else:
                kind = "plc"
                pcm = self._fade(self.decoder.conceal(self._pcm_len(frame)))
                st.plc += 1
            if kind != "dtx":
                self._plc_run += 1
                self._losses.append(due)
                # A lost packet's frame: the next one expected is the next number (in a
                # DTX gap it stays the packet after the gap).
                self._last_seq = None if self._last_seq is None else self._last_seq + 1
        self._next_ts = ts + frame
        self._next_due += frame / RATE
        st.delays_ms.append(delay * 1000)
        if len(st.delays_ms) > 100000:
            del st.delays_ms[:50000]
        # Too deep for the measured jitter: play this frame faster (NetEq's accelerate),
        # a pitch period less per 20 ms, rather than drop one: a dropped frame is audio
        # the listener never hears (a 120 ms packet on a thin link, six frames: after a
        # delay spike bench/abr.py lost 6-20 frames to drops as the depth came back).
        # Only past a whole frame over (as the drop it replaces): a depth just waited up
        # to for late packets is not excess while the target has not caught up yet.
        excess = delay - self._target
        over = max(self.cfg.accelerate_over_ms / 1000, frame / RATE + 0.002)
        if kind == "normal" and excess > over:
            rate = self.out_rate
            pcm, cut = accelerate(pcm, int((excess - over / 2) * rate), rate)
            if cut:
                self._next_due -= cut / rate
                st.shrunk += 1
                st.accelerated_ms += cut * 1000 / rate
        return [Frame(pcm, kind, ts, due)]

    def _fade(self, pcm: np.ndarray, run: int | None = None) -> np.ndarray:
        """Attenuate long concealment runs (``run`` frames; the PLC run by default) so
        PLC tails off instead of droning."""
        run = self._plc_run if run is None else run
        if run < 3:
            return pcm
        g = max(0.0, 1.0 - (run - 2) * 0.2)
        return (pcm.astype(np.float32) * g).astype(np.int16)


# -- asyncio wrapper over an aiortc receiver ----------------------------------------------
_LATE_WAKE_S = 0.010  # woken this late for a frame: the loop stalled
# aiortc needs ~2 loop iterations from socket to receiver: after a stall, yield until this
# many iterations in a row brought no packet (at most _MAX_YIELDS_AFTER_STALL).
_QUIET_YIELDS = 3
_MAX_YIELDS_AFTER_STALL = 50


class ResilientAudioReceiver:
    """Plays one aiortc audio receiver through :class:`AdaptiveJitterBuffer`.

    ``on_pcm(pcm)`` gets each 20 ms of mono int16 audio at ``out_rate`` (48 kHz by
    default; any of :data:`OPUS_RATES`, decoded at that rate by libopus) on the event
    loop, paced in real time; ``on_frame(frame)`` (optional) gets the :class:`Frame` with
    its kind and RTP timestamp. :meth:`recv` is the pull alternative. Create with
    :func:`install_receiver`.
    """

    def __init__(
        self,
        receiver,
        on_pcm: Callable[[np.ndarray], None] | None = None,
        config: JitterConfig | None = None,
        on_frame: Callable[[Frame], None] | None = None,
        queue_frames: int = 50,
        out_rate: int = RATE,
    ) -> None:
        from sonic_voice.kvs import aiortc_hooks

        self.receiver = receiver
        self.buffer = AdaptiveJitterBuffer(config, out_rate=out_rate)
        self.out_rate = out_rate
        self.on_pcm = on_pcm
        self.on_frame = on_frame
        self._queue: asyncio.Queue[Frame] = asyncio.Queue(maxsize=queue_frames)
        self._wake = asyncio.Event()
        self._ssrc: int | None = None
        self._nack_tasks: set[asyncio.Task] = set()
        self._hooks = aiortc_hooks
        self.sink = aiortc_hooks.tap_rtp(receiver, self._on_packet)
        self._task = asyncio.get_running_loop().create_task(self._run(), name="jitter-playout")

    @property
    def stats(self) -> JitterStats:
        return self.buffer.stats

    def _on_packet(self, pkt) -> None:
        self._ssrc = pkt.ssrc
        idle = self.buffer.next_due is None
        self.buffer.push(pkt.seq, pkt.timestamp, pkt.payload, pkt.arrival)
        if idle or self.buffer._nack:
            self._wake.set()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                due = self.buffer.next_due
                if due is None:
                    self._wake.clear()
                    await self._wake.wait()
                    continue
                now = time.monotonic()
                wait = due - now
                nack_soon = min((w for w, _ in self.buffer._nack.values()), default=None)
                if nack_soon is not None:
                    wait = min(wait, nack_soon - now)
                if wait > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), wait)
                    except TimeoutError:
                        pass
                now = time.monotonic()
                due = self.buffer.next_due
                if due is not None and now - due > _LATE_WAKE_S:
                    # Woken late: the event loop was blocked, and the packets that came
                    # meanwhile still sit in the socket, unread. Let aiortc's receive chain
                    # (datagram -> ICE/DTLS task -> receiver) hand them over before deciding
                    # that their frames are missing, or a stall alone becomes a run of
                    # concealed frames followed by "late" packets thrown away.
                    await self._let_io_in()
                    now = time.monotonic()
                lost = self.buffer.nacks_due(now)
                if lost and self._ssrc is not None:
                    task = loop.create_task(self._hooks.send_nack(self.receiver, self._ssrc, lost))
                    self._nack_tasks.add(task)
                    task.add_done_callback(self._nack_tasks.discard)
                for frame in self.buffer.pop_due(now):
                    self._deliver(frame)
        except asyncio.CancelledError:
            pass

    async def _let_io_in(self) -> None:
        """Yield to the loop until packets stop coming in (a few iterations after the last
        one; bounded), so a backlog read after a stall reaches the buffer first."""
        quiet = 0
        for _ in range(_MAX_YIELDS_AFTER_STALL):
            before = self.buffer.stats.packets
            await asyncio.sleep(0)
            quiet = quiet + 1 if self.buffer.stats.packets == before else 0
            if quiet >= _QUIET_YIELDS:
                return

    def _deliver(self, frame: Frame) -> None:
        if self.on_frame is not None:
            self.on_frame(frame)
        if self.on_pcm is not None:
            self.on_pcm(frame.pcm)
        if self._queue.full():
            self._queue.get_nowait()  # the consumer fell behind: keep the newest audio
        self._queue.put_nowait(frame)

    async def recv(self) -> Frame:
        """Next frame (pull alternative to ``on_pcm``)."""
        return await self._queue.get()

    @property
    def task(self) -> asyncio.Task:
        """The playout task (ends after :meth:`stop`), for owners that track their tasks."""
        return self._task

    def stop(self) -> None:
        """Stop playing out (the peer is going); pending NACK sends are cancelled too."""
        self._task.cancel()
        for task in list(self._nack_tasks):
            task.cancel()


def install_receiver(
    pc,
    track_or_receiver,
    on_pcm: Callable[[np.ndarray], None] | None = None,
    config: JitterConfig | None = None,
    on_frame: Callable[[Frame], None] | None = None,
    *,
    out_rate: int = RATE,
    on_pcm48k: Callable[[np.ndarray], None] | None = None,
) -> ResilientAudioReceiver:
    """Replace aiortc's audio receive path for one remote audio track.

    Call from ``pc.on("track")`` (before media flows), with the track or its
    ``RTCRtpReceiver``. Must run on the peer connection's event loop. The track's own
    ``recv()`` then yields nothing; audio comes through ``on_pcm`` / ``recv()``, mono int16
    at ``out_rate`` (one of :data:`OPUS_RATES`; :func:`opus_decode_rate` picks it for a
    wanted rate). ``on_pcm48k`` is the former name of ``on_pcm``, for 48 kHz only.
    """
    if out_rate not in OPUS_RATES:
        raise ValueError(
            f"install_receiver: out_rate {out_rate} is not a rate libopus decodes at "
            f"{OPUS_RATES}; decode at opus_decode_rate(rate) and resample"
        )
    if on_pcm48k is not None:
        if on_pcm is not None or out_rate != RATE:
            raise ValueError(
                "install_receiver: on_pcm48k (48 kHz) is the old name of on_pcm; pass "
                "on_pcm alone, with out_rate for another rate"
            )
        on_pcm = on_pcm48k
    receiver = track_or_receiver
    if not hasattr(receiver, "_handle_rtp_packet"):
        matches = [r for r in pc.getReceivers() if r.track is track_or_receiver]
        if not matches:
            raise ValueError("install_receiver: the track belongs to no receiver of this pc")
        receiver = matches[0]
    if receiver.track is not None and receiver.track.kind != "audio":
        raise ValueError("install_receiver is for audio tracks")
    return ResilientAudioReceiver(receiver, on_pcm, config, on_frame, out_rate=out_rate)
