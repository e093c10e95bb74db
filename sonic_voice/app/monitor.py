"""The runner's live log: the package's topics as readable lines, and what the summary and
the offline demo's verdict are made of.

One line per event, one time format (seconds since start), one prefix per source:
``visitor``/``robot`` (transcripts), ``tool``, ``base``, ``viewers``. Transcripts are
printed here only (the session node's own transcript lines go to its debug log when the
runner starts it). The base's position comes from the simulated base itself once a
second, not from a 20 Hz odometry subscription (1.5 % of a core for one log line).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from std_msgs.msg import Int32, String

from sonic_voice import contracts as c
from sonic_voice.ros.topics import subscription

log = logging.getLogger("sonic_voice")


@dataclass
class RunLog:
    """What the monitor saw; the summary and the offline verdict come from here."""

    started: float = field(default_factory=time.monotonic)
    transcripts: list[dict[str, Any]] = field(default_factory=list)
    tool_events: list[dict[str, Any]] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    usage: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def t(self) -> str:
        return f"{time.monotonic() - self.started:6.1f}s"

    def finals(self, role: str) -> list[dict[str, Any]]:
        with self.lock:
            return [
                e
                for e in self.transcripts
                if e.get("role") == role and e.get("stage", "FINAL") == "FINAL" and e.get("text")
            ]

    def last_state(self) -> str:
        with self.lock:
            return self.states[-1] if self.states else ""


def _decode(topic: c.Topic, data: str) -> dict[str, Any] | None:
    try:
        return c.decode(topic, data)
    except c.ContractError as e:
        log.warning("monitor: %s", e)
        return None


def make_monitor(run: RunLog, context: Any) -> Any:
    """A node that turns the package's topics into the readable live log."""
    from rclpy.node import Node

    class Monitor(Node):
        def __init__(self) -> None:
            super().__init__("sonic_voice_monitor", context=context, start_parameter_services=False)
            subscription(self, c.TRANSCRIPT, self._transcript)
            subscription(self, c.TOOL_EVENTS, self._tool)
            subscription(self, c.STATE, self._state)
            subscription(self, c.USAGE, self._usage)
            subscription(self, c.VIEWERS, self._viewers)

        def _transcript(self, msg: String) -> None:
            e = _decode(c.TRANSCRIPT, msg.data)
            if e is None:
                return
            with run.lock:
                run.transcripts.append(e)
            if e.get("stage") == "FINAL" and e.get("text"):
                who = {"USER": "visitor", "ASSISTANT": "robot"}.get(e["role"], e["role"].lower())
                lang = f" [{e['language']}]" if e.get("language") else ""
                log.info("%s  %-7s%s: %s", run.t(), who, lang, e["text"])

        def _tool(self, msg: String) -> None:
            e = _decode(c.TOOL_EVENTS, msg.data)
            if e is None:
                return
            with run.lock:
                run.tool_events.append(e)
            kind, name = e["event"], e["tool"]
            if kind == "start":
                args = json.dumps(e.get("input", {}), ensure_ascii=False)
                log.info("%s  tool   : %s %s", run.t(), name, args)
            elif kind == "progress":
                log.info("%s  tool   : %s ... %s", run.t(), name, e.get("text") or e.get("data"))
            else:
                result = json.dumps(e.get("result", {}), ensure_ascii=False)
                log.info("%s  tool   : %s -> %s %s", run.t(), name, e["status"], result)

        def _state(self, msg: String) -> None:
            e = _decode(c.STATE, msg.data)
            if e is None:
                return
            with run.lock:
                run.states.append(e["state"])
            log.debug("%s  state  : %s", run.t(), e["state"])

        def _usage(self, msg: String) -> None:
            e = _decode(c.USAGE, msg.data)
            if e is not None:
                with run.lock:
                    run.usage.append(e)

        def _viewers(self, msg: Int32) -> None:
            log.info("%s  viewers: %d", run.t(), msg.data)

    return Monitor()


def log_base(run: RunLog, base: Any, last: list[float]) -> None:
    """A ``base`` line when the simulated base moved since the last one."""
    if base is None:
        return
    pos = (round(base.x, 2), round(base.y, 2))
    if not last or (abs(pos[0] - last[0]) + abs(pos[1] - last[1])) > 0.01:
        if last:
            log.info("%s  base   : at (%.2f, %.2f) moving", run.t(), *pos)
        last[:] = pos
