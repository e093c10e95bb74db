"""One viewer: its aiortc RTCPeerConnection, its outgoing audio track, the consumer of its
incoming audio, and its data channel. Closing a peer releases all of them.

Audio paths (``KvsSettings``):

- in, ``resilient_receive`` (default): the viewer's RTP goes to our adaptive jitter buffer
  with Opus FEC/PLC/NACK (:func:`sonic_voice.kvs.jitter.install_receiver`), decoded by
  libopus straight at ``remote_rate`` (16 kHz; 48 kHz then this viewer's resampler for a
  rate libopus does not decode at), then this viewer's 32 ms blocker; otherwise aiortc's own
  receive path (:func:`sonic_voice.kvs.audio.consume_remote`).
- out, ``opus_fec`` (default): :class:`sonic_voice.kvs.opus_send.OpusFecTrack` (libopus with
  in-band FEC, fed at ``out_rate``); otherwise :class:`sonic_voice.kvs.audio.PacedAudioTrack`
  (aiortc's encoder).
- the answer: :meth:`ViewerPeer.answer` returns it through
  :func:`sonic_voice.kvs.opus_send.munge_sdp` (``useinbandfec=1`` so the viewer sends FEC,
  ``a=rtcp-fb:<pt> nack``), which is what goes over signaling.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription
from aiortc.sdp import candidate_from_sdp

from sonic_voice.kvs import aiortc_hooks, net_hooks
from sonic_voice.kvs.abr import AbrConfig, AbrController
from sonic_voice.kvs.audio import PacedAudioTrack, RemoteBlocker, consume_remote
from sonic_voice.kvs.frames import validate_candidate
from sonic_voice.kvs.jitter import ResilientAudioReceiver, install_receiver, opus_decode_rate
from sonic_voice.kvs.messages import RejectedMessage, dumps, parse_inbound
from sonic_voice.kvs.opus_send import (
    ENCODER_RATES,
    OpusFecTrack,
    OpusSendConfig,
    max_ptime_ms,
    munge_sdp,
    run_abr,
)
from sonic_voice.kvs.settings import KvsSettings

log = logging.getLogger(__name__)

EARLY_MAX = 64  # messages kept for a viewer whose data channel has not opened yet


def parse_candidate(obj: dict[str, Any]) -> Any | None:
    """A browser RTCIceCandidate JSON -> aiortc candidate (None for end-of-candidates).

    Raises :class:`~sonic_voice.kvs.frames.BadFrame` (a ValueError) for a candidate
    :func:`~sonic_voice.kvs.frames.validate_candidate` refuses.
    """
    norm = validate_candidate(obj)
    if not norm["candidate"]:
        return None
    cand = candidate_from_sdp(norm["candidate"])  # without "candidate:" (parsed by position)
    cand.sdpMid = norm["sdpMid"]
    cand.sdpMLineIndex = norm["sdpMLineIndex"]
    return cand


def _log_failure(task: asyncio.Task) -> None:
    """Retrieve a finished task's exception (no "Task exception was never retrieved")."""
    if not task.cancelled() and (e := task.exception()) is not None:
        log.warning("%s failed: %s: %s", task.get_name(), type(e).__name__, e)


def opus_config(settings: KvsSettings) -> OpusSendConfig:
    """The robot's Opus sender for ``settings``: fed at ``out_rate`` when libopus takes that
    rate (24 kHz: no resampling delay), else resampled to 48 kHz."""
    return OpusSendConfig(
        bitrate=settings.opus_bitrate,
        fec=True,
        packet_loss_pct=settings.opus_packet_loss_pct,
        adaptive=settings.abr,
        input_rate=settings.out_rate if settings.out_rate in ENCODER_RATES else 48000,
        pause_in_silence=settings.opus_pause_in_silence,
    )


