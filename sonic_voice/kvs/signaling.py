"""The signaling WebSocket of a KVS master: connect, read, send, reconnect.

- A fresh botocore-presigned URL for every connection attempt (the signature only gates the
  handshake, and credentials may have rotated).
- WebSocket pings every ``ping_interval_s`` (the service's idle limit is 10 minutes).
- Reconnect with full-jitter capped exponential backoff after errors; at once after GO_AWAY;
  proactively before the service's 1-hour connection limit.
- The read loop only validates (:func:`sonic_voice.kvs.frames.parse_frame`) and
  dispatches; a bad frame is dropped with one warning, never a reconnect. The handler
  must not block (offers are processed in their own tasks by the master).
- Outgoing frames leave through one paced writer: at most 20 a second, SDP at most 5 a
  second (the service's per-connection limits), SDP before queued ICE candidates.
- Every message we send carries a correlation id, so failed deliveries come back as
  STATUS_RESPONSE; those are logged with what we had sent under that id.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import heapq
import itertools
import json
import logging
import random
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

from sonic_voice.kvs.control import ControlPlane, ControlPlaneError, classify
from sonic_voice.kvs.frames import BadFrame, Inbound, parse_frame
from sonic_voice.kvs.settings import KvsSettings

log = logging.getLogger(__name__)


__all__ = ["Inbound", "NotConnectedError", "Pacer", "SignalingClient"]


class NotConnectedError(ConnectionError):
    pass


class Pacer:
    """At most ``rate`` sends a second, evenly spaced (a token bucket holding one token).

    Even spacing keeps any one-second window at ``rate`` whether the service counts per
    second, in a sliding window, or with a small bucket; the cost is that the 20th of a
    burst leaves 0.95 s after the first instead of at once.
    """

    def __init__(self, rate: float) -> None:
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.next_at = float("-inf")

    def take(self, now: float) -> None:
        self.next_at = max(now, self.next_at) + self.interval


@dataclass(order=True)
class _Outgoing:
    priority: int  # 0: SDP (answers first), 1: ICE candidates
    seq: int
    action: str = field(compare=False)
    recipient: str = field(compare=False)
    corr: str = field(compare=False)
    frame: str = field(compare=False)
    deadline: float = field(compare=False)
    future: asyncio.Future = field(compare=False)


class SignalingClient:
    """Keeps one master connection to the channel's signaling endpoint."""

    def __init__(
        self,
        settings: KvsSettings,
        control: ControlPlane,
        on_message: Callable[[Inbound], None],
        client_id: str | None = None,
    ) -> None:
        self.settings = settings
        self.control = control
        self.on_message = on_message
        self.client_id = client_id  # None for the master
        self.connected = asyncio.Event()
        self.connects = 0
        self.reconnect_reasons: list[str] = []
        self.status_responses: list[dict[str, Any]] = []
        self._ws: ClientConnection | None = None
        self._task: asyncio.Task | None = None
        self._stopping = False
        self._wake = asyncio.Event()
        self._ready: asyncio.Future | None = None
        self._sent: OrderedDict[str, tuple[str, str, float]] = OrderedDict()
        self._ids = itertools.count(1)
        self._prefix = secrets.token_hex(3)
        self._now_reason = "closed by the service"
        self._close_task: asyncio.Future | None = None
        self.bad_frames = 0  # frames dropped by parse_frame
        self.rejected_frames: deque[str] = deque(maxlen=100)  # their reasons, newest last
        # Outgoing frames wait in a priority queue and leave paced (issue 11 item 8): at
        # most signaling_rate_per_s in all, SDP messages at most sdp_rate_per_s, answers
        # before trickled candidates.
        self._outbox: list[_Outgoing] = []
        self._queued = asyncio.Event()
        self._pump_task: asyncio.Task | None = None
        self._pace_all = Pacer(settings.signaling_rate_per_s)
        self._pace_kind = {"SDP": Pacer(settings.sdp_rate_per_s), "ICE": Pacer(0)}
        self.sent_at: deque[tuple[float, str]] = deque(maxlen=1000)  # (monotonic, action)

    # -- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Resolve the channel (raise on a fatal control-plane error) and start connecting."""
        self._stopping = False
        self._ready = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(), name="kvs-signaling")
        await asyncio.shield(self._ready)

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._pump_task is not None:
            self._pump_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump_task
            self._pump_task = None
        for item in self._outbox:
            if not item.future.done():
                item.future.set_exception(
                    NotConnectedError(f"signaling stopped; {item.action} to {item.recipient} lost")
                )
        self._outbox.clear()
        ws = self._ws
        if ws is not None:
            await ws.close()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self.connected.clear()

    def reconnect(self, reason: str = "requested") -> None:
        """Drop the current connection and connect again at once (like GO_AWAY)."""
        self._wake.set()
        ws = self._ws
        if ws is not None:
            self._now_reason = "go_away"
            log.info("signaling: reconnecting now (%s)", reason)
            self._close_task = asyncio.ensure_future(ws.close(code=1000, reason=reason))

    # -- connection loop ----------------------------------------------------------------
    async def _run(self) -> None:
        failures = 0
        loop = asyncio.get_running_loop()
        while not self._stopping:
            reason = "error"
            try:
                if failures and failures % 3 == 0:
                    # Repeated failures: the endpoint may have moved; look it up again.
                    await asyncio.to_thread(self.control.resolve, True)
                url = await asyncio.to_thread(self.control.presigned_url, self.client_id)
                if self._ready is not None and not self._ready.done():
                    self._ready.set_result(None)
                async with websockets.connect(
                    url,
                    proxy=None,
                    open_timeout=self.settings.open_timeout_s,
                    ping_interval=self.settings.ping_interval_s,
                    ping_timeout=self.settings.ping_timeout_s,
                    close_timeout=2,
                    max_size=1 << 20,
                    compression=None,
                ) as ws:
                    self._ws = ws
                    self._now_reason = "closed by the service"
                    self.connects += 1
                    failures = 0
                    self.connected.set()
                    log.info("signaling connected (connection %d)", self.connects)
                    reason = await self._read(ws, loop.time() + self.settings.max_connection_s)
            except ControlPlaneError as e:
                if self._ready is not None and not self._ready.done() and e.fatal:
                    self._ready.set_exception(e)
                    return
                log.warning("signaling: control plane: %s", e)
            except websockets.InvalidStatus as e:
                code = e.response.status_code
                hint = (
                    " (credentials or clock skew: the presigned URL was refused)"
                    if code == 403
                    else ""
                )
                log.warning("signaling handshake refused: HTTP %s%s", code, hint)
                if code == 404:
                    await self._force_resolve()
            except (OSError, TimeoutError, websockets.WebSocketException) as e:
                log.warning("signaling connection failed: %s: %s", type(e).__name__, e)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - boto3/botocore errors, keep the loop alive
                err = classify(e)
                if self._ready is not None and not self._ready.done() and err.fatal:
                    self._ready.set_exception(err)
                    return
                log.warning("signaling: %s", err)
            finally:
                self._ws = None
                self.connected.clear()
            if self._stopping:
                break
            self.reconnect_reasons.append(reason)
            if reason in ("go_away", "max_age"):
                delay = 0.0
            else:
                failures += 1
                cap = min(self.settings.backoff_cap_s, self.settings.backoff_base_s * 2**failures)
                delay = random.uniform(0, cap)
            log.info("signaling: reconnecting in %.2f s (%s)", delay, reason)
            self._wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), delay)

    async def _force_resolve(self) -> None:
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self.control.resolve, True)

    async def _read(self, ws: ClientConnection, deadline: float) -> str:
        try:
            async with asyncio.timeout_at(deadline):
                async for text in ws:
                    if self._dispatch(text):
                        return "go_away"
        except TimeoutError:
            log.info("signaling: reconnecting before the 1-hour connection limit")
            return "max_age"
        except websockets.ConnectionClosed:
            pass
        return "go_away" if self._now_reason == "go_away" else "closed"

    def _dispatch(self, text: str | bytes) -> bool:
        """Validate one frame and hand it on; True when the connection must be renewed.

        Never raises: a frame :func:`~sonic_voice.kvs.frames.parse_frame` refuses is logged
        once with its reason and dropped (``rejected_frames``), and a failing handler is
        logged, so nothing a peer or the service sends can tear the socket down.
        """
        try:
            msg = parse_frame(text)
        except BadFrame as e:
            self._reject(str(e))
            return False
        except Exception as e:  # noqa: BLE001 - a parser bug must not cost the connection
            self._reject(f"unparseable frame ({type(e).__name__}: {e})")
            return False
        if msg is None:
            log.debug("signaling: ignoring a keep-alive, foreign JSON or unknown type")
            return False
        if msg.type == "GO_AWAY":
            log.info("signaling: GO_AWAY, reconnecting now")
            self._now_reason = "go_away"
            return True
        if msg.type == "STATUS_RESPONSE":
            assert msg.status is not None
            msg = Inbound(msg.type, None, None, self._on_status(msg.status))
        try:
            self.on_message(msg)
        except Exception:
            log.exception("signaling: handling %s failed", msg.type)
        return False

    def _reject(self, reason: str) -> None:
        self.bad_frames += 1
        self.rejected_frames.append(reason)
        log.warning("signaling: dropped a bad frame: %s", reason)

    def _on_status(self, status: dict[str, Any]) -> dict[str, Any]:
        """Log a (validated) STATUS_RESPONSE with what we had sent under its id."""
        corr = status.get("correlationId")
        sent = self._sent.get(corr) if corr else None
        what = f"{sent[0]} to {sent[1]}" if sent else "unknown message"
        entry = {**status, "about": what}
        self.status_responses.append(entry)
        del self.status_responses[:-100]
        if status.get("success") is True:
            log.info("signaling STATUS_RESPONSE ok for %s (%s)", corr, what)
        else:
            log.warning(
                "signaling STATUS_RESPONSE for correlationId %s (%s): %s %s %s",
                corr,
                what,
                status.get("statusCode"),
                status.get("errorType"),
                status.get("description"),
            )
        return entry

    # -- sending ------------------------------------------------------------------------
    async def send(self, action: str, recipient: str, payload: dict[str, Any]) -> str:
        """Send one message to a viewer (waiting for a connection up to ``send_wait_s``);
        returns its correlation id once the frame is on the socket.

        Frames leave paced to the service's documented limits (kvs-signaling.md §2.5: SDP
        5/s, ICE candidates 20/s per connection; ``sdp_rate_per_s``,
        ``signaling_rate_per_s`` for all frames together). SDP messages go before any
        queued ICE candidate, so an answer waits at most one send interval (50 ms) behind
        another viewer's trickle; frames of one priority leave in the order sent.
        Cancelling the caller withdraws a frame that has not left yet.
        """
        body = base64.b64encode(json.dumps(payload).encode()).decode()
        corr = f"{self._prefix}.{next(self._ids)}"
        frame = json.dumps(
            {
                "action": action,
                "messagePayload": body,
                "recipientClientId": recipient,
                "correlationId": corr,
            }
        )
        loop = asyncio.get_running_loop()
        item = _Outgoing(
            1 if action == "ICE_CANDIDATE" else 0,
            next(self._ids),
            action,
            recipient,
            corr,
            frame,
            loop.time() + self.settings.send_wait_s,
            loop.create_future(),
        )
        heapq.heappush(self._outbox, item)
        self._queued.set()
        if self._pump_task is None or self._pump_task.done():
            self._pump_task = asyncio.create_task(self._pump(), name="kvs-signaling-send")
        return await item.future

    async def _pump(self) -> None:
        """The one writer of the socket: sends queued frames in priority order, paced."""
        loop = asyncio.get_running_loop()
        while True:
            while self._outbox and self._outbox[0].future.done():
                heapq.heappop(self._outbox)  # withdrawn by a cancelled caller
            if not self._outbox:
                self._queued.clear()
                await self._queued.wait()
                continue
            item = self._outbox[0]
            now = loop.time()
            kind = self._pace_kind["ICE" if item.priority else "SDP"]
            at = max(self._pace_all.next_at, kind.next_at)
            ws = self._ws
            if ws is None or not self.connected.is_set():
                if now >= item.deadline:  # send_wait_s since it was queued
                    heapq.heappop(self._outbox)
                    why = f"signaling not connected; {item.action} to {item.recipient} lost"
                    item.future.set_exception(NotConnectedError(why))
                    continue
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.connected.wait(), min(item.deadline - now, 1.0))
                continue
            if at > now:
                # Wait for the slot, but look again if something more urgent is queued.
                self._queued.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._queued.wait(), at - now)
                continue
            heapq.heappop(self._outbox)
            try:
                await ws.send(item.frame)
            except websockets.ConnectionClosed:
                heapq.heappush(self._outbox, item)  # again on the next connection
                await asyncio.sleep(0.05)  # until the read loop sees the close
                continue
            except Exception as e:  # noqa: BLE001 - fail this frame, keep the writer alive
                if not item.future.done():
                    item.future.set_exception(e)
                continue
            now = loop.time()
            self._pace_all.take(now)
            kind.take(now)
            self.sent_at.append((time.monotonic(), item.action))
            self._sent[item.corr] = (item.action, item.recipient, time.monotonic())
            while len(self._sent) > 500:
                self._sent.popitem(last=False)
            if not item.future.done():
                item.future.set_result(item.corr)
