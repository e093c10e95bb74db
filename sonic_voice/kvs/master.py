"""KvsMaster: the robot as the KVS WebRTC master of one signaling channel.

Everything runs on one asyncio loop; boto3 runs in worker threads. ``play``, ``flush`` and
``broadcast`` may be called from any thread (a ROS executor thread, say): they hop onto the
master's loop. Callbacks (``on_audio``, ``on_viewers``, ``on_message``) run on the loop and
must return quickly.

Signaling messages are dispatched, never processed, by the read loop: each SDP offer is
answered in its own task (serialised per viewer), ICE candidates that arrive before their
peer is ready wait in a per-viewer queue (``pending_candidate_ttl_s``), and a viewer that
offers again gets a fresh peer after its old one is closed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
from aiortc import RTCConfiguration, RTCIceTransportPolicy

from sonic_voice.audio.pcm import as_pcm16
from sonic_voice.kvs.control import ControlPlane
from sonic_voice.kvs.ice import IceConfig
from sonic_voice.kvs.peer import ViewerPeer, _log_failure
from sonic_voice.kvs.settings import KvsSettings
from sonic_voice.kvs.signaling import Inbound, SignalingClient

log = logging.getLogger(__name__)

_CANDIDATE_RE = re.compile(r"^a=(candidate:.*|end-of-candidates)\r?$", re.M)


def split_candidates(sdp: str) -> tuple[str, list[dict[str, Any]]]:
    """Remove candidate lines from an SDP; return it and the first m-section's candidates as
    trickle ICE_CANDIDATE payloads (with BUNDLE every section shares that transport)."""
    lines = sdp.replace("\r\n", "\n").split("\n")
    out, cands = [], []
    section, mid = -1, None
    for line in lines:
        if line.startswith("m="):
            section += 1
            mid = None
        elif line.startswith("a=mid:") and section == 0:
            mid = line[6:]
        if line.startswith("a=candidate:") or line == "a=end-of-candidates":
            if section == 0 and line.startswith("a=candidate:"):
                cands.append(line[2:])
            continue
        out.append(line)
    payloads = [{"candidate": c, "sdpMid": mid or "0", "sdpMLineIndex": 0} for c in cands]
    return "\r\n".join(out), payloads


def _priority(payload: dict[str, Any]) -> int:
    bits = payload["candidate"].split()
    return int(bits[3]) if len(bits) > 3 and bits[3].isdigit() else 0


def _b64_len(obj: dict[str, Any]) -> int:
    return len(base64.b64encode(json.dumps(obj).encode()))


class KvsMaster:
    """``KvsMaster(settings, on_audio, on_viewers, on_message)``; ``await start()``.

    - ``on_audio(client_id, pcm)``: each viewer's speech as mono PCM16LE bytes at
      ``settings.remote_rate`` (16 kHz), ``remote_block_ms`` (32 ms) blocks; muted viewers'
      audio is dropped.
    - ``on_viewers(count)``: connected viewers, whenever the number changes.
    - ``on_message(client_id, msg)``: validated data-channel messages
      (``{"type": "text", "text": ...}``, ``{"type": "mute"}``, ``{"type": "unmute"}``).
    """

    def __init__(
        self,
        settings: KvsSettings,
        on_audio: Callable[[str, bytes], None] | None = None,
        on_viewers: Callable[[int], None] | None = None,
        on_message: Callable[[str, dict[str, Any]], None] | None = None,
    ) -> None:
        self.settings = settings
        self.on_audio = on_audio
        self.on_viewers = on_viewers
        self.on_message = on_message
        self.peers: dict[str, ViewerPeer] = {}
        self._latched: dict[str, dict[str, Any]] = {}
        self.control: ControlPlane | None = None
        self.ice: IceConfig | None = None
        self.signaling: SignalingClient | None = None
        self.rejected_offers: list[tuple[str, str]] = []  # (client id, reason), newest 100
        self.closed_peers: list[tuple[str, str]] = []  # (client id, reason), newest 100
        self._pending: dict[str, list[tuple[float, dict[str, Any]]]] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._offering: dict[str, int] = {}  # offers being handled per viewer
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: int | None = None
        self._last_count = 0
        self._count_changed = asyncio.Event()

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Resolve the channel and start signaling; raises ControlPlaneError when the
        configuration cannot work (no credentials, no such channel, access denied)."""
        self._loop = asyncio.get_running_loop()
        self._thread = threading.get_ident()
        self._count_changed = asyncio.Event()
        self.control = await asyncio.to_thread(ControlPlane, self.settings)
        self.ice = IceConfig(self.settings, self.control)
        self.signaling = SignalingClient(self.settings, self.control, self._on_signal)
        await self.signaling.start()
        self.ice.start()

    async def wait_connected(self, timeout: float = 10.0) -> bool:  # noqa: ASYNC109
        """True once the signaling WebSocket is open."""
        assert self.signaling is not None, "start() first"
        try:
            await asyncio.wait_for(self.signaling.connected.wait(), timeout)
        except TimeoutError:
            return False
        return True

    async def stop(self) -> None:
        """Close every peer, the signaling connection and the refresh task."""
        if self.signaling is not None:
            await self.signaling.stop()
        if self.ice is not None:
            await self.ice.stop()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)
        peers = list(self.peers.values())
        self.peers.clear()
        await asyncio.gather(*(p.close("master stopping") for p in peers), return_exceptions=True)
        self._pending.clear()
        self._update_count()

    # -- robot side (thread-safe) -------------------------------------------------------
    def _on_loop(self, fn: Callable[..., None], *args: Any) -> None:
        if self._loop is None:
            return
        if threading.get_ident() == self._thread:
            fn(*args)
        else:
            self._loop.call_soon_threadsafe(fn, *args)

    def play(self, pcm24k: bytes | np.ndarray) -> None:
        """Queue robot speech (PCM16LE mono at ``out_rate``, any length) for every viewer."""
        samples = as_pcm16(pcm24k).copy() if not isinstance(pcm24k, bytes) else as_pcm16(pcm24k)
        self._on_loop(self._play, samples)

    def _play(self, samples: np.ndarray) -> None:
        for peer in self.peers.values():
            if peer.connected.is_set() and not peer.closed.is_set():
                peer.play(samples)

    def flush(self) -> None:
        """Barge-in: drop all queued robot speech for every viewer now."""
        self._on_loop(self._flush)

    def _flush(self) -> None:
        for peer in self.peers.values():
            peer.out.flush()

    def latch(self, obj: dict[str, Any]) -> None:
        """Broadcast ``obj`` and keep it (one per ``type``) for every viewer that joins
        later: it is the first thing on a new data channel (e.g. the robot's state)."""
        self._on_loop(self._latch, dict(obj))

    def _latch(self, obj: dict[str, Any]) -> None:
        self._latched[str(obj.get("type", ""))] = obj
        self._broadcast(obj)

    def broadcast(self, obj: dict[str, Any]) -> None:
        """Send a JSON object (transcript, state) on every viewer's data channel."""
        self._on_loop(self._broadcast, dict(obj))

    def _broadcast(self, obj: dict[str, Any]) -> None:
        for peer in self.peers.values():
            if not peer.closed.is_set():
                peer.send_json(obj)

    @property
    def viewer_count(self) -> int:
        """Viewers whose peer is connected."""
        return sum(1 for p in self.peers.values() if p.connected.is_set() and not p.closed.is_set())

    def peer_tasks(self) -> list[asyncio.Task]:
        """Live tasks that belong to peers or offers (for leak checks)."""
        tasks = [t for p in self.peers.values() for t in p.tasks if not t.done()]
        return tasks + [t for t in self._tasks if not t.done()]

    # -- signaling ----------------------------------------------------------------------
    def _spawn(self, coro: Any, name: str) -> None:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        task.add_done_callback(_log_failure)

    def _on_signal(self, msg: Inbound) -> None:
        if msg.type == "SDP_OFFER":
            client = msg.sender
            p = msg.payload
            if not client or not isinstance(p, dict) or not isinstance(p.get("sdp"), str):
                log.warning("SDP_OFFER without sender or sdp ignored (from %s)", client)
                return
            self._spawn(self._handle_offer(client, p), f"kvs-offer-{client}")
        elif msg.type == "ICE_CANDIDATE":
            if msg.sender and isinstance(msg.payload, dict):
                self._on_candidate(msg.sender, msg.payload)
        elif msg.type == "RECONNECT_ICE_SERVER":
            log.info("RECONNECT_ICE_SERVER: refreshing the ICE server configuration")
            assert self.ice is not None
            self.ice.request_refresh("RECONNECT_ICE_SERVER")
        elif msg.type == "STATUS_RESPONSE":
            pass  # logged by the signaling client with what it was about
        else:
            log.debug("signaling: %s from %s ignored", msg.type, msg.sender)

    def _on_candidate(self, client: str, cand: dict[str, Any]) -> None:
        peer = self.peers.get(client)
        if peer is not None and peer.remote_set and not peer.closed.is_set():
            peer.spawn(peer.add_candidate(cand), "candidate")
            return
        now = time.monotonic()
        for key in list(self._pending):  # expire what waited too long
            kept = [(t, c) for t, c in self._pending[key] if t > now]
            if kept:
                self._pending[key] = kept
            else:
                del self._pending[key]
        self._pending.setdefault(client, []).append(
            (now + self.settings.pending_candidate_ttl_s, cand)
        )

    def _take_pending(self, client: str) -> list[dict[str, Any]]:
        now = time.monotonic()
        return [c for t, c in self._pending.pop(client, []) if t > now]

    async def _handle_offer(self, client: str, offer: dict[str, Any]) -> None:
        lock = self._locks.setdefault(client, asyncio.Lock())
        self._offering[client] = self._offering.get(client, 0) + 1
        try:
            async with lock:
                await self._answer_offer(client, offer)
        finally:
            # The last offer of a viewer without a peer (refused, failed) drops its lock; a
            # peer's closing drops it otherwise (_on_peer_state).
            left = self._offering.pop(client) - 1
            if left:
                self._offering[client] = left
            elif client not in self.peers:
                self._locks.pop(client, None)

    async def _answer_offer(self, client: str, offer: dict[str, Any]) -> None:
        old = self.peers.pop(client, None)
        if old is not None:
            await old.close("replaced by a new offer from the same viewer")
        if len(self.peers) >= self.settings.max_viewers:
            reason = f"max_viewers ({self.settings.max_viewers}) reached"
            log.warning("viewer %s refused: %s", client, reason)
            self.rejected_offers.append((client, reason))
            del self.rejected_offers[:-100]
            self._pending.pop(client, None)
            return
        assert self.ice is not None and self.signaling is not None
        servers = await self.ice.servers()
        config = RTCConfiguration(
            iceServers=servers,
            iceTransportPolicy=RTCIceTransportPolicy(self.settings.ice_transport_policy),
        )
        peer = ViewerPeer(
            client,
            self.settings,
            config,
            self._deliver_audio,
            self._deliver_message,
            self._on_peer_state,
        )
        peer.latched = lambda: list(self._latched.values())
        self.peers[client] = peer
        try:
            sdp = await asyncio.wait_for(
                peer.answer(offer, lambda: self._take_pending(client)),
                self.settings.ice_timeout_s,
            )
            await self._send_answer(client, sdp, peer)
        except Exception as e:  # noqa: BLE001 - one viewer's failure is its own
            log.warning("viewer %s: answering failed: %s: %s", client, type(e).__name__, e)
            await peer.close(f"answer failed: {e}")
            return
        peer.watch_connect(self.settings.ice_timeout_s)

    async def _send_answer(self, client: str, sdp: str, peer: ViewerPeer | None = None) -> None:
        """Send the answer; when it is over the message limit, send it without candidates
        and trickle them after it (signaling paces them at 20/s), highest ICE priority
        first so the most useful path is tried first. The trickle runs as a task of
        ``peer`` (when given): the answer does not wait for it, and closing the peer
        withdraws what has not left yet."""
        assert self.signaling is not None
        answer = {"type": "answer", "sdp": sdp}
        trickle: list[dict[str, Any]] = []
        if _b64_len(answer) > self.settings.max_message_chars:
            # Too many host candidates for one message: send them separately.
            stripped, trickle = split_candidates(sdp)
            trickle.sort(key=_priority, reverse=True)
            answer = {"type": "answer", "sdp": stripped}
            log.info(
                "viewer %s: answer over %d chars; trickling %d candidates",
                client,
                self.settings.max_message_chars,
                len(trickle),
            )
        await self.signaling.send("SDP_ANSWER", client, answer)
        if not trickle:
            return
        signaling = self.signaling

        async def _trickle() -> None:
            # All queued at once: the signaling pump keeps their order and pace.
            await asyncio.gather(*(signaling.send("ICE_CANDIDATE", client, c) for c in trickle))

        if peer is None:
            await _trickle()
        else:
            peer.spawn(_trickle(), "trickle")

    # -- peer callbacks -----------------------------------------------------------------
    def _deliver_audio(self, client: str, block: np.ndarray) -> None:
        if self.on_audio is not None:
            self.on_audio(client, block.astype("<i2", copy=False).tobytes())

    def _deliver_message(self, client: str, msg: dict[str, Any]) -> None:
        log.info("viewer %s: %s", client, msg["type"])
        if self.on_message is not None:
            self.on_message(client, msg)

    def _on_peer_state(self, peer: ViewerPeer) -> None:
        if peer.closed.is_set():
            if self.peers.get(peer.client_id) is peer:
                del self.peers[peer.client_id]
            self.closed_peers.append((peer.client_id, peer.close_reason or "?"))
            del self.closed_peers[:-100]
            if not self._offering.get(peer.client_id):
                self._locks.pop(peer.client_id, None)
        self._update_count()

    def _update_count(self) -> None:
        count = self.viewer_count
        if count != self._last_count:
            self._last_count = count
            self._count_changed.set()
            log.info("viewers: %d", count)
            if self.on_viewers is not None:
                try:
                    self.on_viewers(count)
                except Exception:
                    log.exception("on_viewers callback failed")

    async def wait_viewers(self, n: int, timeout: float = 20.0) -> bool:  # noqa: ASYNC109
        """Wait until exactly ``n`` viewers are connected."""
        deadline = time.monotonic() + timeout
        while self.viewer_count != n:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._count_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._count_changed.wait(), min(left, 0.5))
        return True
