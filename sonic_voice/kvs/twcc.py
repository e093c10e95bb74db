"""Transport-wide congestion control feedback (draft-holmer-rmcat-transport-wide-cc-
extensions-01): the RTCP message, both ends of it, and what a sender learns from it.
Pure (no I/O, no clock of its own); ``net_hooks`` wires it into aiortc.

Why: a receiver report comes every 0.5-1.5 s (aiortc) or ~5 s (a browser about audio), so
a loss-based sender answers a link that fell 64 -> 12 kbit/s only after it has lost most
of a second of audio (bench/abr.py). With transport-cc the receiver tells the sender, every
~100 ms, the arrival time of every packet it got (and which it did not); the sender sees
its packets' one-way delay grow as the bottleneck queue fills, and how fast the link
actually delivered them, and can cut to that rate before the queue overflows.

- :func:`build_feedback` / :func:`parse_feedback`: the RTCP RTPFB message (PT 205,
  FMT 15) as the draft defines it: run-length and status vector chunks, 250 µs receive
  deltas, a 24-bit reference time in 64 ms units, padded to a 32-bit boundary the way
  libwebrtc does (the P bit set, the last byte counting the padding).
- :class:`ArrivalRecorder` (receiver side): note each packet's transport-wide sequence
  number and arrival time; :meth:`ArrivalRecorder.feedback` returns the message for
  everything since the last one.
- :class:`SendHistory` (sender side): note each packet sent (sequence number, time, size);
  :meth:`SendHistory.on_feedback` matches a message to them and returns a
  :class:`TwccSummary`: loss, queueing delay (one-way delay over its recent minimum: the
  two clocks' offset cancels out) and the rate the link delivered.
"""

from __future__ import annotations

import struct
from collections import deque
from dataclasses import dataclass

URI = "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01"
RTCP_RTPFB = 205
FMT = 15
DELTA_US = 250  # receive delta unit
REF_US = 64000  # reference time unit
MAX_STATUS = 0xFFFF
_NOT_RECEIVED, _SMALL, _LARGE = 0, 1, 2
# IPv4 20 + UDP 8 + SRTP auth tag 10: what a packet costs on the wire besides its RTP bytes.
WIRE_EXTRA_BYTES = 38


def unwrap16(last: int | None, seq: int) -> int:
    """A 16-bit sequence number as a monotonic integer, next to ``last`` (unwrapped)."""
    if last is None:
        return seq
    delta = (seq - (last & 0xFFFF) + 0x8000) % 0x10000 - 0x8000
    return last + delta


@dataclass(frozen=True)
class Feedback:
    """One transport-cc message: ``arrivals[i]`` is packet ``base_seq + i``'s arrival in
    µs on the receiver's clock (reference time included), or None if not received."""

    sender_ssrc: int
    media_ssrc: int
    base_seq: int  # 16 bit
    fb_count: int  # 8 bit, counts messages (the sender spots a lost one)
    arrivals: tuple[int | None, ...]


def _delta_symbol(d: int) -> int:
    return _SMALL if 0 <= d <= 0xFF else _LARGE


