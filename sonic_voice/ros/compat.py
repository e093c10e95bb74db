"""Work-arounds for rclpy, in one quarantined module (like ``kvs/aiortc_hooks.py``).

Everything here touches rclpy's internals or avoids one of its known bugs, for the version
in :data:`TESTED_RCLPY`. ``test/test_ros_compat.py`` fails loudly when the installed rclpy
differs, so an upgrade is a decision: re-check each item below, then update the version.

1. **No MultiThreadedExecutor.** rclpy 9.1.2's MultiThreadedExecutor re-queues tasks that
   have not started instead of waiting (ros2/rclpy#1452, fixed by #1547): with one 50 Hz
   audio subscription it burned 40-57 % of a core and held the GIL every other thread
   needs. Every process spins one ``SingleThreadedExecutor``
   (:func:`make_executor`); slow work runs on the asyncio loop, never in callbacks.
2. **Action goals sent from the loop thread** (:class:`LoopActionClient`): 9.1.2's
   ``send_goal_async`` registers a future under the client's lock and then, in a leftover
   duplicate block outside it, a second one that replaces it; sent from a thread other than
   the executor's, a response taken in between completes the first future and the returned
   one never completes (the race of ros2/rclpy#1123). The lock is made reentrant and held
   across the whole send. The client's futures are not handed to the executor
   (``add_future`` keeps nothing): a stamped future runs each done-callback as one more
   executor task (a trip round the wait loop, holding the GIL) and 9.1.2 never removed the
   orphaned first future from that list. Unstamped, done-callbacks run inline as the
   answer is taken. Must be made before its node is spun by another thread: rclpy adds
   the waitable to the node before it creates its lock (ros2/rclpy#1589), so the runner,
   ``run_node`` and the test harness configure nodes before spinning them (a launch file's
   configure runs on the executor thread itself, which is safe).
3. **Logger severity per call site.** rclpy keys a logger call's severity by its call site
   and raises "Logger severity cannot be changed between calls" when one line logs at two
   severities (``(log.error if fatal else log.warning)(msg)``). :func:`log_at` gives each
   severity its own line.
"""

from __future__ import annotations

import importlib.metadata
import threading
from typing import Any

from rclpy.action import ActionClient

TESTED_RCLPY = "9.1.2"


def rclpy_version() -> str:
    try:
        return importlib.metadata.version("ros-rclpy")
    except importlib.metadata.PackageNotFoundError:  # rclpy from apt: ask the package
        import rclpy

        return getattr(rclpy, "__version__", "unknown")


def make_executor(context: Any = None) -> Any:
    """The process's executor (item 1)."""
    from rclpy.executors import SingleThreadedExecutor

    return SingleThreadedExecutor(context=context)


class LoopActionClient(ActionClient):
    """An ActionClient whose goals may be sent from the asyncio loop's thread (item 2)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.RLock()  # type: ignore[assignment]

    def add_future(self, future: Any) -> None:
        pass  # see item 2

    def remove_future(self, future: Any) -> None:
        pass

    def send_goal_async(
        self, goal: Any, feedback_callback: Any = None, goal_uuid: Any = None
    ) -> Any:
        with self._lock:
            return super().send_goal_async(goal, feedback_callback, goal_uuid)


def log_at(logger: Any, level: str, message: str) -> None:
    """Log ``message`` at ``level`` ('debug'...'fatal') through an rclpy logger (item 3)."""
    if level == "error":
        logger.error(message)
    elif level == "warning":
        logger.warning(message)
    elif level == "info":
        logger.info(message)
    elif level == "debug":
        logger.debug(message)
    else:
        logger.fatal(message)
