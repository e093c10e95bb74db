"""The stand-in on its own event loop in a thread.

Node tests run rclpy in threads and the node runs its own asyncio loop; a stand-in on a third
loop keeps every side honest (no accidental sharing of a loop, and a blocking boto3 call on
any other loop can never deadlock it).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from sonic_voice.emulators.kvs.server import KvsEmulator

T = TypeVar("T")


class KvsEmulatorThread:
    """``KvsEmulatorThread(**KvsEmulator kwargs).start()``; hooks are plain blocking calls."""

    def __init__(self, **kwargs: Any) -> None:
        self.emulator = KvsEmulator(**kwargs)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="kvs-stand-in", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def start(self, timeout: float = 10.0) -> KvsEmulatorThread:
        self._thread.start()
        self.call(self.emulator.start(), timeout)
        return self

    def stop(self, timeout: float = 10.0) -> None:
        if not self._thread.is_alive():
            return
        try:
            self.call(self.emulator.stop(), timeout)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(timeout)
            if not self._thread.is_alive():
                self.loop.close()

    def __enter__(self) -> KvsEmulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 10.0) -> T:
        """Run a coroutine on the stand-in's loop and wait for its result."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def sync(self, fn: Callable[[], T], timeout: float = 10.0) -> T:
        """Run a plain function on the stand-in's loop (to read its state consistently)."""

        async def _f() -> T:
            return fn()

        return self.call(_f(), timeout)

    @property
    def endpoint_url(self) -> str:
        return self.emulator.endpoint_url

    @property
    def ws_url(self) -> str:
        return self.emulator.ws_url

    def create_channel(self, name: str, ttl: int = 60) -> str:
        return self.sync(lambda: self.emulator.create_channel(name, ttl))

    def wait_until(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        return self.call(self.emulator.wait_until(predicate, timeout), timeout + 5)

    def send_go_away(self, client: str | None = None, **kw: Any) -> None:
        self.call(self.emulator.send_go_away(client, **kw))

    def send_reconnect_ice_server(self, client: str | None = None, **kw: Any) -> None:
        self.call(self.emulator.send_reconnect_ice_server(client, **kw))

    def send_status_response(self, correlation_id: str, **kw: Any) -> None:
        self.call(self.emulator.send_status_response(correlation_id, **kw))

    def send_raw(self, text: str, client: str | None = None, **kw: Any) -> None:
        self.call(self.emulator.send_raw(text, client, **kw))

    def send_malformed(self, kind: str, **kw: Any) -> None:
        self.call(self.emulator.send_malformed(kind, **kw))

    def send_as_viewer(self, sender: str, action: str, payload: Any, **kw: Any) -> None:
        self.call(self.emulator.send_as_viewer(sender, action, payload, **kw))

    def drop(self, client: str | None = None, **kw: Any) -> None:
        self.call(self.emulator.drop(client, **kw))