def build_feedback(
    sender_ssrc: int,
    media_ssrc: int,
    base_seq: int,
    fb_count: int,
    arrivals: list[int | None] | tuple[int | None, ...],
) -> bytes:
    """The RTCP message for ``arrivals`` (µs, None = not received) from ``base_seq`` on.

    The first received packet's arrival sets the reference time (rounded down to 64 ms);
    each receive delta (250 µs units, from the previous received packet) must fit 16 bits
    signed, so the caller keeps one message within ~8 s of arrivals (ArrivalRecorder does).
    """
    if not arrivals or len(arrivals) > MAX_STATUS:
        raise ValueError(f"transport-cc: 1..{MAX_STATUS} packets per message, not {len(arrivals)}")
    first = next((a for a in arrivals if a is not None), None)
    if first is None:
        raise ValueError("transport-cc: a message reports at least one received packet")
    ref = first // REF_US
    prev = ref * REF_US
    symbols: list[int] = []
    deltas = bytearray()
    for a in arrivals:
        if a is None:
            symbols.append(_NOT_RECEIVED)
            continue
        d = (a - prev) // DELTA_US
        # Keep rounding errors from accumulating: the next delta counts from where this
        # one put the packet, not from its exact arrival.
        prev += d * DELTA_US
        sym = _delta_symbol(d)
        if sym == _SMALL:
            deltas.append(d)
        elif -0x8000 <= d <= 0x7FFF:
            deltas += struct.pack("!h", d)
        else:
            raise ValueError("transport-cc: receive delta out of range (over ~8 s)")
        symbols.append(sym)
    chunks = _encode_chunks(symbols)
    body = struct.pack(
        "!IIHHI",
        sender_ssrc & 0xFFFFFFFF,
        media_ssrc & 0xFFFFFFFF,
        base_seq & 0xFFFF,
        len(arrivals),
        ((ref & 0xFFFFFF) << 8) | (fb_count & 0xFF),
    )
    body += b"".join(struct.pack("!H", c) for c in chunks) + bytes(deltas)
    pad = (-len(body)) % 4
    if pad:
        body += bytes(pad - 1) + bytes([pad])
    length = (len(body) + 4) // 4 - 1
    first_byte = 0x80 | (0x20 if pad else 0) | FMT
    return struct.pack("!BBH", first_byte, RTCP_RTPFB, length) + body


def _encode_chunks(symbols: list[int]) -> list[int]:
    """Packet status chunks: a run-length chunk for a run of 7 or more equal symbols (it
    says at least as much as a vector), else a status vector chunk: 14 one-bit symbols
    when no "large delta" is among them, else 7 two-bit ones. A last vector that is not
    full is padded with "not received"; the status count tells the reader where to stop."""
    out: list[int] = []
    i, n = 0, len(symbols)
    while i < n:
        run = 1
        while i + run < n and symbols[i + run] == symbols[i] and run < 0x1FFF:
            run += 1
        if run >= 7:
            out.append((symbols[i] << 13) | run)
            i += run
            continue
        window = symbols[i : i + 14]
        if _LARGE not in window:
            chunk = 0x8000
            for k, s in enumerate(window):
                chunk |= s << (13 - k)
        else:
            window = symbols[i : i + 7]
            chunk = 0xC000
            for k, s in enumerate(window):
                chunk |= s << (2 * (6 - k))
        out.append(chunk)
        i += len(window)
    return out


def parse_feedback(data: bytes) -> Feedback:
    """Parse one transport-cc RTCP message (header included). ValueError when malformed."""
    if len(data) < 20:
        raise ValueError("transport-cc: message shorter than 20 bytes")
    first, pt, length = struct.unpack("!BBH", data[:4])
    if first >> 6 != 2 or pt != RTCP_RTPFB or first & 0x1F != FMT:
        raise ValueError("transport-cc: not an RTPFB FMT 15 message")
    end = (length + 1) * 4
    if end > len(data):
        raise ValueError("transport-cc: length field past the end of the data")
    body = data[4:end]
    if first & 0x20:
        pad = body[-1]
        if not 0 < pad <= len(body) - 16:
            raise ValueError("transport-cc: bad padding")
        body = body[:-pad]
    return parse_fci(body)


def parse_fci(body: bytes) -> Feedback:
    """Parse the message after its 4-byte RTCP header (padding removed)."""
    if len(body) < 16:
        raise ValueError("transport-cc: message shorter than its fixed fields")
    sender, media, base, count, ref_fb = struct.unpack("!IIHHI", body[:16])
    ref = ref_fb >> 8
    if ref & 0x800000:  # 24-bit signed
        ref -= 1 << 24
    pos = 16
    symbols: list[int] = []
    while len(symbols) < count:
        if pos + 2 > len(body):
            raise ValueError("transport-cc: packet chunks end early")
        (chunk,) = struct.unpack("!H", body[pos : pos + 2])
        pos += 2
        if not chunk & 0x8000:
            sym, run = (chunk >> 13) & 3, chunk & 0x1FFF
            if sym == 3:
                raise ValueError("transport-cc: reserved status symbol")
            symbols += [sym] * run
        elif not chunk & 0x4000:
            symbols += [(chunk >> (13 - k)) & 1 for k in range(14)]
        else:
            syms = [(chunk >> (2 * (6 - k))) & 3 for k in range(7)]
            if 3 in syms[: count - len(symbols)]:
                raise ValueError("transport-cc: reserved status symbol")
            symbols += syms
    del symbols[count:]
    at = ref * REF_US
    arrivals: list[int | None] = []
    for s in symbols:
        if s == _NOT_RECEIVED:
            arrivals.append(None)
            continue
        if s == _SMALL:
            if pos + 1 > len(body):
                raise ValueError("transport-cc: receive deltas end early")
            d = body[pos]
            pos += 1
        else:
            if pos + 2 > len(body):
                raise ValueError("transport-cc: receive deltas end early")
            (d,) = struct.unpack("!h", body[pos : pos + 2])
            pos += 2
        at += d * DELTA_US
        arrivals.append(at)
    return Feedback(sender, media, base, ref_fb & 0xFF, tuple(arrivals))


