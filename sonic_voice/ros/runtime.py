"""A sonic_voice process's ROS side: one context, one executor thread, the bridge, signals,
and a bounded shutdown (docs/architecture.md, "Threads" and "Shutdown").

Used by every node executable (:func:`run_node`) and by the all-in-one runner
(``sonic_voice.app.stack``). On SIGINT or SIGTERM:

1. every node's :meth:`~sonic_voice.ros.node.VoiceNode.stop` runs on the loop at once
   (motion goals are cancelled first, the Bedrock stream closed politely when it can be)
   while the executor **keeps spinning**, so cancel responses and last messages still flow;
2. after ``budget_s`` (default 1.5 s) whatever is left is abandoned;
3. the executor stops, its thread is joined, nodes are destroyed, the context shut down.

rclpy's own signal handler is off (``SignalHandlerOptions.NO``): it would shut the context
down at the first Ctrl-C, before any goal could be cancelled.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import rclpy
from rclpy.exceptions import (
    InvalidParameterTypeException,
    InvalidParameterValueException,
    ParameterException,
)
from rclpy.lifecycle import TransitionCallbackReturn

from sonic_voice.ros.bridge import Bridge
from sonic_voice.ros.compat import make_executor
from sonic_voice.ros.node import ConfigError, VoiceNode

log = logging.getLogger(__name__)

SHUTDOWN_BUDGET_S = 1.5
EXIT_CONFIG = 2  # a configuration the user must fix


class SignalRelay:
    """Runs ``on_signal(signum)`` on a thread of its own, never inside the signal handler.

    A Python signal handler runs on the main thread between two bytecodes, possibly while
    that thread holds the very lock the handler needs: ``threading.Event.wait`` holds the
    event's (non-reentrant) lock for a moment on entry, and the main thread waits on the
    stop event 20 times a second, so ``stop.set()`` in the handler deadlocked the runner
    once in ~25 signals (it went on driving, SIGTERM ignored, until killed). The handler
    only writes the signal's number to a pipe (a system call, no Python lock)."""

    def __init__(self, on_signal: Callable[[int], None]) -> None:
        self._on_signal = on_signal
        self._read, self._write = os.pipe()
        os.set_blocking(self._write, False)
        self._thread = threading.Thread(target=self._relay, name="signal-relay", daemon=True)
        self._thread.start()

    def handler(self, signum: int, _frame: Any = None) -> None:
        """The signal handler: returns at once, whatever the main thread holds."""
        with contextlib.suppress(OSError):  # a full pipe: signals are pending anyway
            os.write(self._write, bytes([signum]))

    def _relay(self) -> None:
        while True:
            try:
                data = os.read(self._read, 64)
            except OSError:
                return
            if not data:
                return
            for signum in data:
                try:
                    self._on_signal(signum)
                except Exception:  # the next signal must still be relayed
                    log.exception("signal handling failed")