class ViewerPeer:
    """The robot's side of one viewer's WebRTC session."""

    def __init__(
        self,
        client_id: str,
        settings: KvsSettings,
        config: RTCConfiguration,
        on_audio: Callable[[str, np.ndarray], None],
        on_inbound: Callable[[str, dict[str, Any]], None],
        on_state: Callable[[ViewerPeer], None],
    ) -> None:
        self.client_id = client_id
        self.settings = settings
        self.pc = RTCPeerConnection(config)
        self.out: OpusFecTrack | PacedAudioTrack = (
            OpusFecTrack(opus_config(settings)) if settings.opus_fec
            else PacedAudioTrack(settings.out_rate)
        )  # fmt: skip
        self.rx: ResilientAudioReceiver | None = None  # the viewer's audio (resilient path)
        self.abr = AbrController(
            AbrConfig(
                min_bps=min(settings.abr_min_bps, settings.opus_bitrate),
                max_bps=settings.opus_bitrate,
                start_bps=settings.opus_bitrate,
            )
        )  # used when settings.abr
        self.channels: list[Any] = []
        # What every new data channel gets first (the master's latched state): a viewer that
        # joins late sees the robot's state without waiting for it to change.
        self.latched: Callable[[], list[dict[str, Any]]] = list
        # Messages sent before this viewer's first data channel opened (the greeting's
        # transcript races the channel: the peer connects before the channel opens); they
        # follow the latched state once it opens. Bounded: a viewer whose channel never
        # opens costs at most EARLY_MAX messages.
        self.early: collections.deque[dict[str, Any]] = collections.deque(maxlen=EARLY_MAX)
        self.muted = False
        self.remote_set = False
        self.connected = asyncio.Event()
        self.closed = asyncio.Event()
        self.close_reason: str | None = None
        self.created = time.monotonic()
        self.connected_at: float | None = None
        self.remote_blocks = 0
        self.rejected: list[str] = []
        self.tasks: set[asyncio.Task] = set()
        self._on_audio = on_audio
        self._on_inbound = on_inbound
        self._on_state = on_state
        self.pc.on("track", self._on_track)
        self.pc.on("datachannel", self._on_datachannel)
        self.pc.on("connectionstatechange", self._on_connection_state)

    def play(self, samples: np.ndarray) -> None:
        """Queue robot speech (int16 mono at ``settings.out_rate``) for this viewer."""
        if isinstance(self.out, OpusFecTrack):
            self.out.push(samples, self.settings.out_rate)
        else:
            self.out.push(samples)

    def spawn(self, coro: Any, what: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=f"kvs-peer-{self.client_id}-{what}")
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        task.add_done_callback(_log_failure)
        return task

    # -- negotiation --------------------------------------------------------------------
    async def answer(
        self, offer: dict[str, Any], take_pending: Callable[[], list[dict[str, Any]]]
    ) -> str:
        """Apply the offer and early candidates; returns our answer SDP (with candidates)."""
        if self.settings.abr:
            # Accept the viewer's transport-wide sequence numbers on audio (the answer's
            # extensions are chosen when the offer is applied): its feedback every ~100 ms
            # is the adaptive sender's fast way down (kvs/twcc.py).
            net_hooks.enable_transport_cc()
        await self.pc.setRemoteDescription(RTCSessionDescription(offer["sdp"], "offer"))
        self.remote_set = True
        if not self.settings.abr:
            net_hooks.decline_transport_cc(self.pc)  # another peer may have enabled it
        if self.pc.sctp is not None:  # a data channel was offered
            aiortc_hooks.quiet_sctp_sends(self.pc.sctp)
        for c in take_pending():
            await self.add_candidate(c)
        if any(t.kind == "audio" for t in self.pc.getTransceivers()):
            sender = self.pc.addTrack(self.out)  # reuses the offered audio transceiver
            if self.settings.abr and isinstance(self.out, OpusFecTrack):
                self.abr.limit_ptime(max_ptime_ms(offer["sdp"]))  # long packets: thin links
                self.spawn(run_abr(self.out, sender, self.abr, transport_cc=True), "abr")
        await self.pc.setLocalDescription(await self.pc.createAnswer())
        sdp = self.pc.localDescription.sdp
        if self.settings.resilient_receive or self.settings.opus_fec:
            # aiortc writes no Opus fmtp/rtcp-fb and rebuilds its own description, so the
            # string sent over signaling is where they go. useinbandfec=1 asks the viewer
            # for FEC, which only our receive path uses; nack: we send NACKs for audio.
            sdp = munge_sdp(
                sdp,
                OpusSendConfig(
                    bitrate=self.settings.opus_bitrate, fec=self.settings.resilient_receive
                ),
                nack=self.settings.resilient_receive,
                transport_cc=self.settings.abr,
            )
        return sdp

    async def add_candidate(self, obj: dict[str, Any]) -> bool:
        """Add one remote candidate; a bad one is dropped with a warning, never raised
        (it must not fail the answer nor end as an unretrieved task exception)."""
        try:
            cand = parse_candidate(obj)
        except ValueError as e:
            log.warning("viewer %s: bad ICE candidate dropped: %s", self.client_id, e)
            return False
        if cand is None or self.closed.is_set():
            return False
        try:
            await self.pc.addIceCandidate(cand)
        except Exception as e:  # noqa: BLE001 - aiortc/aioice refusing it (after end-of-candidates...)
            log.warning(
                "viewer %s: ICE candidate refused: %s: %s", self.client_id, type(e).__name__, e
            )
            return False
        return True

    def watch_connect(self, timeout: float) -> None:
        """Close the peer if ICE has not connected within ``timeout`` (aiortc never fails
        on its own when the remote sends no end-of-candidates)."""

        async def _watch() -> None:
            try:
                await asyncio.wait_for(self.connected.wait(), timeout)
            except TimeoutError:
                if not self.closed.is_set():
                    log.warning("viewer %s: not connected after %.0f s", self.client_id, timeout)
                    self.spawn(self.close(f"ICE timeout ({timeout:.0f} s)"), "close")

        self.spawn(_watch(), "ice-timeout")

    # -- events -------------------------------------------------------------------------
    def _on_track(self, track: Any) -> None:
        if track.kind != "audio":
            return  # video from a viewer is not consumed (and not offered a sink)

        def deliver(block: np.ndarray) -> None:
            self.remote_blocks += 1
            if not self.muted:
                self._on_audio(self.client_id, block)

        if self.settings.resilient_receive:
            if self.rx is not None:
                return  # one audio track per viewer is consumed
            rate = self.settings.remote_rate
            # Decoded at the rate wanted when libopus can (16 kHz): no resampler after it.
            decode_rate = opus_decode_rate(rate)
            blocker = RemoteBlocker(
                deliver, rate, self.settings.remote_block_ms, in_rate=decode_rate
            )
            self._feed_back_transport_cc(track)
            self.rx = install_receiver(self.pc, track, on_pcm=blocker.push, out_rate=decode_rate)
            self.rx.task.set_name(f"kvs-peer-{self.client_id}-audio-in")
            self.tasks.add(self.rx.task)
            self.rx.task.add_done_callback(self.tasks.discard)
            return
        self._feed_back_transport_cc(track)
        self.spawn(
            consume_remote(
                track, deliver, self.settings.remote_rate, self.settings.remote_block_ms
            ),
            "audio-in",
        )

    def _feed_back_transport_cc(self, track: Any) -> None:
        """With ``abr`` the answer accepted the viewer's transport-wide sequence numbers, so
        the viewer's own sender waits for feedback about its audio: send it (every 50-250 ms
        by our own sending rate; net_hooks.TransportCcFeedback). Without ``abr`` the
        extension was declined."""
        if not self.settings.abr:
            return
        receiver = next(
            (t.receiver for t in self.pc.getTransceivers() if t.receiver.track is track), None
        )
        if receiver is None:
            return
        # Feedback rides our link to the viewer: 5 % of what we send there (libwebrtc's rule),
        # every 250 ms on a thin link instead of 45 % of a 12 kbit/s one every 100 ms.
        feedback = net_hooks.TransportCcFeedback(receiver, send_bps=lambda: self.abr.wire)
        self.tasks.add(feedback.task)
        feedback.task.add_done_callback(self.tasks.discard)

    def _on_datachannel(self, channel: Any) -> None:
        self.channels.append(channel)

        def greet() -> None:
            latched = self.latched()
            kinds = {obj.get("type") for obj in latched}
            early = [obj for obj in self.early if obj.get("type") not in kinds]
            self.early.clear()
            for obj in [*early, *latched]:  # the latched state last: it is the newest
                with contextlib.suppress(Exception):
                    self._send(channel, obj)

        if channel.readyState == "open":
            greet()
        else:
            channel.once("open", greet)

        @channel.on("message")
        def _message(raw: str | bytes) -> None:
            # Runs inside aiortc's SCTP receive path: nothing may escape from here.
            try:
                msg = parse_inbound(raw, self.settings.data_max_bytes, self.settings.text_max_chars)
            except RejectedMessage as e:
                self.rejected.append(str(e))
                del self.rejected[:-100]
                log.warning("viewer %s: data channel message rejected: %s", self.client_id, e)
                with contextlib.suppress(Exception):
                    self._send(channel, {"type": "error", "reason": str(e)})
                return
            if msg["type"] in ("mute", "unmute"):
                self.muted = msg["type"] == "mute"
            try:
                self._on_inbound(self.client_id, msg)
            except Exception:
                log.exception("viewer %s: handling %s failed", self.client_id, msg["type"])

        @channel.on("close")
        def _closed() -> None:
            with contextlib.suppress(ValueError):
                self.channels.remove(channel)

    def _on_connection_state(self) -> None:
        state = self.pc.connectionState
        log.info("viewer %s: connection %s", self.client_id, state)
        if state == "connected":
            self.connected_at = time.monotonic()
            self.connected.set()
            self._on_state(self)
        elif state in ("failed", "closed") and not self.closed.is_set():
            # The ICE state says a little more in the log: "failed" when the path died
            # (consent expired, e.g. the TURN relay vanished); "closed" after a goodbye or
            # when aiortc tore the transport down itself (measured: both happen).
            ice = self.pc.iceConnectionState
            self.spawn(self.close(f"connection {state} (ICE {ice})"), "close")

    # -- data ---------------------------------------------------------------------------
    @staticmethod
    def _send(channel: Any, obj: dict[str, Any]) -> bool:
        if channel.readyState != "open":
            return False
        channel.send(dumps(obj))
        return True

    def send_json(self, obj: dict[str, Any]) -> int:
        """Send to every open data channel of this viewer; returns how many took it. Before
        the viewer's first channel opens, the message waits in ``early``."""
        sent = sum(self._send(c, obj) for c in list(self.channels))
        if not sent and not any(c.readyState == "open" for c in self.channels):
            if not self.closed.is_set():
                self.early.append(obj)
        return sent

    # -- teardown -----------------------------------------------------------------------
    async def close(self, reason: str) -> None:
        """Close the peer and free everything it holds; idempotent."""
        if self.close_reason is not None:
            await self.closed.wait()
            return
        self.close_reason = reason
        log.info("viewer %s: closing (%s)", self.client_id, reason)
        self.out.stop()
        if self.rx is not None:
            self.rx.stop()
        try:
            await asyncio.wait_for(self.pc.close(), 10)
        except Exception as e:  # noqa: BLE001 - a failed close must still free the rest
            log.warning("viewer %s: pc.close: %s", self.client_id, e)
        current = asyncio.current_task()
        for task in list(self.tasks):
            if task is not current:
                task.cancel()
        others = [t for t in self.tasks if t is not current]
        if others:
            await asyncio.wait(others, timeout=5)
        self.pc.remove_all_listeners()
        self.channels.clear()
        self.closed.set()
        self._on_state(self)