class ArrivalRecorder:
    """Receiver side: :meth:`on_packet` for every RTP packet with a transport-wide
    sequence number, :meth:`feedback` every ~100 ms for the message to send (None when
    nothing arrived since the last one). Packets that arrive after they were reported
    missing are not reported again (libwebrtc does the same by default)."""

    def __init__(self, sender_ssrc: int, max_packets: int = 1000) -> None:
        self.sender_ssrc = sender_ssrc
        self.media_ssrc = 0
        self.max_packets = max_packets
        self._arrivals: dict[int, int] = {}  # unwrapped seq -> arrival µs
        self._last: int | None = None  # last unwrapped seq seen
        self._next: int | None = None  # first seq not reported yet
        self._count = 0

    def on_packet(self, seq: int, arrival_s: float, media_ssrc: int = 0) -> None:
        u = unwrap16(self._last, seq & 0xFFFF)
        self._last = u if self._last is None else max(self._last, u)
        if media_ssrc:
            self.media_ssrc = media_ssrc
        if self._next is None:
            self._next = u
        if u < self._next:
            return  # already reported (missing): too late
        self._arrivals[u] = int(arrival_s * 1_000_000)

    def feedback(self) -> bytes | None:
        if self._next is None or not self._arrivals:
            return None
        hi = max(self._arrivals)
        start = self._next
        end = min(hi, start + self.max_packets - 1)
        arrivals = [self._arrivals.pop(s, None) for s in range(start, end + 1)]
        # The deltas of one message must fit 16 bits (~8 s): a longer span is cut short.
        first = next(a for a in arrivals if a is not None)
        for k, a in enumerate(arrivals):
            if a is not None and abs(a - first) > 8_000_000:
                for s, b in zip(range(start + k, end + 1), arrivals[k:], strict=True):
                    if b is not None:
                        self._arrivals[s] = b
                arrivals = arrivals[:k]
                end = start + k - 1
                break
        self._next = end + 1
        msg = build_feedback(self.sender_ssrc, self.media_ssrc, start, self._count, arrivals)
        self._count = (self._count + 1) & 0xFF
        return msg


@dataclass(frozen=True)
class TwccSummary:
    """What one feedback message says about the path, for the rate controller."""

    at: float  # when it arrived (the sender's clock)
    packets: int  # packets it reports on (received or not)
    lost: int
    # The newest received packet's one-way delay over its recent minimum: the queue, plus
    # how much longer than the fastest packet this one took to serialize (a link that got
    # slower shows here too).
    queue_s: float
    # Wire bit/s the link carried while it was busy: over the last ``rate_window_s``, the
    # bytes of each packet sent while its predecessor was still in the queue or on the
    # wire (so the link, not the sender, set its pace), over their arrival gaps. None: no
    # such pair (the link kept up with the sender).
    link_bps: float | None
    busy_pairs: int  # how many such pairs that estimate rests on
    # The newest received packet's one-way delay, the clocks' offset included: only its
    # changes mean something (a link that grew takes our packets faster: AbrController).
    owd_s: float | None = None

    @property
    def fraction_lost(self) -> float:
        return self.lost / self.packets if self.packets else 0.0