class Runtime:
    """One process's context, executor thread and orderly shutdown."""

    def __init__(
        self,
        args: list[str] | None = None,
        *,
        domain_id: int | None = None,
        context: Any = None,
    ) -> None:
        self.context = context or rclpy.Context()
        if context is None:
            rclpy.init(
                args=args,
                context=self.context,
                domain_id=domain_id,
                signal_handler_options=rclpy.SignalHandlerOptions.NO,
            )
        self.bridge = Bridge.get()
        self.nodes: list[Any] = []
        self.stop_requested = threading.Event()
        self.signal_name = ""
        self._spinners: list[tuple[Any, threading.Thread]] = []
        self._started = False
        self._closed = False

    # ------------------------------------------------------------------ nodes
    def add(self, node: Any) -> Any:
        """Spin ``node`` on an executor of its own (a SingleThreadedExecutor in a thread).

        One per node, not one for the process: rclpy rebuilds an executor's wait set over
        every entity of every node it spins at each wake-up, in Python; with the four
        nodes of the runner on one executor (125 entities, ~150 wake-ups a second in a
        conversation) that walk was the largest CPU cost of the robot (bench/cpu_stack.py).
        """
        executor = make_executor(self.context)
        executor.add_node(node)
        thread = threading.Thread(
            target=self._spin, args=(executor,), name=f"ros-{node.get_name()}", daemon=True
        )
        self.nodes.append(node)
        self._spinners.append((executor, thread))
        if self._started:
            thread.start()
        return node

    @property
    def spinning(self) -> bool:
        return any(t.is_alive() for _, t in self._spinners)

    def start(self) -> None:
        self._started = True
        for _, thread in self._spinners:
            if not thread.is_alive():
                thread.start()

    def _spin(self, executor: Any) -> None:
        from rclpy.executors import ExternalShutdownException

        while self.context.ok() and not self._closed:
            try:
                executor.spin()
            except (ExternalShutdownException, KeyboardInterrupt):
                return
            except Exception as e:  # noqa: BLE001 - a callback's bug must not stop the process
                if self._closed or not self.context.ok():
                    return
                log.error("executor: a callback raised %r; spinning on", e)

    # ------------------------------------------------------------------ signals
    def handle_signals(self) -> None:
        """SIGINT and SIGTERM request the orderly shutdown (main thread only)."""

        def on_signal(signum: int) -> None:  # the relay's thread
            self.signal_name = signal.Signals(signum).name
            self.stop_requested.set()

        relay = SignalRelay(on_signal)
        signal.signal(signal.SIGINT, relay.handler)
        signal.signal(signal.SIGTERM, relay.handler)

    def wait(self, timeout: float | None = None) -> bool:
        """Until a stop is requested (True) or ``timeout`` passes (False)."""
        return self.stop_requested.wait(timeout)

    # ------------------------------------------------------------------ shutdown
    def shutdown(self, budget_s: float = SHUTDOWN_BUDGET_S) -> float:
        """Stop every node (bounded), then the executor and the context. Returns seconds."""
        if self._closed:
            return 0.0
        t0 = time.monotonic()
        deadline = t0 + budget_s
        voice = [n for n in reversed(self.nodes) if isinstance(n, VoiceNode)]
        for order in sorted({n.stop_order for n in voice}):
            futures = [n.begin_stop() for n in voice if n.stop_order == order]
            left = max(0.0, deadline - time.monotonic())
            _done, pending = concurrent.futures.wait(futures, timeout=left)
            if pending:
                log.warning(
                    "shutdown: %d node(s) still stopping after %.1f s", len(pending), budget_s
                )
        self._closed = True
        for executor, _ in self._spinners:
            with contextlib.suppress(Exception):
                executor.shutdown(timeout_sec=0.2)
        for _, thread in self._spinners:
            if thread.is_alive():
                thread.join(0.5)
        for n in reversed(self.nodes):
            with contextlib.suppress(Exception):
                if isinstance(n, VoiceNode):
                    n.release()
                n.destroy_node()
        self.nodes.clear()
        with contextlib.suppress(Exception):
            self.context.try_shutdown()
        return time.monotonic() - t0


def describe_startup_error(name: str, e: BaseException) -> str | None:
    """One line for an error a user can fix at start-up (bad parameter, params file...)."""
    if isinstance(e, InvalidParameterTypeException):
        return f"{name}: {e.args[0] if e.args else e} (fix the params file or -p value)"
    if isinstance(e, (InvalidParameterValueException, ParameterException, ConfigError)):
        return f"{name}: {e}"
    if type(e).__name__ == "RCLError" and "params file" in str(e):
        msg = str(e).split(", at ")[0]
        return f"{name}: {msg}"
    return None


def run_node(factory: Callable[..., Any], args: list[str] | None = None) -> None:
    """The entry point of a node executable (``ros2 run sonic_voice <node>``).

    With ``autostart`` (the default) this is the node's lifecycle manager: it configures and
    activates the node, and exits 2 with one line when configuration fails. Under a launch
    file that drives the transitions (``LifecycleNode``), pass ``autostart: false``.
    """
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    name = getattr(factory, "__name__", "node")
    try:
        rt = Runtime(args if args is not None else sys.argv)
    except Exception as e:
        line = describe_startup_error(name, e)
        if line is None:
            raise
        print(line, file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    rt.handle_signals()
    try:
        node = factory(context=rt.context)
    except Exception as e:
        line = describe_startup_error(name, e)
        rt.shutdown()
        if line is None:
            raise
        print(line, file=sys.stderr)
        sys.exit(EXIT_CONFIG)
    rt.add(node)
    code = 0
    autostart = node.get_parameter("autostart").value
    # Configured before spinning: see compat.py item 2 (an action client's lock).
    if autostart and node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
        code = EXIT_CONFIG  # the node said why, in one line
    else:
        rt.start()
        if autostart and node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
            code = EXIT_CONFIG
        else:
            rt.wait()
    rt.shutdown()
    Bridge.close_process_bridge()
    sys.exit(code)
