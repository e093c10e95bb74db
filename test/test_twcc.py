"""Transport-wide congestion control feedback (sonic_voice/kvs/twcc.py), in milliseconds:
the message against a hand-assembled one, round trips of any arrival pattern, malformed
input, both ends' bookkeeping and what a sender learns from a simulated bottleneck."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sonic_voice.kvs import twcc as twcc_mod
from sonic_voice.kvs.twcc import (
    ArrivalRecorder,
    SendHistory,
    build_feedback,
    parse_feedback,
    unwrap16,
)

pytestmark = pytest.mark.timeout(60)


def test_message_matches_one_assembled_by_hand() -> None:
    """Two received packets (a small and a large delta) around a lost one: reference time
    1 (64 ms), one two-bit status vector, deltas 4 (1 ms) and 280 (70 ms), three bytes of
    padding with the P bit set."""
    msg = build_feedback(1, 2, 10, 3, [65_000, None, 135_000])
    assert msg.hex() == ("afcd00060000000100000002000a000300000103d200040118000003")
    fb = parse_feedback(msg)
    assert (fb.sender_ssrc, fb.media_ssrc, fb.base_seq, fb.fb_count) == (1, 2, 10, 3)
    assert fb.arrivals == (65_000, None, 135_000)


def test_a_message_of_another_implementation_parses() -> None:
    """A message as pion/rtcp's tests carry it (its example 4): one run-length chunk of
    7 small deltas (19, 9, 9, 4, 3, 3, 4 ms), reference time 1074030, padded by 3."""
    msg = bytes.fromhex("afcd0007fa17fa17193dd8bb0004000710636e0120074c2424100c0c10000003")
    fb = parse_feedback(msg)
    assert (fb.sender_ssrc, fb.media_ssrc, fb.base_seq, fb.fb_count) == (
        4195875351,
        423483579,
        4,
        1,
    )
    t, want = 1074030 * 64_000, []
    for d_ms in (19, 9, 9, 4, 3, 3, 4):
        t += d_ms * 1000
        want.append(t)
    assert fb.arrivals == tuple(want)
    # Ours for the same arrivals: the same chunk and deltas (the padding too).
    assert build_feedback(4195875351, 423483579, 4, 1, want) == msg


def test_a_run_of_received_packets_is_one_run_length_chunk() -> None:
    arrivals = [1_000 * k for k in range(20)]
    msg = build_feedback(7, 8, 65530, 0, arrivals)
    assert msg[20:22].hex() == "2014"  # symbol 1 ("small delta"), run 20
    fb = parse_feedback(msg)
    assert fb.base_seq == 65530 and fb.arrivals == tuple(arrivals)
    assert len(msg) % 4 == 0


arrival_lists = st.lists(
    st.one_of(st.none(), st.integers(min_value=-2_000_000, max_value=2_000_000)),
    min_size=1,
    max_size=300,
).filter(lambda xs: any(x is not None for x in xs))


@settings(max_examples=300, deadline=None)
@given(arrival_lists, st.integers(0, 0xFFFF), st.integers(0, 0xFF))
def test_any_arrival_pattern_round_trips_to_within_250_us(
    offsets: list[int | None], base: int, count: int
) -> None:
    """Losses anywhere, reordering (negative deltas), runs: every packet comes back with its
    status, each arrival within one 250 µs tick below its true time (no drift)."""
    start = 5_000_000_000
    arrivals = [None if o is None else start + o for o in offsets]
    fb = parse_feedback(build_feedback(0x1234, 0x5678, base, count, arrivals))
    assert fb.base_seq == base and fb.fb_count == count
    assert len(fb.arrivals) == len(arrivals)
    for got, want in zip(fb.arrivals, arrivals, strict=True):
        if want is None:
            assert got is None
        else:
            assert got is not None and 0 <= want - got < 250


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=80))
def test_garbage_is_a_value_error(data: bytes) -> None:
    head = bytes([0x8F, 205, 0, (len(data) + 4) // 4]) if len(data) > 8 else b""
    for blob in (data, head + data):
        try:
            parse_feedback(blob)
        except ValueError:
            pass


def test_malformed_messages_are_refused_with_a_reason() -> None:
    good = build_feedback(1, 2, 10, 3, [65_000, None, 135_000])
    with pytest.raises(ValueError, match="shorter"):
        parse_feedback(good[:12])
    with pytest.raises(ValueError, match="not an RTPFB FMT 15"):
        parse_feedback(bytes([good[0] & 0xE0 | 1]) + good[1:])  # a NACK
    with pytest.raises(ValueError, match="past the end"):
        parse_feedback(good[:-4])
    truncated = bytearray(build_feedback(1, 2, 10, 3, [1_000 * k for k in range(20)]))
    truncated[14:16] = (40).to_bytes(2, "big")  # status count 40: the run says 20
    with pytest.raises(ValueError, match="end early"):
        parse_feedback(bytes(truncated))
    with pytest.raises(ValueError, match="at least one received"):
        build_feedback(1, 2, 0, 0, [None, None])


def test_unwrap16() -> None:
    assert unwrap16(None, 65535) == 65535
    assert unwrap16(65535, 0) == 65536
    assert unwrap16(65536, 65534) == 65534
    assert unwrap16(10, 5) == 5


def test_recorder_reports_each_packet_once_across_the_wrap() -> None:
    rec = ArrivalRecorder(sender_ssrc=99)
    assert rec.feedback() is None
    for seq, t in ((65534, 1.000), (65535, 1.020), (1, 1.050), (0, 1.055)):  # 0 reordered
        rec.on_packet(seq, t, media_ssrc=42)
    fb = parse_feedback(rec.feedback() or b"")
    assert (fb.sender_ssrc, fb.media_ssrc, fb.base_seq, fb.fb_count) == (99, 42, 65534, 0)
    assert [a // 1000 if a is not None else None for a in fb.arrivals] == [1000, 1020, 1055, 1050]
    assert rec.feedback() is None  # nothing new
    rec.on_packet(3, 1.100)  # 2 is missing
    fb = parse_feedback(rec.feedback() or b"")
    assert fb.base_seq == 2 and fb.fb_count == 1
    assert fb.arrivals[0] is None and fb.arrivals[1] is not None
    rec.on_packet(2, 1.200)  # reported missing already: too late
    assert rec.feedback() is None


def test_recorder_splits_a_span_over_8_s() -> None:
    rec = ArrivalRecorder(sender_ssrc=1)
    rec.on_packet(0, 0.0)
    rec.on_packet(1, 9.0)
    first = parse_feedback(rec.feedback() or b"")
    second = parse_feedback(rec.feedback() or b"")
    assert (first.base_seq, len(first.arrivals)) == (0, 1)
    assert (second.base_seq, len(second.arrivals)) == (1, 1)


def _bottleneck(rate_bps: float, send_every: float, size: int, seconds: float, queue_s: float):
    """(seq, sent, arrival or None, size) of packets through a FIFO drained at ``rate_bps``
    (wire bytes), tail-drop past ``queue_s`` of queue, 30 ms of propagation."""
    busy, out, t, seq = 0.0, [], 0.0, 0
    while t < seconds:
        start = max(t, busy)
        if start - t > queue_s:
            out.append((seq, t, None, size))
        else:
            busy = start + (size + 38) * 8 / rate_bps
            out.append((seq, t, busy + 0.030, size))
        t += send_every
        seq += 1
    return out


def test_sender_sees_the_queue_and_the_links_rate() -> None:
    """Through an idle 64 kbit/s link the queue stays near 0; 58 kbit/s of packets into a
    12 kbit/s link: within 0.2 s the queue shows, the delivered rate reads ~12 kbit/s,
    and the losses are counted."""
    hist = SendHistory()
    clock_offset = 1234.5  # the receiver's clock is elsewhere: only differences matter
    rec = ArrivalRecorder(sender_ssrc=1)

    def run(pkts: list, t0: float, seq0: int) -> list:
        out = []
        for seq, sent, arr, size in pkts:
            hist.on_send((seq0 + seq) & 0xFFFF, t0 + sent, size)
            if arr is not None:
                rec.on_packet((seq0 + seq) & 0xFFFF, t0 + arr + clock_offset)
        # feedback every 100 ms of arrivals
        msg = rec.feedback()
        while msg is not None:
            out.append(hist.on_feedback(parse_feedback(msg), at=t0 + 1.0))
            msg = rec.feedback()
        return out

    rec.max_packets = 5  # one message per 100 ms of 20 ms packets
    calm = run(_bottleneck(64_000, 0.020, 107, 2.0, 0.2), 0.0, 0)
    assert max(s.queue_s for s in calm) < 0.005
    assert sum(s.lost for s in calm) == 0
    assert all(s.link_bps is None for s in calm)  # the sender set the pace, not the link
    thin = run(_bottleneck(12_000, 0.020, 107, 2.0, 0.2), 10.0, 100)
    assert thin[1].queue_s > 0.1  # second message: 100-200 ms into the fall
    assert sum(s.lost for s in thin) > 50
    assert thin[1].link_bps is not None and abs(thin[1].link_bps - 12_000) < 100
    assert all(s.link_bps is not None and abs(s.link_bps - 12_000) < 100 for s in thin[1:])


def test_munge_sdp_asks_for_transport_cc_feedback_on_opus_only_when_told() -> None:
    from sonic_voice.kvs.opus_send import munge_sdp

    sdp = (
        "v=0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96 0\r\n"
        "a=rtpmap:96 opus/48000/2\r\na=rtpmap:0 PCMU/8000\r\n"
    )
    plain, cc = munge_sdp(sdp), munge_sdp(sdp, transport_cc=True)
    assert "transport-cc" not in plain
    assert cc.count("a=rtcp-fb:96 transport-cc") == 1 and "a=rtcp-fb:0" not in cc
    assert munge_sdp(cc, transport_cc=True) == cc  # idempotent


def test_sequence_numbers_count_up_and_wrap_at_16_bits() -> None:
    hist = twcc_mod.SendHistory()
    hist.next_seq = 65534
    assert [hist.take_seq() for _ in range(4)] == [65534, 65535, 0, 1]
    fresh = twcc_mod.SendHistory()
    assert [fresh.take_seq() for _ in range(3)] == [0, 1, 2]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.booleans(), st.integers(0, 40_000)), min_size=1, max_size=300),
    st.integers(0, 0xFFFF),
    st.integers(1, 40),
)
def test_both_ends_agree_on_what_was_lost(
    fate: list[tuple[bool, int]], first_seq: int, every: int
) -> None:
    """Packets sent 20 ms apart (sequence numbers from anywhere, wrapping), each arriving
    after a delay of up to 40 ms (so out of order) or never; the receiver sends feedback
    after every ``every`` arrivals. What the sender learns matches a model by send index:
    each message covers from the first packet not yet reported to the highest arrived,
    the ones not there yet are lost (a later arrival is not reported again), and packets
    before the first one the receiver saw are never reported."""
    hist = twcc_mod.SendHistory()
    rec = ArrivalRecorder(sender_ssrc=9)
    arrivals = []
    for i, (arrives, delay_us) in enumerate(fate):
        hist.on_send((first_seq + i) & 0xFFFF, i * 0.02, 100)
        if arrives:
            arrivals.append((i * 0.02 + delay_us / 1e6, i))
    arrivals.sort()
    got = [0, 0]  # packets reported, of which lost
    want = [0, 0]
    nxt: int | None = None
    pending: set[int] = set()
    for k, (t, i) in enumerate(arrivals, 1):
        rec.on_packet((first_seq + i) & 0xFFFF, t)
        if nxt is None:
            nxt = i
        if i >= nxt:
            pending.add(i)
        if k % every == 0 or k == len(arrivals):
            msg = rec.feedback()
            assert (msg is None) == (not pending)
            if msg is not None:
                s = hist.on_feedback(parse_feedback(msg), t)
                got[0] += s.packets
                got[1] += s.lost
                hi = max(pending)
                want[0] += hi - nxt + 1
                want[1] += hi - nxt + 1 - len(pending)
                nxt, pending = hi + 1, set()
    assert got == want


def test_the_first_packet_into_a_fallen_link_gives_its_rate() -> None:
    """The link falls 64 -> 12 kbit/s just after a packet went through (the first after
    the fall waits behind a 96-byte sender report, then crosses slowly): its predecessor
    was not queued, so by the old rule there was no busy pair and the first cut was a
    blind x0.7 (58.6 -> 41 kbit/s), the real one 100 ms later. The packet's own wait
    (over busy_wait_s and its send gap) shows the link was busy: its rate is read at
    once, at most ~12 kbit/s (the report's bytes are not counted: less, never more)."""
    hist = SendHistory()
    t = 0.0
    for i in range(50):  # 1 s at 64 kbit/s: 144 wire bytes every 20 ms, 18 ms across
        hist.on_send(i, t + i * 0.02, 106)
    arrivals: list[int | None] = [int((i * 0.02 + 0.028) * 1e6) for i in range(50)]
    calm = hist.on_feedback(twcc_mod.Feedback(1, 0, 0, 0, tuple(arrivals)), at=1.0)
    assert calm.link_bps is None and calm.queue_s < 0.001
    # Packet 50 sent at 1.0 s: the report (64 ms at 12 kbit/s), then itself (96 ms).
    hist.on_send(50, 1.0, 106)
    fb = twcc_mod.Feedback(1, 0, 50, 1, (int((1.0 + 0.010 + 0.064 + 0.096) * 1e6),))
    s = hist.on_feedback(fb, at=1.2)
    assert s.queue_s > 0.1
    assert s.link_bps is not None and 6_000 < s.link_bps <= 12_000, s.link_bps