class SendHistory:
    """Sender side: :meth:`on_send` for every packet (its transport-wide sequence number,
    send time, RTP bytes); :meth:`on_feedback` turns a :class:`Feedback` into a
    :class:`TwccSummary`. One-way delays use the receiver's clock for arrivals and ours for
    sends; only their changes matter, so the offset of the clocks cancels."""

    def __init__(
        self,
        window_s: float = 10.0,
        rate_window_s: float = 0.5,
        extra_bytes: int = WIRE_EXTRA_BYTES,
        busy_wait_s: float = 0.05,
    ) -> None:
        # A packet that waited this long behind others counts as sent into a busy link.
        self.busy_wait_s = busy_wait_s
        # Bytes a packet costs on the link besides the size given to on_send (IPv4, UDP
        # and SRTP's tag for RTP bytes; 0 for a link that counts only what is given).
        self.extra_bytes = extra_bytes
        self.window_s = window_s
        self.rate_window_s = rate_window_s
        self._sent: dict[int, tuple[float, int]] = {}  # unwrapped seq -> (sent s, bytes)
        self._order: deque[int] = deque()
        self._last_seq: int | None = None
        self._fb_last: int | None = None  # last unwrapped base seq of a feedback
        # (sent, one-way delay) of the last window_s, kept as a sliding minimum: each entry
        # has a smaller delay than every later one, so the first is the window's minimum.
        self._owd: deque[tuple[float, float]] = deque()
        self._prev: tuple[float, float] | None = None  # (sent, arrival) of the last received
        self._busy: deque[tuple[float, int, float]] = deque()  # (arrival, wire bytes, gap)
        self.next_seq = 0

    def _floor(self) -> float:
        return self._owd[0][1] if self._owd else float("inf")

    def take_seq(self) -> int:
        """The next transport-wide sequence number (16 bit) to put on a packet."""
        s = self.next_seq & 0xFFFF
        self.next_seq += 1
        return s

    def on_send(self, seq: int, sent_s: float, size: int) -> None:
        u = unwrap16(self._last_seq, seq & 0xFFFF)
        self._last_seq = u
        self._sent[u] = (sent_s, size)
        self._order.append(u)
        while len(self._order) > 4096:
            self._sent.pop(self._order.popleft(), None)

    def on_feedback(self, fb: Feedback, at: float) -> TwccSummary:
        base = unwrap16(self._fb_last if self._fb_last is not None else self._last_seq, fb.base_seq)
        self._fb_last = base
        lost = known = 0
        newest: float | None = None
        for i, arr in enumerate(fb.arrivals):
            sent = self._sent.pop(base + i, None)
            if sent is None:
                continue  # not ours, reported already, or older than the history
            known += 1
            if arr is None:
                lost += 1
                continue
            t_sent, size = sent
            arr_s = arr / 1_000_000
            owd = arr_s - t_sent
            floor = min(owd, self._floor())
            while self._owd and self._owd[-1][1] >= owd:
                self._owd.pop()
            self._owd.append((t_sent, owd))
            newest = owd
            if self._prev is not None:
                p_sent, p_arr = self._prev
                gap = arr_s - p_arr
                # Sent while its predecessor was still queued or on the wire (that one's
                # delay over the floor outlasted the send gap), or itself waited longer
                # than that gap and over ``busy_wait_s`` (behind RTCP, or the first packet
                # into a link that just fell: its predecessor had gone through at the old
                # rate): the link was busy from one arrival to the next, so this packet's
                # bytes over the gap is its rate (or less: what else it served is not
                # counted, which on a thin link is our own RTCP, that must fit too).
                wait = max((p_arr - p_sent) - floor, 0.0)
                own = owd - floor
                if own > self.busy_wait_s:
                    wait = max(wait, own)
                if gap > 0 and wait > t_sent - p_sent:
                    self._busy.append((arr_s, size + self.extra_bytes, gap))
            self._prev = (t_sent, arr_s)
        while self._owd and self._owd[0][0] < at - self.window_s:
            self._owd.popleft()
        queue = 0.0
        if newest is not None and self._owd:
            queue = max(0.0, newest - self._floor())
        if self._prev is not None:
            while self._busy and self._busy[0][0] < self._prev[1] - self.rate_window_s:
                self._busy.popleft()
        rate = None
        if self._busy:
            rate = sum(b for _, b, _ in self._busy) * 8 / sum(g for _, _, g in self._busy)
        return TwccSummary(at, known, lost, queue, rate, len(self._busy), newest)
