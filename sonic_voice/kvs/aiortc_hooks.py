"""The one place that reaches into aiortc's internals (aiortc stays pinned and unmodified).

aiortc's audio receive path is a reorder buffer that stalls on every lost packet
(kvs-signaling.md §6.3). To replace it we need the RTP packets themselves, after aiortc has
done SRTP, statistics (so receiver reports still tell the sender about loss, which is what
makes a browser switch its Opus FEC on) and RTX unwrapping. The least invasive point:
``RTCRtpReceiver._RTCRtpReceiver__jitter_buffer``, whose ``add(packet)`` is called with each
depayloaded packet. We swap it, on one receiver instance, for a sink that hands the packet
to our buffer and returns "nothing to decode", so aiortc's decoder thread stays idle and
its track queue stays empty.

NACKs go out through ``RTCRtpReceiver._send_rtcp_nack`` (aiortc only uses it for video).

SCTP after the peer is gone (:func:`quiet_sctp_sends`): aiortc's SCTP transport fires
retransmissions and flushes as fire-and-forget tasks (``asyncio.ensure_future`` in
``_t3_expired``, ``_t1/_t2`` and ``_data_channel_flush`` paths). When the DTLS transport
under it has closed (a viewer that vanished, or closed its tab), each of those tasks dies
with ``ConnectionError`` (or OpenSSL's "protocol is shutdown" while DTLS is stopping) and
the loop logs "Task exception was never retrieved" (aiortc issue #1040, open; the soak's
aiortc viewers printed 15 of them in 200 joins as they left, and the master's transport
runs the same code when a viewer's DTLS closes under a live association). We wrap one
instance method, ``RTCSctpTransport._send_chunk``, the common bottom of every SCTP send, so
that a chunk sent to a closed transport is dropped like a lost packet.

test/test_jitter.py::test_aiortc_hook_points_exist fails loudly if an aiortc upgrade
renames or reshapes any of this; :func:`check_hook_points` says what is missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from aiortc import RTCRtpReceiver, RTCSctpTransport
from OpenSSL import SSL

log = logging.getLogger(__name__)

TESTED_AIORTC = ("1.16.0",)
_JB_ATTR = "_RTCRtpReceiver__jitter_buffer"
_KIND_ATTR = "_RTCRtpReceiver__kind"


@dataclass(slots=True)
class RtpIn:
    """One received RTP packet, detached from aiortc's objects."""

    seq: int
    timestamp: int
    ssrc: int
    payload: bytes
    arrival: float  # time.monotonic() when aiortc handed it over


class HookError(RuntimeError):
    """aiortc's internals no longer look like the version this hook was written for."""


def check_hook_points(receiver: RTCRtpReceiver | None = None) -> None:
    """Raise :class:`HookError` naming what changed, if anything the hook relies on did."""
    problems = []
    if not callable(getattr(RTCRtpReceiver, "_send_rtcp_nack", None)):
        problems.append("RTCRtpReceiver._send_rtcp_nack is gone")
    if not callable(getattr(RTCRtpReceiver, "_handle_rtp_packet", None)):
        problems.append("RTCRtpReceiver._handle_rtp_packet is gone")
    if not callable(getattr(RTCSctpTransport, "_send_chunk", None)):
        problems.append("RTCSctpTransport._send_chunk is gone")
    if receiver is not None:
        jb = getattr(receiver, _JB_ATTR, None)
        if jb is None or not callable(getattr(jb, "add", None)):
            problems.append(f"receiver has no {_JB_ATTR} with an add() method")
    if problems:
        import aiortc

        raise HookError(
            f"aiortc {aiortc.__version__} (hook tested with {', '.join(TESTED_AIORTC)}): "
            + "; ".join(problems)
        )


class _PacketSink:
    """Stands in for aiortc's JitterBuffer: takes every packet, assembles nothing."""

    def __init__(self, on_packet: Callable[[RtpIn], None]) -> None:
        self.on_packet = on_packet
        self.packets = 0

    def add(self, packet) -> tuple[bool, None]:
        self.packets += 1
        self.on_packet(
            RtpIn(
                seq=packet.sequence_number,
                timestamp=packet.timestamp,
                ssrc=packet.ssrc,
                payload=bytes(packet.payload),
                arrival=time.monotonic(),
            )
        )
        return False, None

    # aiortc's JitterBuffer API, in case anything else pokes at it
    def remove(self, count: int) -> None:  # pragma: no cover - not called for audio
        pass


def tap_rtp(receiver: RTCRtpReceiver, on_packet: Callable[[RtpIn], None]) -> _PacketSink:
    """Divert ``receiver``'s audio RTP packets to ``on_packet`` (called on the event loop).

    After this, ``receiver.track.recv()`` never returns a frame: read audio from the
    buffer fed by ``on_packet`` instead.
    """
    check_hook_points(receiver)
    kind = getattr(receiver, _KIND_ATTR, "audio")
    if kind != "audio":
        raise ValueError(f"tap_rtp is for audio receivers, not {kind}")
    sink = _PacketSink(on_packet)
    setattr(receiver, _JB_ATTR, sink)
    return sink


async def send_nack(receiver: RTCRtpReceiver, media_ssrc: int, lost: list[int]) -> None:
    """Ask the sender to retransmit ``lost`` sequence numbers (RFC 4585 generic NACK).

    aiortc senders answer for audio too; browsers only if ``nack`` was negotiated for the
    audio codec (Chrome does not offer it for Opus), so this is a bonus, not the plan.
    """
    await receiver._send_rtcp_nack(media_ssrc, [s & 0xFFFF for s in lost])


def quiet_sctp_sends(sctp: RTCSctpTransport) -> None:
    """Make ``sctp`` drop chunks sent after its DTLS transport closed instead of raising
    ``ConnectionError`` into aiortc's fire-and-forget tasks (see the module docstring).
    Idempotent; only this instance is changed."""
    if getattr(sctp, "_sonic_quiet", False):
        return
    check_hook_points()
    send_chunk = sctp._send_chunk  # the bound original

    async def _send_chunk(chunk) -> None:
        try:
            await send_chunk(chunk)
        except (ConnectionError, SSL.Error) as e:  # DTLS closed, or shutting down (the window
            # between RTCDtlsTransport.stop() and its state changing): as if lost on the wire
            log.debug("SCTP chunk dropped, transport closed: %s", e)

    sctp._send_chunk = _send_chunk  # type: ignore[method-assign]
    sctp._sonic_quiet = True  # type: ignore[attr-defined]
