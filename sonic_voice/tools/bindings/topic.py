"""``topic:`` publish a message once, or repeat it at a rate for a duration.

YAML::

    topic:
      type: geometry_msgs/msg/Twist
      name: cmd_vel
      message: {angular.z: {input: direction, map: {left: 0.5, right: -0.5}}}
      rate_hz: 10                     # with duration_s: repeat ...
      duration_s: {input: degrees, scale: 0.0349066}   # ... for this long
      then: {}                        # sent when done, timed out or cancelled
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sonic_voice.sonic.tools_seam import ToolResult
from sonic_voice.tools.bindings import _ros
from sonic_voice.tools.bindings.base import Binding, Call, Interrupted, LoadContext
from sonic_voice.tools.mapping import ValueSpec, extract, parse_value_spec

KEYS = frozenset({"type", "name", "message", "rate_hz", "duration_s", "then", "qos_depth",
                  "timeout_s"})  # fmt: skip


@dataclass
class TopicBinding(Binding):
    kind = "topic"
    keys = KEYS
    needs_ros = True

    type_name: str = ""
    cls: Any = None
    name: str = ""
    mapping: dict[str, ValueSpec] = field(default_factory=dict)
    rate_hz: float = 0.0
    duration: ValueSpec | None = None
    then: dict[str, ValueSpec] | None = None
    qos_depth: int = 10
    timeout_s: float | None = None
    pub: Any = None
    tables: dict[str, Any] = field(default_factory=dict)
    port: Any = None

    @classmethod
    def load(cls, ctx: LoadContext, raw: dict[str, Any]) -> TopicBinding:
        _ros.unknown_keys(raw, KEYS)
        type_name, icls, name = _ros.type_and_name(raw, "topic", "name")
        b = cls(type_name=type_name, cls=icls, name=name, tables=ctx.tables)
        b.timeout_s = raw.get("timeout_s")
        b.mapping = _ros.mapping("message", raw.get("message"), icls, ctx.props, ctx.tables)
        b.rate_hz = float(raw.get("rate_hz", 0.0))
        if "duration_s" in raw:
            b.duration = parse_value_spec("duration_s", raw["duration_s"], ctx.props, ctx.tables)
            if b.rate_hz <= 0:
                b.rate_hz = 10.0
        if "then" in raw:
            b.then = _ros.mapping("then", raw.get("then"), icls, ctx.props, ctx.tables)
        b.qos_depth = int(raw.get("qos_depth", 10))
        return b

    def moves_robot_default(self) -> bool:
        return self.duration is not None

    def setup(self, env: Any, tool: Any) -> list[Any]:
        self.port = env.ros
        self.pub = self.port.node.create_publisher(self.cls, self.name, self.qos_depth)
        env.clients[tool.name] = self.pub
        return [tool]

    def on_shutdown(self, call: Call) -> None:
        if call.stop_msg is not None:
            self.pub.publish(call.stop_msg)

    async def run(self, call: Call) -> ToolResult:
        tool, use, env = call.tool, call.use, call.env
        msg = _ros.build(self.port, self.cls, self.mapping, use.input, self.tables)
        sent = extract(msg, list(self.mapping) or None)
        if self.duration is None:
            self.pub.publish(msg)
            env.mark(use.tool_use_id, "result")
            return ToolResult(
                use.tool_use_id, "ok", {"outcome": "sent", "topic": self.name, "message": sent}
            )
        duration = float(self.duration.evaluate(use.input, self.tables, None))
        stop_msg = (
            _ros.build(self.port, self.cls, self.then, use.input, self.tables)
            if self.then is not None
            else None
        )
        call.stop_msg = stop_msg
        loop = call.loop
        period = 1.0 / self.rate_hz
        start = loop.time()
        end = start + min(duration, tool.timeout_s)
        call.deadline = end + 1.0  # the publication's own end comes first
        count = 0
        try:
            while True:
                self.pub.publish(msg)
                count += 1
                nxt = start + count * period
                if nxt >= end:
                    break
                await call.sleep_until(nxt)
            await call.sleep_until(end)
        except Interrupted as i:
            i.extra["messages_sent"] = count
            raise
        finally:
            if stop_msg is not None and not env.closed:
                self.pub.publish(stop_msg)
        return ToolResult(
            use.tool_use_id,
            "ok",
            {"outcome": "done", "topic": self.name, "message": sent,
             "seconds": round(duration, 2), "messages_sent": count},
        )  # fmt: skip


BINDING = TopicBinding
