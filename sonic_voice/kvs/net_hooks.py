"""The network side's reach into aiortc/aioice internals, in one place (like aiortc_hooks.py).

- :func:`selected_pair`: which candidate pair ICE nominated (aiortc has no
  ``getSelectedCandidatePair``): ``RTCIceTransport._connection`` (the aioice
  ``Connection``) and its ``_nominated`` dict. Used to report "connected through the TURN
  relay" and by the NAT tests to prove it.
- :func:`consent_timing`: aioice checks consent (RFC 7675) every ``CONSENT_INTERVAL`` = 5 s
  and gives up after ``CONSENT_FAILURES`` = 6 misses; then, before the peer is reported
  failed, it closes its TURN allocations, and each delete to a dead relay retransmits
  ``aioice.stun.RETRY_MAX`` = 6 times (~32 s). A vanished relay is therefore reported
  ~60 s after it went (measured here: the peer still "connected" 20 s later). The NAT
  tests shorten all three (module globals; process-wide).
- :func:`tap_remb`: REMB (which aiortc parses but keeps to video encoders) needs
  ``RTCRtpSender._handle_rtcp_packet``, wrapped per sender.
- :func:`tap_feedback`: every receiver report and NACK about our stream *as it arrives*
  (``_handle_rtcp_packet``, and ``_send_rtcp`` to note when each sender report left), for
  adaptive bitrate. ``getStats()`` keeps only the latest report and an RTT smoothed 85/15
  that aiortc updates only when the report answers the very last SR (about half of them):
  a queue jumping to 200 ms moves it by 30 ms at the first report. Here each report gives its own
  RTT (RFC 3550 §6.4.1: arrival - LSR's send time - DLSR) the moment it comes.
- :func:`thin_sender_reports`: aiortc sends a sender report (+ SDES: 118 bytes on the wire)
  every 0.5-1.5 s whatever the link; libwebrtc's audio interval is 5 s. Also through
  ``_send_rtcp``, per sender.

TURN credentials are *not* pushed into live allocations: an allocation is bound to the
username it was made with (RFC 8656 §6.2; coturn answers a Refresh with another username
441 Wrong Credentials, measured), and a relay checks a REST-API username's expiry only when
an allocation is made. Fresh credentials therefore serve new peers; live calls keep going.

test/test_abr.py::test_net_hook_points_exist fails loudly when an upgrade moves any of it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aioice
import aioice.ice
import aioice.stun
import aiortc
from aiortc import RTCPeerConnection, RTCRtpSender

TESTED = {"aiortc": ("1.16.0",), "aioice": ("0.13.0",)}


class HookError(RuntimeError):
    """aiortc/aioice internals no longer look like the versions these hooks were written for."""


def check_hook_points(pc: RTCPeerConnection | None = None) -> None:
    """Raise :class:`HookError` naming what changed, if anything the hooks rely on did."""
    problems = []
    for mod, name in ((aioice.ice, "CONSENT_INTERVAL"), (aioice.ice, "CONSENT_FAILURES"),
                      (aioice.stun, "RETRY_MAX")):  # fmt: skip
        if not isinstance(getattr(mod, name, None), int | float):
            problems.append(f"{mod.__name__}.{name} is gone")
    for name in ("_handle_rtcp_packet", "_send_rtcp"):
        if not callable(getattr(RTCRtpSender, name, None)):
            problems.append(f"RTCRtpSender.{name} is gone")
    for name in ("_handle_rtp_packet", "_send_rtcp"):  # transport-cc, receiver side
        if not callable(getattr(aiortc.RTCRtpReceiver, name, None)):
            problems.append(f"RTCRtpReceiver.{name} is gone")
    from aiortc import codecs, rtp

    if not isinstance(getattr(codecs, "HEADER_EXTENSIONS", None), dict):
        problems.append("aiortc.codecs.HEADER_EXTENSIONS is gone")
    if not callable(getattr(rtp.RtcpRtpfbPacket, "parse", None)):
        problems.append("aiortc.rtp.RtcpRtpfbPacket.parse is gone")
    if not hasattr(rtp.HeaderExtensions(), "transport_sequence_number"):
        problems.append("aiortc no longer writes transport-wide sequence numbers")
    if pc is not None:
        for t in pc.getTransceivers():
            if not isinstance(getattr(t, "_headerExtensions", None), list):
                problems.append("RTCRtpTransceiver._headerExtensions (list) is gone")
                break
        ice = _ice_transport(pc)
        conn = getattr(ice, "_connection", None) if ice is not None else None
        if conn is None or not isinstance(getattr(conn, "_nominated", None), dict):
            problems.append("RTCIceTransport._connection._nominated (dict) is gone")
    if problems:
        raise HookError(
            f"aiortc {aiortc.__version__} / aioice {aioice.__version__} (hooks tested with "
            f"{TESTED}): " + "; ".join(problems)
        )


def _ice_transport(pc: RTCPeerConnection) -> Any:
    for t in pc.getTransceivers():
        dtls = t.sender.transport
        if dtls is not None:
            return dtls.transport
    sctp = pc.sctp
    return sctp.transport.transport if sctp is not None else None


@dataclass(frozen=True)
class SelectedPair:
    local_type: str  # host | srflx | prflx | relay
    remote_type: str
    local: tuple[str, int]
    remote: tuple[str, int]

    @property
    def relayed(self) -> bool:
        return "relay" in (self.local_type, self.remote_type)


def selected_pair(pc: RTCPeerConnection) -> SelectedPair | None:
    """The nominated candidate pair of ``pc``'s (bundled) transport, or None before ICE
    has nominated one."""
    check_hook_points(pc)
    conn = _ice_transport(pc)._connection
    pair = conn._nominated.get(1)
    if pair is None:
        return None
    lc, rc = pair.local_candidate, pair.remote_candidate
    return SelectedPair(lc.type, rc.type, (lc.host, lc.port), (rc.host, rc.port))


@contextlib.contextmanager
def consent_timing(interval_s: float, failures: int, stun_retries: int = 2) -> Iterator[None]:
    """Check ICE consent every ``interval_s``, fail after ``failures`` misses, and give up
    STUN/TURN transactions after ``stun_retries`` retransmissions, inside the block
    (process-wide; restored on exit)."""
    check_hook_points()
    old = aioice.ice.CONSENT_INTERVAL, aioice.ice.CONSENT_FAILURES, aioice.stun.RETRY_MAX
    aioice.ice.CONSENT_INTERVAL, aioice.ice.CONSENT_FAILURES = interval_s, failures
    aioice.stun.RETRY_MAX = stun_retries
    try:
        yield
    finally:
        aioice.ice.CONSENT_INTERVAL, aioice.ice.CONSENT_FAILURES, aioice.stun.RETRY_MAX = old


def tap_remb(sender: RTCRtpSender, on_remb: Callable[[int], None] | None = None) -> None:
    """Record REMB bitrates the viewer sends about ``sender`` (``sender._sv_remb_bps``)."""
    check_hook_points()
    from aiortc.rtp import RTCP_PSFB_APP, RtcpPsfbPacket, unpack_remb_fci

    original = sender._handle_rtcp_packet

    async def handle(packet: Any) -> None:
        if isinstance(packet, RtcpPsfbPacket) and packet.fmt == RTCP_PSFB_APP:
            with contextlib.suppress(ValueError):
                bitrate, _ssrcs = unpack_remb_fci(packet.fci)
                sender._sv_remb_bps = int(bitrate)  # type: ignore[attr-defined]
                if on_remb is not None:
                    on_remb(int(bitrate))
        await original(packet)

    sender._handle_rtcp_packet = handle  # type: ignore[method-assign]


@dataclass(frozen=True)
class Feedback:
    """One receiver report block about our stream, or one NACK, as it arrived."""

    at: float  # time.monotonic() on arrival
    kind: str  # "rr" | "nack"
    fraction_lost: float = 0.0  # rr: 0..1 since the viewer's previous report
    highest_seq: int = 0  # rr: extended highest sequence number received
    packets_lost: int = 0  # rr: cumulative
    jitter_s: float = 0.0  # rr
    rtt_s: float | None = None  # rr: this report's own RTT (None: no SR answered yet)
    lost: tuple[int, ...] = ()  # nack: the sequence numbers asked for


def tap_feedback(sender: RTCRtpSender, on_feedback: Callable[[Feedback], None]) -> None:
    """Call ``on_feedback`` with every receiver report and NACK about ``sender``'s stream
    when it arrives (on the peer's loop). Wraps ``_send_rtcp`` (the send time of each SR,
    by its LSR) and ``_handle_rtcp_packet``; both still run as before."""
    import time

    from aiortc.rtp import RTCP_RTPFB_NACK, RtcpRrPacket, RtcpRtpfbPacket, RtcpSrPacket

    check_hook_points()
    sr_sent: dict[int, float] = {}  # LSR (middle 32 bits of the SR's NTP time) -> sent
    answered: set[int] = set()  # SRs a report already gave the RTT of
    send_rtcp = sender._send_rtcp
    handle = sender._handle_rtcp_packet

    async def send(packets: list[Any]) -> None:
        for p in packets:
            if isinstance(p, RtcpSrPacket):
                sr_sent[(p.sender_info.ntp_timestamp >> 16) & 0xFFFFFFFF] = time.monotonic()
                while len(sr_sent) > 16:
                    answered.discard(next(iter(sr_sent)))
                    del sr_sent[next(iter(sr_sent))]
        await send_rtcp(packets)

    async def receive(packet: Any) -> None:
        now = time.monotonic()
        if isinstance(packet, RtcpRrPacket | RtcpSrPacket):
            for r in packet.reports:
                if r.ssrc != sender._ssrc:
                    continue
                rtt = None
                # Only a report answering an SR not answered before: one about an older SR
                # (the newer ones lost in a full queue, or not sent yet) repeats an old RTT.
                if r.lsr in sr_sent and r.dlsr and r.lsr not in answered:
                    rtt = max(0.0, now - sr_sent[r.lsr] - r.dlsr / 65536)
                    answered.add(r.lsr)
                lost = r.fraction_lost / 256.0
                fb = Feedback(now, "rr", lost, r.highest_sequence, r.packets_lost,
                              r.jitter / 48000.0, rtt)  # fmt: skip
                on_feedback(fb)
        elif isinstance(packet, RtcpRtpfbPacket) and packet.fmt == RTCP_RTPFB_NACK:
            if packet.media_ssrc == sender._ssrc:
                on_feedback(Feedback(now, "nack", lost=tuple(packet.lost)))
        await handle(packet)

    sender._send_rtcp = send  # type: ignore[method-assign]
    sender._handle_rtcp_packet = receive  # type: ignore[method-assign]


# SR + SDES compound as aiortc sends it, on the wire: IP 20 + UDP 8 + SR 28 + SDES with a
# 36-character CNAME 48 + SRTCP index 4 + tag 10.
SENDER_REPORT_WIRE_BYTES = 118


def thin_sender_reports(
    sender: RTCRtpSender,
    interval_s: float = 5.0,
    when: Callable[[], bool] = lambda: True,
) -> None:
    """Send ``sender``'s RTCP sender reports every ``interval_s`` (x 0.5-1.5, RFC 3550
    §6.2's spread) instead of aiortc's every 0.5-1.5 s, while ``when()`` is true.

    Why: on a 12 kbit/s link a report is 118 bytes, 79 ms of the link, and the Opus
    packets behind it wait in the bottleneck queue, which at the adaptive sender's floor
    (94 % of the link) drains at ~14 ms a packet: each report put ~5 packets 15-70 ms late,
    about half of all packets at one report a second (bench/abr.py, path delay p50 159 ->
    111 ms with this). libwebrtc sends audio reports every 5 s
    (``kDefaultAudioReportInterval``). A report skipped is never sent, so the viewer's
    receiver reports answer only the ones sent; :func:`tap_feedback` (wrapped inside this,
    see :func:`sonic_voice.kvs.opus_send.run_abr`) times only those, while aiortc's own
    ``getStats()`` RTT, keyed to the newest report it built, is left without updates.
    ``when``: e.g. "transport-cc feedback is coming", which gives the adaptive sender its
    delay signal every ~100 ms; without it the RTT of the reports is its only one."""
    import random
    import time

    from aiortc.rtp import RtcpSrPacket

    check_hook_points()
    next_report = 0.0
    send_rtcp = sender._send_rtcp

    async def send(packets: list[Any]) -> None:
        nonlocal next_report
        if any(isinstance(p, RtcpSrPacket) for p in packets):
            now = time.monotonic()
            if now < next_report and when():
                return  # skipped: never sent
            next_report = now + interval_s * (0.5 + random.random())
        await send_rtcp(packets)

    sender._send_rtcp = send  # type: ignore[method-assign]


# -- transport-wide congestion control (sonic_voice/kvs/twcc.py) ---------------------------
# aiortc parses and writes the transport-wide sequence number header extension when it is
# negotiated, but offers it for video only, never sets it on a packet, never sends the
# feedback and parses an RTPFB FMT 15 message as if it were a NACK (its lost list is
# garbage, and a padded one fails its length check, so the whole compound is dropped).
TWCC_EXT_ID = 5  # ids are shared by audio and video under BUNDLE: 1 mid, 2 level, 3 abs-send


def enable_transport_cc() -> None:
    """Process-wide, idempotent: audio sections offer (and answers accept) the
    transport-wide sequence number extension, and RTPFB FMT 15 messages parse as
    transport-cc feedback (``packet._sv_twcc``: a :class:`twcc.Feedback`)."""
    from aiortc import rtp
    from aiortc.codecs import HEADER_EXTENSIONS
    from aiortc.rtcrtpparameters import RTCRtpHeaderExtensionParameters

    from sonic_voice.kvs import twcc

    check_hook_points()
    audio = HEADER_EXTENSIONS["audio"]
    if not any(x.uri == twcc.URI for x in audio):
        taken = {x.id for xs in HEADER_EXTENSIONS.values() for x in xs}
        if TWCC_EXT_ID in taken:
            raise HookError(f"aiortc already uses header extension id {TWCC_EXT_ID}")
        audio.append(RTCRtpHeaderExtensionParameters(id=TWCC_EXT_ID, uri=twcc.URI))
    parse = rtp.RtcpRtpfbPacket.parse
    if getattr(parse, "_sv_twcc", False):
        return
    original = parse.__func__

    def parse_rtpfb(cls: Any, data: bytes, fmt: int) -> Any:
        if fmt != twcc.FMT:
            return original(cls, data, fmt)
        fb = twcc.parse_fci(data)  # ValueError: dropped, as aiortc drops any bad RTCP
        packet = cls(fmt=fmt, ssrc=fb.sender_ssrc, media_ssrc=fb.media_ssrc)
        packet._sv_twcc = fb
        return packet

    parse_rtpfb._sv_twcc = True  # type: ignore[attr-defined]
    rtp.RtcpRtpfbPacket.parse = classmethod(parse_rtpfb)  # type: ignore[method-assign,assignment]


def decline_transport_cc(pc: RTCPeerConnection) -> int:
    """Take transport-cc out of ``pc``'s negotiated audio extensions (call between
    setRemoteDescription and createAnswer). :func:`enable_transport_cc` is process-wide, so
    without this every later peer of the process would accept a viewer's transport-wide
    sequence numbers, and that viewer would then wait for feedback no one sends: only the
    peers that run the adaptive sender take part. Returns how many were removed."""
    from aiortc.codecs import HEADER_EXTENSIONS

    from sonic_voice.kvs import twcc

    if not any(x.uri == twcc.URI for x in HEADER_EXTENSIONS.get("audio", [])):
        return 0  # never enabled in this process: nothing to take out
    check_hook_points(pc)

    removed = 0
    for t in pc.getTransceivers():
        keep = [x for x in t._headerExtensions if x.uri != twcc.URI]
        removed += len(t._headerExtensions) - len(keep)
        t._headerExtensions = keep
    return removed


def tap_transport_cc(
    sender: RTCRtpSender, on_summary: Callable[[Any], None], payload_only: bool = False
) -> Any:
    """Number ``sender``'s packets with transport-wide sequence numbers (once negotiated),
    note when each left and its size, and call ``on_summary`` with a
    :class:`twcc.TwccSummary` for every feedback message about them (on the peer's loop).
    Returns the :class:`twcc.SendHistory`. Call before the offer/answer is made.

    ``payload_only``: sizes are the codec payload alone (a link model that counts only
    that, bench/abr.py ``--link payload``); else the RTP packet plus IPv4, UDP and SRTP."""
    import time

    from sonic_voice.kvs import twcc

    enable_transport_cc()
    ext_map = getattr(sender, "_RTCRtpSender__rtp_header_extensions_map", None)
    ids = getattr(ext_map, "_HeaderExtensionsMap__ids", None)
    if ext_map is None or ids is None or not hasattr(ids, "transport_sequence_number"):
        raise HookError("RTCRtpSender's header extension map is gone")
    hist = twcc.SendHistory(extra_bytes=0 if payload_only else twcc.WIRE_EXTRA_BYTES)
    set_extensions = ext_map.set

    def send_wrapper(transport: Any) -> None:
        if getattr(transport, "_sv_twcc_send", False):
            return
        send_rtp = transport._send_rtp

        async def send(data: bytes) -> None:
            pending = transport._sv_twcc_pending
            if pending is not None:
                transport._sv_twcc_pending = None
                size = len(data)
                if payload_only and size >= 12:
                    size -= 12 + 4 * (data[0] & 0x0F)  # header and CSRCs
                    if data[0] & 0x10 and len(data) >= 16 + 4 * (data[0] & 0x0F):
                        at = 12 + 4 * (data[0] & 0x0F)
                        size -= 4 + 4 * int.from_bytes(data[at + 2 : at + 4], "big")
                pending[0].on_send(pending[1], time.monotonic(), max(0, size))
            await send_rtp(data)

        transport._sv_twcc_pending = None
        transport._send_rtp = send
        transport._sv_twcc_send = True

    def set_with_seq(values: Any) -> Any:
        # Called by RtpPacket.serialize right before the sender hands the bytes to its
        # transport (no await between the two): the sequence number is noted there.
        if ids.transport_sequence_number:
            seq = hist.take_seq()
            values.transport_sequence_number = seq
            transport = sender.transport
            send_wrapper(transport)
            transport._sv_twcc_pending = (hist, seq)
        return set_extensions(values)

    ext_map.set = set_with_seq
    handle = sender._handle_rtcp_packet

    async def receive(packet: Any) -> None:
        fb = getattr(packet, "_sv_twcc", None)
        if fb is not None:
            on_summary(hist.on_feedback(fb, time.monotonic()))
            return  # aiortc has nothing to do with it
        await handle(packet)

    sender._handle_rtcp_packet = receive  # type: ignore[method-assign]
    return hist


# libwebrtc's feedback size estimate (IPv4 20 + UDP 8 + SRTP 10 + an average report 30) and
# the bounds of its interval; reports take 5 % of the sending side's bandwidth.
FEEDBACK_WIRE_BYTES = 68
FEEDBACK_INTERVAL_S = (0.05, 0.25)


def feedback_interval_s(send_bps: float) -> float:
    """libwebrtc's transport-cc feedback interval for a sender of ``send_bps`` on the path
    the feedback takes: 5 % of it, between 50 and 250 ms. At 12 kbit/s 250 ms (2.2 kbit/s
    of feedback); every 100 ms it would be 5.4 kbit/s, 45 % of such a link."""
    lo, hi = FEEDBACK_INTERVAL_S
    if send_bps <= 0:
        return hi
    return min(hi, max(lo, FEEDBACK_WIRE_BYTES * 8 / (0.05 * send_bps)))


class TransportCcFeedback:
    """Receiver side: note the arrival of every packet with a transport-wide sequence
    number that reaches ``receiver`` and send the feedback every ``interval_s``; with
    ``send_bps`` (what we send on the path the feedback takes, e.g. the adaptive sender's
    wire rate), at :func:`feedback_interval_s` of it instead, as libwebrtc does.
    :meth:`stop` ends it."""

    def __init__(
        self,
        receiver: Any,
        interval_s: float = 0.1,
        send_bps: Callable[[], float] | None = None,
    ) -> None:
        import asyncio
        import time

        from sonic_voice.kvs import twcc

        enable_transport_cc()
        self.receiver = receiver
        self.interval_s = interval_s
        self.send_bps = send_bps
        self.sent = 0
        self.recorder = twcc.ArrivalRecorder(sender_ssrc=0)
        handle_rtp = receiver._handle_rtp_packet
        rec = self.recorder

        async def on_rtp(packet: Any, arrival_time_ms: int) -> None:
            seq = packet.extensions.transport_sequence_number
            if seq is not None:
                rec.on_packet(seq, time.monotonic(), packet.ssrc)
            await handle_rtp(packet, arrival_time_ms)

        receiver._handle_rtp_packet = on_rtp
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        import asyncio

        class Raw:
            def __init__(self, data: bytes) -> None:
                self.data = data

            def __bytes__(self) -> bytes:
                return self.data

        while getattr(self.receiver.transport, "state", "closed") not in ("closed", "failed"):
            if self.send_bps is not None:
                self.interval_s = feedback_interval_s(self.send_bps())
            await asyncio.sleep(self.interval_s)
            ssrc = getattr(self.receiver, "_RTCRtpReceiver__rtcp_ssrc", None)
            if ssrc is None:
                continue
            self.recorder.sender_ssrc = ssrc
            msg = self.recorder.feedback()
            if msg is not None:
                await self.receiver._send_rtcp(Raw(msg))
                self.sent += 1

    def stop(self) -> None:
        self.task.cancel()
