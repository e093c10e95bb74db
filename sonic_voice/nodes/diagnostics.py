"""Diagnostics on ``/diagnostics`` (``diagnostic_msgs/DiagnosticArray``) for the nodes.

``diagnostic_updater`` is not published as a wheel, so this is the small part of it the
nodes need: named status tasks, polled at a fixed period and published together, so
``rqt_robot_monitor``, ``diagnostic_aggregator`` or ``ros2 topic echo /diagnostics``
show the health of each node (Bedrock stream age, viewers connected, device status,
latest latency figures) without knowing its private topics.

Usage inside a node (any thread may call :meth:`Diagnostics.publish_now`)::

    from sonic_voice.nodes.diagnostics import Diagnostics, DiagStatus, OK, WARN, ERROR

    self.diag = Diagnostics(self, hardware_id="microphone", period_s=1.0)
    self.diag.add("devices", self._diag_devices)       # -> "audio_io: devices"
    ...
    def _diag_devices(self) -> DiagStatus:
        if self._status["input"] == "lost":
            return DiagStatus(ERROR, "microphone lost", {"input": "lost"})
        return DiagStatus(OK, "ok", {"mic_blocks": self.mic_blocks})

    # in shutdown_resources() / on_cleanup():
    self.diag.close()

A task may also return a ``(level, message)`` or ``(level, message, values)`` tuple. A
task that raises is reported as ERROR with the exception text, so a bug in a status
function shows on the robot monitor instead of silencing the others. Values are
stringified (``DiagnosticStatus.values`` holds strings); floats get 3 significant
decimals.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from rclpy.exceptions import InvalidHandle
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy

from sonic_voice.ros.bridge import Bridge, Periodic
from sonic_voice.ros.topics import quiet_publisher_events

DIAGNOSTICS_TOPIC = "/diagnostics"

OK: int = int.from_bytes(DiagnosticStatus.OK, "little")
WARN: int = int.from_bytes(DiagnosticStatus.WARN, "little")
ERROR: int = int.from_bytes(DiagnosticStatus.ERROR, "little")
STALE: int = int.from_bytes(DiagnosticStatus.STALE, "little")
LEVEL_NAMES = {OK: "OK", WARN: "WARN", ERROR: "ERROR", STALE: "STALE"}

# The QoS diagnostic_updater uses: reliable, a short history.
DIAGNOSTICS_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=10,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)


@dataclass
class DiagStatus:
    """What a status task reports: a level (OK/WARN/ERROR/STALE), a one-line message and
    key/value details."""

    level: int = OK
    message: str = "ok"
    values: Mapping[str, Any] = field(default_factory=dict)


StatusTask = Callable[[], "DiagStatus | tuple"]


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def level_of(value: int | bytes) -> int:
    """A level as an int whether it came as ``bytes`` (the message field) or ``int``."""
    return int.from_bytes(value, "little") if isinstance(value, bytes) else int(value)


def make_status(name: str, status: DiagStatus | tuple, hardware_id: str = "") -> DiagnosticStatus:
    """One ``DiagnosticStatus`` from a task's answer (a DiagStatus or a tuple)."""
    if not isinstance(status, DiagStatus):
        status = DiagStatus(*status)
    if status.level not in LEVEL_NAMES:
        raise ValueError(f"diagnostic level must be OK/WARN/ERROR/STALE, not {status.level!r}")
    msg = DiagnosticStatus()
    msg.level = bytes([status.level])
    msg.name = name
    msg.message = str(status.message)
    msg.hardware_id = hardware_id
    msg.values = [KeyValue(key=str(k), value=_text(v)) for k, v in status.values.items()]
    return msg


class Diagnostics:
    """Named status tasks of one node, published as one ``DiagnosticArray`` per period.

    Status names are ``"<node name>: <task name>"`` (diagnostic_updater's convention), so
    two nodes never collide and an aggregator can group by node. The publisher is a plain
    one (not a lifecycle publisher): an inactive or failed node still says why.
    """

    def __init__(
        self,
        node: Node,
        *,
        hardware_id: str = "",
        period_s: float = 1.0,
        topic: str = DIAGNOSTICS_TOPIC,
    ) -> None:
        if period_s <= 0:
            raise ValueError(f"period_s must be > 0, not {period_s}")
        self.node = node
        self.hardware_id = hardware_id
        self._tasks: dict[str, StatusTask] = {}
        self._lock = threading.Lock()
        self._pub = node.create_publisher(
            DiagnosticArray, topic, DIAGNOSTICS_QOS, event_callbacks=quiet_publisher_events()
        )
        # On the process's loop, not an rclpy timer: a timer would wake the node's executor,
        # which walks every entity of the node in Python (ros/bridge.py Bridge.every).
        self._timer: Periodic | None = Bridge.get().every(period_s, self.publish_now)
        self.published = 0

    def add(self, name: str, task: StatusTask) -> None:
        """Register (or replace) the status task called ``name``."""
        with self._lock:
            self._tasks[name] = task

    def remove(self, name: str) -> None:
        with self._lock:
            self._tasks.pop(name, None)

    def collect(self) -> list[DiagnosticStatus]:
        """Run every task now; a task that raises becomes an ERROR status."""
        with self._lock:
            tasks = list(self._tasks.items())
        prefix = self.node.get_name()
        out = []
        for name, task in tasks:
            full = f"{prefix}: {name}"
            try:
                out.append(make_status(full, task(), self.hardware_id))
            except Exception as e:  # noqa: BLE001 - report, never silence the other tasks
                out.append(
                    make_status(
                        full, DiagStatus(ERROR, f"status task failed: {e!r}"), self.hardware_id
                    )
                )
        return out

    def publish_now(self) -> None:
        """Publish all statuses at once (e.g. right after a state change)."""
        pub = self._pub
        if pub is None:
            return
        try:
            statuses = self.collect()
            if not statuses:
                return
            arr = DiagnosticArray()
            arr.header.stamp = self.node.get_clock().now().to_msg()
            arr.status = statuses
            pub.publish(arr)
        except InvalidHandle:
            # Closed meanwhile (the loop's tick raced close()), or the node was destroyed
            # without close(): nothing to say, and nothing more to tick for.
            timer, self._timer = self._timer, None
            if timer is not None:
                timer.cancel()
            return
        self.published += 1

    def close(self) -> None:
        """Stop the timer and the publisher (idempotent)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._pub is not None:
            self.node.destroy_publisher(self._pub)
            self._pub = None
