"""The signaling WebSocket of a KVS master: connect, read, send, reconnect.

- A fresh botocore-presigned URL for every connection attempt (the signature only gates the
  handshake, and credentials may have rotated).
- WebSocket pings every ``ping_interval_s`` (the service's idle limit is 10 minutes).
- Reconnect with full-jitter capped exponential backoff after errors; at once after GO_AWAY;
  proactively before the service's 1-hour connection limit.
- The read loop only decodes and dispatches; the handler must not block (offers are
  processed in their own tasks by the master).
- Every message we send carries a correlation id, so failed deliveries come back as
  STATUS_RESPONSE; those are logged with what we had sent under that id.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import itertools
import json
import logging
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import websockets
from websockets.asyncio.client import ClientConnection

from sonic_voice.kvs.control import ControlPlane, ControlPlaneError, classify
from sonic_voice.kvs.settings import KvsSettings

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Inbound:
    """One decoded service -> master message."""

    type: str
    sender: str | None
    payload: Any  # decoded JSON of messagePayload, or None
    status: dict[str, Any] | None = None


class NotConnectedError(ConnectionError):
    pass


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
        """Decode one frame and hand it on; True when the connection must be renewed."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        if not text.strip():
            return False  # keep-alive
        try:
            obj = json.loads(text)
        except ValueError:
            log.debug("signaling: ignoring a non-JSON frame")
            return False
        if not isinstance(obj, dict) or "messageType" not in obj:
            log.debug("signaling: ignoring foreign JSON %s", str(obj)[:200])
            return False
        kind = obj["messageType"]
        if kind == "GO_AWAY":
            log.info("signaling: GO_AWAY, reconnecting now")
            self._now_reason = "go_away"
            return True
        if kind == "STATUS_RESPONSE":
            self._on_status(obj.get("statusResponse") or {})
            return False
        payload = None
        raw = obj.get("messagePayload")
        if raw:
            try:
                payload = json.loads(base64.b64decode(raw, validate=True))
            except (binascii.Error, ValueError):
                log.warning(
                    "signaling: undecodable %s payload from %s", kind, obj.get("senderClientId")
                )
                return False
        try:
            self.on_message(Inbound(kind, obj.get("senderClientId"), payload))
        except Exception:
            log.exception("signaling: handling %s failed", kind)
        return False

    def _on_status(self, status: dict[str, Any]) -> None:
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
        self.on_message(Inbound("STATUS_RESPONSE", None, None, entry))

    # -- sending ------------------------------------------------------------------------
    async def send(self, action: str, recipient: str, payload: dict[str, Any]) -> str:
        """Send one message to a viewer (waiting for a connection up to ``send_wait_s``);
        returns its correlation id."""
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
        deadline = time.monotonic() + self.settings.send_wait_s
        while True:
            ws = self._ws
            if ws is not None and self.connected.is_set():
                try:
                    await ws.send(frame)
                    break
                except websockets.ConnectionClosed:
                    pass
            left = deadline - time.monotonic()
            if left <= 0:
                raise NotConnectedError(f"signaling not connected; {action} to {recipient} lost")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.connected.wait(), min(left, 1.0))
        self._sent[corr] = (action, recipient, time.monotonic())
        while len(self._sent) > 500:
            self._sent.popitem(last=False)
        return corr
