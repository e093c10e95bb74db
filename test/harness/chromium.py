"""Headless Debian Chromium driven over the Chrome DevTools Protocol (CDP).

No selenium/playwright: Chromium is started with ``--remote-debugging-port=0`` and a fresh
profile, the port is read from the profile's ``DevToolsActivePort`` file, and one page
target is driven over its websocket with ``websockets`` (already in the venv).

Network: the flags below turn off every background service (updates, sync, safe browsing,
QUIC, proxies) so the browser only talks to the loopback URLs a test gives it; tests run
the whole thing inside scripts/isolated.sh's namespace anyway. WebRTC may use loopback
(``--allow-loopback-in-peer-connection``) and host IPs are not hidden behind mDNS names
(the robot side cannot resolve them in a namespace without multicast).

Audio: ``fake_mic`` is a WAV file played in a loop as the microphone; media permission
prompts are accepted; autoplay needs no gesture. ``env`` may carry ``PULSE_SERVER`` so what
the page plays reaches a test's PulseAudio sink; without it Chromium falls back to its
own output path.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import websockets

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")

BASE_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-default-apps",
    "--disable-extensions",
    "--disable-breakpad",
    "--disable-domain-reliability",
    "--disable-client-side-phishing-detection",
    "--metrics-recording-only",
    "--no-proxy-server",
    "--password-store=basic",
    "--use-mock-keychain",
    "--autoplay-policy=no-user-gesture-required",
    "--use-fake-ui-for-media-stream",
    "--use-fake-device-for-media-stream",
    # WebRTC: loopback host candidates allowed (the only interface in the test namespace),
    # real addresses instead of mDNS names, and no interface other than the default ones.
    "--allow-loopback-in-peer-connection",
    "--disable-features=WebRtcHideLocalIpsWithMdns,MediaRouter,OptimizationHints,Translate",
    "--force-webrtc-ip-handling-policy=default_public_interface_only",
)


def find_chromium() -> str:
    """Path of the Chromium binary (``SONIC_VOICE_CHROMIUM`` overrides the search)."""
    override = os.environ.get("SONIC_VOICE_CHROMIUM")
    if override:
        return override
    for name in CHROMIUM_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    raise RuntimeError("chromium is not installed (run scripts/setup.sh as root: apt chromium)")


class CdpError(RuntimeError):
    """A CDP command failed, or page JavaScript threw."""


class Chromium:
    """One headless Chromium process with one page; use as ``async with Chromium(...)``."""

    def __init__(
        self,
        fake_mic: Path | None = None,
        extra_args: tuple[str, ...] = (),
        env: dict[str, str] | None = None,
    ) -> None:
        self.fake_mic = fake_mic
        self.extra_args = extra_args
        self.env = env
        self.profile = Path(tempfile.mkdtemp(prefix="sv-chromium-"))
        self.console: list[str] = []  # console messages and exceptions, for failure reports
        self.proc: subprocess.Popen | None = None
        self._ws: websockets.ClientConnection | None = None
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future] = {}
        self._events: dict[str, list[asyncio.Future]] = {}
        self._reader: asyncio.Task | None = None
        self._log = open(self.profile / "chromium.log", "wb")

    async def __aenter__(self) -> Chromium:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def start(self, time_limit: float = 30.0) -> None:
        args = [
            find_chromium(),
            *BASE_FLAGS,
            f"--user-data-dir={self.profile}",
            "--remote-debugging-address=127.0.0.1",
            "--remote-debugging-port=0",
            *self.extra_args,
        ]
        if self.fake_mic is not None:
            args.append(f"--use-file-for-fake-audio-capture={self.fake_mic}")
        args.append("about:blank")
        env = {**os.environ, **(self.env or {}), "HOME": str(self.profile)}
        # Popen returns at once; the wait below is async.
        self.proc = subprocess.Popen(  # noqa: ASYNC220
            args, stdout=self._log, stderr=subprocess.STDOUT, env=env
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + time_limit
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.poll() is not None:
                raise RuntimeError(f"chromium exited ({self.proc.returncode}): {self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"chromium did not open its debug port: {self.log_tail()}")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        page_ws = await asyncio.to_thread(_page_websocket, port, deadline)
        self._ws = await websockets.connect(page_ws, max_size=None, ping_interval=None)
        self._reader = asyncio.create_task(self._read())
        await self.send("Runtime.enable")
        await self.send("Page.enable")
        await self.send("Log.enable")

    def log_tail(self, n: int = 4000) -> str:
        self._log.flush()
        return (self.profile / "chromium.log").read_text(errors="replace")[-n:]

    async def _read(self) -> None:
        assert self._ws is not None
        try:
            async for raw in self._ws:
                msg = json.loads(raw)
                if "id" in msg:
                    fut = self._pending.pop(msg["id"], None)
                    if fut and not fut.done():
                        if "error" in msg:
                            fut.set_exception(CdpError(json.dumps(msg["error"])))
                        else:
                            fut.set_result(msg.get("result", {}))
                    continue
                method, params = msg.get("method", ""), msg.get("params", {})
                if method == "Runtime.consoleAPICalled":
                    args = params["args"]
                    text = " ".join(str(a.get("value", a.get("description", ""))) for a in args)
                    self.console.append(f"console.{params['type']}: {text}")
                elif method == "Runtime.exceptionThrown":
                    details = params["exceptionDetails"]
                    desc = details.get("exception", {}).get("description", details.get("text"))
                    self.console.append(f"exception: {desc}")
                elif method == "Log.entryAdded":
                    entry = params["entry"]
                    where = entry.get("url", "")
                    self.console.append(f"log.{entry['level']}: {entry['text']} {where}")
                for fut in self._events.pop(method, []):
                    if not fut.done():
                        fut.set_result(params)
        except websockets.ConnectionClosed:
            pass
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(CdpError("CDP connection closed"))

    async def send(self, method: str, params: dict | None = None, time_limit: float = 30.0) -> dict:
        """One CDP command; its ``result``."""
        assert self._ws is not None, "start() first"
        msg_id = next(self._ids)
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._pending[msg_id] = fut
        await self._ws.send(json.dumps({"id": msg_id, "method": method, "params": params or {}}))
        return await asyncio.wait_for(fut, time_limit)

    def event(self, method: str) -> asyncio.Future:
        """A future for the next CDP event ``method`` (register before triggering it)."""
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._events.setdefault(method, []).append(fut)
        return fut

    async def goto(self, url: str, time_limit: float = 30.0) -> None:
        """Navigate and wait for the load event."""
        loaded = self.event("Page.loadEventFired")
        result = await self.send("Page.navigate", {"url": url}, time_limit)
        if result.get("errorText"):
            raise CdpError(f"navigation to {url} failed: {result['errorText']}")
        await asyncio.wait_for(loaded, time_limit)

    async def evaluate(self, expression: str, time_limit: float = 30.0) -> Any:
        """Evaluate JS in the page (promises awaited) and return its JSON value."""
        result = await self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            time_limit + 1,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            desc = details.get("exception", {}).get("description", details.get("text"))
            raise CdpError(f"{expression[:80]!r} threw: {desc}")
        return result["result"].get("value")

    async def wait_for(
        self, expression: str, time_limit: float = 30.0, interval: float = 0.1
    ) -> Any:
        """Poll a JS expression until it is truthy; its value. TimeoutError names the
        expression and carries the page's recent console output."""
        deadline = time.monotonic() + time_limit
        while True:
            value = await self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > deadline:
                recent = "\n".join(self.console[-30:])
                raise TimeoutError(
                    f"{expression!r} still falsy after {time_limit} s; console:\n{recent}"
                )
            await asyncio.sleep(interval)

    async def close(self) -> None:
        if self._ws is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.send("Browser.close", time_limit=5), 6)
            with contextlib.suppress(Exception):
                await self._ws.close()
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._reader
        if self.proc is not None:
            try:
                await asyncio.to_thread(self.proc.wait, 10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait)
        self._log.close()
        shutil.rmtree(self.profile, ignore_errors=True)


def _page_websocket(port: int, deadline: float) -> str:
    """The debugger websocket URL of the first page target (no proxies: loopback only)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    while True:
        try:
            with opener.open(f"http://127.0.0.1:{port}/json/list", timeout=5) as resp:
                targets = json.load(resp)
            for t in targets:
                if t.get("type") == "page" and t.get("webSocketDebuggerUrl"):
                    return t["webSocketDebuggerUrl"]
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise TimeoutError("chromium exposes no page target")
        time.sleep(0.05)
