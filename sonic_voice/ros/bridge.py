"""The one rclpy <-> asyncio bridge of a process (docs/architecture.md).

Every sonic_voice process has one asyncio loop (uvloop's: :func:`new_event_loop`), in one
thread, owned by :class:`Bridge`.
The pure cores (``sonic/``, ``kvs/``, the tools) run on it; rclpy runs on the process's
one executor (a ``SingleThreadedExecutor``: see :mod:`sonic_voice.ros.compat`). They meet
only here:

- ROS -> loop: :meth:`Bridge.subscribe` hands each message to a loop-side handler with one
  ``call_soon_threadsafe`` (one thread crossing, no copy); :meth:`Bridge.stream` gives the
  same as an async iterator;
- loop -> ROS: rclpy publishers and clients are thread-safe to call from the loop;
  :meth:`Bridge.wait` awaits an rclpy future on the loop (a done-callback completes an
  asyncio future: never ``.result()`` in a callback, never ``spin_until_future_complete``
  inside a library call);
- lifecycle work: transition callbacks schedule loop work with :meth:`Bridge.submit` and
  return; they never block an executor thread on a loop future (the loop may need that
  very executor to take a goal's cancel response). The one place that waits is the
  process's shutdown (:func:`sonic_voice.ros.node.spin_until`), which keeps spinning while
  it waits.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import threading
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

_lock = threading.Lock()
_bridge: Bridge | None = None


def new_event_loop() -> asyncio.AbstractEventLoop:
    """uvloop's event loop (libuv), or asyncio's own with ``SONIC_VOICE_EVENT_LOOP=asyncio``
    or where uvloop is not installed.

    Why: the loop thread runs aiortc both ways, the Bedrock SDK both ways and the audio
    hand-overs, ~500 callbacks, timers and datagrams a second in a conversation; asyncio's
    own machinery (``_run_once``, the selector, handles, ``call_soon_threadsafe``'s
    self-pipe) was ~15 % of the loop thread's samples (py-spy). Measured with
    ``bench/cpu_stack.py`` (3 alternated pairs, 30 s windows): the loop thread 14.4 -> 13.1 %
    of a core, the stack in conversation 24.6 -> 22.8 %, idle 13.2 -> 11.8 %.
    """
    if os.environ.get("SONIC_VOICE_EVENT_LOOP", "uvloop") != "asyncio":
        try:
            import uvloop
        except ImportError:
            log.debug("uvloop not installed: asyncio's event loop")
        else:
            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


class Bridge:
    """The process's asyncio loop thread and the crossings between it and rclpy."""

    def __init__(self, name: str = "sonic-voice-loop") -> None:
        self.loop = new_event_loop()
        self.loop.set_exception_handler(self._on_loop_exception)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ process-wide
    @classmethod
    def get(cls) -> Bridge:
        """The process's bridge, started on first use (and again after :meth:`close`)."""
        global _bridge
        with _lock:
            if _bridge is None or not _bridge.running:
                _bridge = cls()
            return _bridge

    @classmethod
    def close_process_bridge(cls, timeout: float = 1.0) -> None:
        """Stop the process's bridge, if any (the entry points' last step)."""
        global _bridge
        with _lock:
            b, _bridge = _bridge, None
        if b is not None:
            b.close(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive() and not self.loop.is_closed()

    def in_loop(self) -> bool:
        return threading.current_thread() is self._thread

    # ------------------------------------------------------------------ crossings
    def call(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run ``fn(*args)`` on the loop (from any thread; dropped once the loop is closed)."""
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(fn, *args)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; the returned future's exceptions are logged."""
        fut = asyncio.run_coroutine_threadsafe(coro, self.loop)
        fut.add_done_callback(_log_failure)
        return fut

    async def wait(self, rclpy_future: Any) -> Any:
        """Await an rclpy future on the loop (the result, or its exception raised here)."""
        afut = self.loop.create_future()

        def settle() -> None:
            if afut.done():
                return
            if rclpy_future.cancelled():
                afut.cancel()
            elif rclpy_future.exception() is not None:
                afut.set_exception(rclpy_future.exception())
            else:
                afut.set_result(rclpy_future.result())

        rclpy_future.add_done_callback(lambda _f: self.call(settle))
        return await afut

    def subscribe(
        self,
        node: Any,
        msg_type: Any,
        topic: str,
        qos: Any,
        handler: Callable[[Any], None],
        hot: bool = False,
        **kwargs: Any,
    ) -> Any:
        """A subscription whose messages are handled on the loop by ``handler(msg)``.

        ``hot``: taken by the context's hot path (:mod:`sonic_voice.ros.hotpath`) instead of
        the node's executor: for audio, whose every block would otherwise pay for the walk
        over all the node's entities."""
        loop = self.loop
        thread = self._thread

        def on_msg(msg: Any) -> None:
            with contextlib.suppress(RuntimeError):  # loop closed during shutdown
                if threading.current_thread() is thread:  # handed over in-process by the loop
                    loop.call_soon(handler, msg)
                else:
                    loop.call_soon_threadsafe(handler, msg)

        if "event_callbacks" not in kwargs:  # see ros/topics.py quiet_publisher_events
            from rclpy.event_handler import SubscriptionEventCallbacks

            kwargs["event_callbacks"] = SubscriptionEventCallbacks(use_default_callbacks=False)
        if hot:
            from std_msgs.msg import UInt8MultiArray

            from sonic_voice.ros.hotpath import HotPath
            from sonic_voice.ros.topics import parse_uint8_multiarray

            parse = parse_uint8_multiarray if msg_type is UInt8MultiArray else None
            return HotPath.of(node.context).subscribe(
                node, msg_type, topic, qos, on_msg, parse=parse, **kwargs
            )
        return node.create_subscription(msg_type, topic, on_msg, qos, **kwargs)

    def stream(
        self, node: Any, msg_type: Any, topic: str, qos: Any, maxsize: int = 0, **kwargs: Any
    ) -> MessageStream:
        """A subscription read as an async iterator on the loop (newest dropped when full)."""
        stream = MessageStream(maxsize)
        stream.subscription = self.subscribe(node, msg_type, topic, qos, stream.put, **kwargs)
        return stream

    def every(self, period_s: float, fn: Callable[[], None]) -> Periodic:
        """Run ``fn()`` on the loop every ``period_s`` (wall clock) until the returned
        :class:`Periodic` is cancelled; an exception is logged and the next tick still runs.

        For a node's periodic work that must not block (a look at the devices, a status
        publish): an rclpy timer wakes the node's executor, which walks all the node's
        entities in Python at each wake-up, ~2 ms of CPU a wake-up for a lifecycle node
        here (py-spy, bench/cpu_stack.py); a loop timer costs microseconds."""
        return Periodic(self, period_s, fn)

    # ------------------------------------------------------------------ life
    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            with contextlib.suppress(Exception):
                self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def close(self, timeout: float = 1.0) -> None:
        """Cancel what still runs on the loop (bounded by ``timeout``), stop it, join it."""
        if not self.running:
            return
        if self.in_loop():
            raise RuntimeError("Bridge.close() called from its own loop")
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(_cancel_all(), self.loop).result(timeout)
        with contextlib.suppress(Exception):  # to_thread's workers would hold the exit
            asyncio.run_coroutine_threadsafe(
                self.loop.shutdown_default_executor(timeout), self.loop
            ).result(timeout)
        with contextlib.suppress(RuntimeError):
            self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(timeout)

    @staticmethod
    def _on_loop_exception(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, asyncio.CancelledError):
            return
        msg = context.get("message", "unhandled error on the loop")
        if exc is not None:
            msg = f"{msg}: {exc!r}"
        log.error("%s", msg)


class Periodic:
    """``fn()`` every ``period_s`` on a bridge's loop (see :meth:`Bridge.every`); ticks keep
    their phase, and after a stall the next tick is one period later (no burst)."""

    def __init__(self, bridge: Bridge, period_s: float, fn: Callable[[], None]) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, not {period_s}")
        self.period_s = float(period_s)
        self._loop = bridge.loop
        self._fn = fn
        self._handle: asyncio.TimerHandle | None = None
        self._next = 0.0
        self.cancelled = False
        self.ticks = 0
        bridge.call(self._start)

    def _start(self) -> None:
        if not self.cancelled:
            self._next = self._loop.time() + self.period_s
            self._handle = self._loop.call_at(self._next, self._tick)

    def _tick(self) -> None:
        if self.cancelled:
            return
        self.ticks += 1
        try:
            self._fn()
        except Exception:  # a periodic job must survive one bad tick
            log.exception("periodic %r failed", self._fn)
        if self.cancelled:
            return
        now = self._loop.time()
        self._next += self.period_s
        if self._next <= now:
            self._next = now + self.period_s
        self._handle = self._loop.call_at(self._next, self._tick)

    def cancel(self) -> None:
        """Stop (from any thread; idempotent): no tick starts after this returns, unless
        one is running on the loop right now."""
        self.cancelled = True
        handle = self._handle
        if handle is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing runs
                self._loop.call_soon_threadsafe(handle.cancel)


class MessageStream:
    """Messages of one subscription, read on the loop with ``async for``."""

    def __init__(self, maxsize: int = 0) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue(maxsize)
        self.subscription: Any = None
        self.dropped = 0

    def put(self, msg: Any) -> None:
        try:
            self._queue.put_nowait(msg)
        except asyncio.QueueFull:
            self.dropped += 1

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        return await self._queue.get()


async def _cancel_all() -> None:
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me and not t.done()]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def _log_failure(fut: concurrent.futures.Future) -> None:
    if fut.cancelled():
        return
    exc = fut.exception()
    if exc is not None and not isinstance(exc, asyncio.CancelledError):
        log.error("loop task failed: %r", exc, exc_info=exc)
