"""ICE servers for new peers: STUN built per region, TURN from GetIceServerConfig.

TURN credentials live 300 s. The list is cached and refreshed ``ice_refresh_grace_s`` before
the shortest TTL ends, at once on RECONNECT_ICE_SERVER, and lazily before a peer is created
if it went stale anyway. aiortc can use only one STUN and one TURN URI (the first it can
parse), so the TURN URIs are ordered to put the preferred transport first.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from aiortc import RTCIceServer

from sonic_voice.kvs.control import ControlPlane, TurnServer
from sonic_voice.kvs.settings import KvsSettings

log = logging.getLogger(__name__)

DEFAULT_TTL = 300


def _turn_rank(uri: str, prefer_tcp: bool) -> int:
    # aiortc accepts turn: with udp/tcp and turns: only with tcp.
    if uri.startswith("turns:") and "transport=tcp" in uri:
        return 0 if prefer_tcp else 1
    if uri.startswith("turn:") and "transport=tcp" not in uri:
        return 1 if prefer_tcp else 0
    return 2


class IceConfig:
    def __init__(self, settings: KvsSettings, control: ControlPlane) -> None:
        self.settings = settings
        self.control = control
        self.turn: list[TurnServer] = []
        self.fetched_at = 0.0
        self.expires_at = 0.0  # monotonic time to refresh by
        self.refreshes = 0
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None
        self._kick = asyncio.Event()

    @property
    def stale(self) -> bool:
        return time.monotonic() >= self.expires_at

    async def refresh(self, reason: str = "ttl") -> None:
        async with self._lock:
            turn = await asyncio.to_thread(self.control.ice_servers)
            now = time.monotonic()
            ttl = min((t.ttl for t in turn), default=DEFAULT_TTL)
            self.turn = turn
            self.fetched_at = now
            self.expires_at = now + max(ttl - self.settings.ice_refresh_grace_s, 5.0)
            self.refreshes += 1
            log.info(
                "ICE config refreshed (%s): %d TURN server(s), ttl %d s", reason, len(turn), ttl
            )
        self._kick.set()

    def request_refresh(self, reason: str) -> None:
        """RECONNECT_ICE_SERVER: fetch new TURN credentials now (for peers made from now on;
        aiortc cannot re-point or ICE-restart an existing peer)."""
        self.expires_at = 0.0
        self._kick.set()
        self._reason = reason

    def start(self) -> None:
        self._reason = "start"
        self._task = asyncio.create_task(self._run(), name="kvs-ice-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def _run(self) -> None:
        retry = 1.0
        while True:
            wait = self.expires_at - time.monotonic()
            if wait > 0:
                self._kick.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._kick.wait(), wait)
                continue
            try:
                await self.refresh(getattr(self, "_reason", "ttl"))
                self._reason = "ttl"
                retry = 1.0
            except Exception as e:  # noqa: BLE001 - keep refreshing
                log.warning("ICE config refresh failed: %s; retry in %.0f s", e, retry)
                await asyncio.sleep(retry)
                retry = min(retry * 2, 30.0)

    async def servers(self) -> list[RTCIceServer]:
        """The list to build a new RTCPeerConnection with."""
        override = self.settings.ice_servers_override
        if self.stale:
            try:
                await self.refresh("stale before a new peer")
            except Exception as e:  # noqa: BLE001 - use what we have
                log.warning("ICE config refresh failed: %s; using the cached list", e)
        if override is not None:
            return [_ice_server(s) for s in override]
        out: list[RTCIceServer] = []
        stun = self.settings.stun_url
        stun = self.settings.default_stun_url if stun is None else stun
        if stun:
            out.append(RTCIceServer(urls=[stun]))
        for t in self.turn:
            uris = sorted(t.uris, key=lambda u: _turn_rank(u, self.settings.prefer_turn_tcp))
            out.append(RTCIceServer(urls=uris, username=t.username, credential=t.password))
        return out


def _ice_server(s: dict[str, Any] | RTCIceServer) -> RTCIceServer:
    if isinstance(s, RTCIceServer):
        return s
    return RTCIceServer(
        urls=s.get("urls") or s.get("Uris"),
        username=s.get("username") or s.get("Username"),
        credential=s.get("credential") or s.get("Password"),
    )
