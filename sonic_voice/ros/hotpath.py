"""The hot path: audio subscriptions waited on by a thread of their own, not by an executor
(docs/architecture.md, "Threads").

rclpy's executors rebuild their wait set, in Python, over every entity of the node at every
wake-up: a lifecycle node carries ~12 services (parameters, lifecycle, type description)
before it has a topic, and sonic_session with its tools' action clients ~40 entities, so
each 32 ms microphone block cost its executor ~1 ms of CPU before the message was even
taken (bench/cpu_stack.py, profiled with py-spy). A :class:`HotPath` waits on the audio
subscriptions alone (and one guard condition): its wait set holds a handful of entities,
and a ready subscription is drained at once.

- The subscriptions stay ordinary rclpy subscriptions of their node (graph, QoS, ``ros2
  topic info``, destruction with the node) but belong to :data:`PARKED`, a callback group
  no executor ever runs, so the node's executor leaves them out of its wait set.
- One hot path per rclpy context (one per process in the product), started on first use;
  it ends when the context shuts down (checked at least every :data:`RECHECK_S`).
- Callbacks run on the hot path's thread and must return at once (hand over to a device
  buffer or, with one ``call_soon_threadsafe``, to the loop), as on an executor thread.

In-process delivery (what rclcpp calls intra-process communication; rclpy has none): when
the runner puts every node in one process, an audio message went publisher -> Fast DDS ->
this thread's wait set -> take, ~380 us of CPU a message for a 1 KB block (measured in one
process: publish, Fast DDS's own threads, wait, take), ~100 messages a second in a
conversation. A publisher wrapped by :meth:`HotPath.publisher` instead hands each message
straight to the hot subscriptions of the same process on the same topic, in the
publisher's thread, when they are its only matched subscriptions; as soon as a subscription
of another process matches (``ros2 topic echo``, a bag, a node under ``ros2 launch``), it
publishes through DDS again and the local subscriptions take it from there, as before (no
message twice: a message goes one way or the other). Callbacks of one hot path, taken or
handed over, never run at the same time (one lock), as when this thread alone ran them. A
callback may itself publish in-process (on any hot topic, its own included): that message
is delivered in the same thread once the message being delivered has reached all its
subscriptions, in publishing order, as DDS would deliver it later (no nested callback, no
deadlock on the lock).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from rclpy.callback_groups import CallbackGroup
from rclpy.exceptions import InvalidHandle
from rclpy.guard_condition import GuardCondition
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.serialization import deserialize_message, serialize_message

log = logging.getLogger(__name__)

RECHECK_S = 0.5  # a destroyed subscription or a shut-down context is noticed within this


class _Parked(CallbackGroup):
    """A callback group no executor runs: its entities are waited on elsewhere."""

    def can_execute(self, entity: Any) -> bool:
        return False

    def beginning_execution(self, entity: Any) -> bool:
        return False

    def ending_execution(self, entity: Any) -> None:
        pass


PARKED = _Parked()

_lock = threading.Lock()
_paths: dict[int, HotPath] = {}


class HotPath:
    """One thread that takes the messages of the hot subscriptions of one context."""

    def __init__(self, context: Any) -> None:
        self.context = context
        self._subs: list[Any] = []
        self._lock = threading.Lock()
        self._closed = False
        self._wake = GuardCondition(None, None, context=context)
        self._calling = threading.Lock()  # callbacks never run at the same time
        self._tls = threading.local()  # .pending: published in-process by a running callback
        self._local: dict[str, tuple[Any, ...]] = {}  # topic -> hot subscriptions (in-process)
        self.taken = 0  # messages taken from DDS and delivered (diagnostics, tests)
        self.handed = 0  # messages handed over in-process (see InProcessPublisher)
        self._thread = threading.Thread(target=self._run, name="ros-hot-path", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ process-wide
    @classmethod
    def of(cls, context: Any) -> HotPath:
        """The hot path of ``context`` (started on first use)."""
        with _lock:
            path = _paths.get(id(context))
            if path is None or path._closed or path.context is not context:
                path = cls(context)
                _paths[id(context)] = path
                context.on_shutdown(path.close)
            return path

    def subscribe(
        self,
        node: Any,
        msg_type: Any,
        topic: str,
        qos: Any,
        callback: Callable[[Any], None],
        parse: Callable[[bytes], Any] | None = None,
        **kwargs: Any,
    ) -> Any:
        """``node.create_subscription(...)`` whose messages this thread takes.

        ``parse``: take the serialized message (``raw=True``) and hand ``parse(bytes)`` to
        the callback instead of rclpy's message: for audio, where rclpy's conversion of a
        ``UInt8MultiArray`` to Python was most of a take (see ros/topics.py).
        """
        kwargs.pop("callback_group", None)
        raw = bool(kwargs.pop("raw", False)) or parse is not None
        sub = node.create_subscription(
            msg_type, topic, callback, qos, callback_group=PARKED, raw=raw, **kwargs
        )
        sub._sv_parse = parse
        with self._lock:
            self._subs.append(sub)
            self._index()
        self._poke()
        return sub

    def publisher(self, pub: Any) -> InProcessPublisher:
        """``pub`` (a publisher of a node of this context) wrapped to hand its messages to
        this process's hot subscriptions directly when they are its only subscribers."""
        return InProcessPublisher(pub, self)

    def local(self, topic_name: str) -> tuple[Any, ...]:
        """The live hot subscriptions of this process on ``topic_name`` (fully qualified)."""
        return self._local.get(topic_name, ())

    def _index(self) -> None:
        """Rebuild :attr:`_local` (under ``self._lock``; readers see a whole tuple)."""
        local: dict[str, list[Any]] = {}
        for sub in self._subs:
            local.setdefault(sub.topic_name, []).append(sub)
        self._local = {k: tuple(v) for k, v in local.items()}

    def _forget(self, sub: Any) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
                self._index()

    def hand(self, subs: tuple[Any, ...], msg: Any) -> None:
        """Deliver ``msg`` (a message, or its serialized bytes) to ``subs`` in this thread;
        from inside a hot callback, after the message being delivered (:meth:`_deliver`)."""
        pending = getattr(self._tls, "pending", None)
        if pending is not None:
            pending.append((subs, msg))
            return
        self._deliver(self._hand_now, subs, msg)

    def _deliver(self, first: Callable[..., None], *args: Any) -> None:
        """Run ``first(*args)`` (callbacks, each under the one lock), then, in order, what
        they published in-process meanwhile (and what those callbacks published, and so on)."""
        tls = self._tls
        tls.pending = pending = deque()
        try:
            first(*args)
            while pending:
                self._hand_now(*pending.popleft())
        finally:
            tls.pending = None

    def _hand_now(self, subs: tuple[Any, ...], msg: Any) -> None:
        for sub in subs:
            try:
                with sub.handle:  # destroyed with its node: InvalidHandle, forget it
                    if isinstance(msg, bytes):
                        value = msg if sub.raw else deserialize_message(msg, sub.msg_type)
                    else:
                        value = serialize_message(msg) if sub.raw else msg
                    self._call(sub, value, handed=True)
            except InvalidHandle:
                self._forget(sub)
            except Exception:  # a message it cannot convert must not stop the publisher
                log.exception("hot path: message for %s not delivered", sub.topic_name)

    def _call(self, sub: Any, value: Any, handed: bool) -> None:
        """``sub``'s callback with ``value`` (parsed if it takes a parsed message), under
        the one lock; a callback's bug is logged and stops nothing else."""
        try:
            parse = sub._sv_parse
            if parse is not None:
                value = parse(value)
            with self._calling:
                if handed:
                    self.handed += 1
                else:
                    self.taken += 1
                sub.callback(value)
        except Exception:
            log.exception("hot path: callback of %s failed", sub.topic_name)

    def close(self) -> None:
        """Stop the thread (idempotent; from any thread but its own)."""
        self._closed = True
        with _lock:
            if _paths.get(id(self.context)) is self:
                del _paths[id(self.context)]  # the context may go: keep no reference
        self._poke()
        if threading.current_thread() is not self._thread:
            self._thread.join(RECHECK_S * 2)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def _poke(self) -> None:
        with contextlib.suppress(Exception):  # a shut-down context: the thread ends anyway
            self._wake.trigger()

    # ------------------------------------------------------------------ the thread
    def _run(self) -> None:
        """Wait, drain what is ready, again. Per wake-up (~100 a second in a conversation)
        only what must be done each time: hold the handles (entered and exited directly,
        not through an ExitStack), re-add them to one wait set kept while the set of
        subscriptions does not change (rcl wants them added again after every wait), and
        ask whether the context is still up only when nothing was ready. Building a new
        WaitSet in an ExitStack and calling ``Context.ok()`` every time was ~58 % of this
        thread's samples (py-spy, bench/cpu_stack.py)."""
        timeout_ns = int(RECHECK_S * 1e9)
        ws: Any = None
        ws_subs = -1
        try:
            while not self._closed:
                with self._lock:
                    subs = list(self._subs)
                held: list[Any] = []
                try:
                    live = []
                    for sub in subs:
                        try:
                            sub.handle.__enter__()
                        except InvalidHandle:  # destroyed with its node: forget it
                            self._forget(sub)
                            continue
                        held.append(sub.handle)
                        live.append(sub)
                    for handle in (self._wake.handle, self.context.handle):
                        handle.__enter__()
                        held.append(handle)
                    if ws is None or ws_subs != len(live):
                        if ws is not None:
                            ws.destroy_when_not_in_use()
                        ws = _rclpy.WaitSet(len(live), 1, 0, 0, 0, 0, self.context.handle)
                        ws_subs = len(live)
                    ws.clear_entities()
                    for sub in live:
                        ws.add_subscription(sub.handle)
                    ws.add_guard_condition(self._wake.handle)
                    ws.wait(timeout_ns)
                    ready = ws.get_ready_entities("subscription")
                    if ready:
                        for sub in live:
                            if sub.handle.pointer in ready:
                                self._drain(sub)
                    elif not self.context.ok():
                        break
                except InvalidHandle:
                    continue  # the context or a handle went away mid-build: look again
                except Exception as e:  # noqa: BLE001 - never let the audio path die silently
                    if self._closed or not self.context.ok():
                        break
                    log.error("hot path: %r; waiting on", e)
                finally:
                    for handle in reversed(held):
                        with contextlib.suppress(Exception):
                            handle.__exit__(None, None, None)
        finally:
            if ws is not None:
                with contextlib.suppress(Exception):
                    ws.destroy_when_not_in_use()

    def _drain(self, sub: Any) -> None:
        while True:
            got = sub.handle.take_message(sub.msg_type, sub.raw)
            if got is None:
                return
            self._deliver(self._call, sub, got[0], False)


class InProcessPublisher:
    """A publisher whose messages go straight to the hot subscriptions of its own process
    when no other subscription matches it (see the module's docstring); otherwise, and for
    a lifecycle publisher that is not active, its own ``publish``. Everything else is the
    wrapped publisher's."""

    def __init__(self, pub: Any, hot: HotPath) -> None:
        self.wrapped = pub
        self._hot = hot
        self._topic = pub.topic_name

    def publish(self, msg: Any) -> None:
        """Publish ``msg`` (a message of the publisher's type, or its serialized bytes)."""
        pub = self.wrapped
        subs = self._hot.local(self._topic)
        if (
            not subs
            or not getattr(pub, "is_activated", True)  # LifecyclePublisher: it says why
            or pub.get_subscription_count() > len(subs)  # someone else listens: DDS
        ):
            pub.publish(msg)
            return
        self._hot.hand(subs, msg)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.wrapped, name)
