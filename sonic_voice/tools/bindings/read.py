"""``read:`` robot state: the latest message on a topic, or the next one within a timeout.

YAML::

    - name: battery
      description: The robot's battery level.
      input: {type: object, properties: {}}
      read:
        type: sensor_msgs/msg/BatteryState
        topic: battery_state
        fields: [percentage, power_supply_status]   # default: all
        wait: latest          # latest (the last one received, else the next) | next
        wait_s: 2.0           # how long to wait for a message
        max_age_s: 0          # > 0: an older latest message does not count
        speak: "Battery at {percentage:.0%}"        # optional, becomes the result's 'say'
        latched: false        # true: transient-local QoS (a latched state topic)

The subscription lives on the ROS port's node from start-up, so "latest" answers at once.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import Any

from sonic_voice.sonic.tools_seam import ToolResult
from sonic_voice.tools.bindings import _ros
from sonic_voice.tools.bindings.base import Binding, Call, Interrupted, LoadContext
from sonic_voice.tools.bindings.base import error as _err
from sonic_voice.tools.mapping import extract

KEYS = frozenset({"type", "topic", "fields", "wait", "wait_s", "max_age_s", "speak", "latched",
                  "timeout_s"})  # fmt: skip


@dataclass
class ReadBinding(Binding):
    kind = "read"
    keys = KEYS
    needs_ros = True

    type_name: str = ""
    cls: Any = None
    name: str = ""
    fields: list[str] | None = None
    wait: str = "latest"
    wait_s: float = 2.0
    max_age_s: float = 0.0
    speak: str = ""
    latched: bool = False
    timeout_s: float | None = None
    latest: tuple[Any, float] | None = None  # (message, monotonic arrival)
    waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future]] = field(default_factory=list)
    port: Any = None
    sub: Any = None

    @classmethod
    def load(cls, ctx: LoadContext, raw: dict[str, Any]) -> ReadBinding:
        _ros.unknown_keys(raw, KEYS)
        type_name, icls, name = _ros.type_and_name(raw, "topic", "topic")
        b = cls(type_name=type_name, cls=icls, name=name, timeout_s=raw.get("timeout_s"))
        b.fields = _ros.field_list("fields", raw.get("fields"), icls)
        b.wait = str(raw.get("wait", "latest"))
        if b.wait not in ("latest", "next"):
            raise ValueError(f"wait: {b.wait!r} is not 'latest' or 'next'")
        b.wait_s = float(raw.get("wait_s", 2.0))
        b.max_age_s = float(raw.get("max_age_s", 0.0))
        b.speak = str(raw.get("speak", ""))
        if b.speak:
            _ros.check_template("speak", b.speak, icls)
        b.latched = bool(raw.get("latched", False))
        return b

    def setup(self, env: Any, tool: Any) -> list[Any]:
        from rclpy.qos import DurabilityPolicy, QoSProfile

        self.port = env.ros
        qos = QoSProfile(depth=1)
        if self.latched:
            qos.durability = DurabilityPolicy.TRANSIENT_LOCAL
        self.sub = self.port.node.create_subscription(self.cls, self.name, self._on_msg, qos)
        env.clients[tool.name] = self.sub
        return [tool]

    def _on_msg(self, msg: Any) -> None:  # ROS thread
        self.latest = (msg, time.monotonic())
        waiters, self.waiters = self.waiters, []
        for loop, fut in waiters:
            self.port.settle(loop, fut, msg)

    async def run(self, call: Call) -> ToolResult:
        tool = call.tool
        msg = None
        age = 0.0
        if self.wait == "latest" and self.latest is not None:
            m, t = self.latest
            age = time.monotonic() - t
            if self.max_age_s <= 0 or age <= self.max_age_s:
                msg = m
        if msg is None:
            fut: asyncio.Future = call.loop.create_future()
            self.waiters.append((call.loop, fut))
            saved = call.deadline
            call.deadline = min(saved, call.loop.time() + self.wait_s)
            try:
                msg = await call.wait(fut)
            except Interrupted as e:
                if e.why == "timeout" and call.loop.time() < saved:
                    return _err(call, f"{tool.name}: nothing arrived on {self.name} within "
                                f"{self.wait_s:g} s.", no_message=True)  # fmt: skip
                raise
            finally:
                call.deadline = saved
                if (call.loop, fut) in self.waiters:
                    self.waiters.remove((call.loop, fut))
            age = 0.0
        content: dict[str, Any] = {"outcome": "read", "topic": self.name,
                                   "message": extract(msg, self.fields),
                                   "age_s": round(age, 3)}  # fmt: skip
        if self.speak:
            said = _ros.render(self.speak, msg)
            if said:
                content["say"] = said
        return ToolResult(call.use_id, "ok", content)


BINDING = ReadBinding
