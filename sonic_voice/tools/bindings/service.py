"""``service:`` one ROS 2 service call per tool call.

YAML::

    service:
      type: std_srvs/srv/SetBool
      name: lights
      request: {data: {input: on}}
      response: [success, message]   # or all
      ok_field: success              # a bool response field that must be true
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from sonic_voice.sonic.tools_seam import ToolResult
from sonic_voice.tools.bindings import _ros
from sonic_voice.tools.bindings.base import Binding, Call, Interrupted, LoadContext
from sonic_voice.tools.bindings.base import error as _err
from sonic_voice.tools.mapping import ValueSpec, extract, resolve_field

KEYS = frozenset({"type", "name", "request", "response", "ok_field", "timeout_s"})


@dataclass
class ServiceBinding(Binding):
    kind = "service"
    keys = KEYS
    needs_ros = True

    type_name: str = ""
    cls: Any = None
    name: str = ""
    mapping: dict[str, ValueSpec] = field(default_factory=dict)
    returns: list[str] | None = None
    ok_field: str = ""
    timeout_s: float | None = None
    client: Any = None
    tables: dict[str, Any] = field(default_factory=dict)
    port: Any = None

    @classmethod
    def load(cls, ctx: LoadContext, raw: dict[str, Any]) -> ServiceBinding:
        _ros.unknown_keys(raw, KEYS)
        type_name, icls, name = _ros.type_and_name(raw, "service", "name")
        b = cls(type_name=type_name, cls=icls, name=name, tables=ctx.tables)
        b.timeout_s = raw.get("timeout_s")
        b.mapping = _ros.mapping("request", raw.get("request"), icls.Request, ctx.props, ctx.tables)
        b.returns = _ros.field_list("response", raw.get("response"), icls.Response)
        ok = raw.get("ok_field", "")
        if ok:
            ftype = resolve_field(icls.Response, ok)
            if ftype != "boolean":
                raise ValueError(f"ok_field {ok!r} must be a boolean field (it is {ftype})")
            b.ok_field = ok
        return b

    def setup(self, env: Any, tool: Any) -> list[Any]:
        self.port = env.ros
        self.client = self.port.node.create_client(self.cls, self.name)
        env.clients[tool.name] = self.client
        return [tool]

    async def run(self, call: Call) -> ToolResult:
        tool, use, env = call.tool, call.use, call.env
        req = _ros.build(self.port, self.cls.Request, self.mapping, use.input, self.tables)
        if not await _ros.wait_ready(call, self.client.service_is_ready):
            return _err(
                call,
                f"{tool.name} could not run: the {self.name} service is not available "
                f"(waited {tool.server_wait_s:g} s).",
                server_absent=True,
            )
        call.deadline = call.loop.time() + tool.timeout_s
        fut: asyncio.Future = call.loop.create_future()
        env.mark(use.tool_use_id, "goal_sent")
        rfut = self.client.call_async(req)  # sent under the client's lock: safe from the loop
        rfut.add_done_callback(
            self.port.relay(
                call.loop, fut, call.wake, lambda: env.mark(use.tool_use_id, "result_response")
            )
        )
        try:
            resp = await call.wait(fut)
            env.mark(use.tool_use_id, "result")
        except (Interrupted, asyncio.CancelledError):
            self.client.remove_pending_request(rfut)
            raise
        content = {"response": extract(resp, self.returns)}
        if self.ok_field and not extract(resp, [self.ok_field])[self.ok_field]:
            return ToolResult(
                use.tool_use_id,
                "error",
                {"outcome": "failed", "error": f"{tool.name}: the {self.name} service reported "
                 "failure.", **content},
            )  # fmt: skip
        return ToolResult(use.tool_use_id, "ok", {"outcome": "done", **content})


BINDING = ServiceBinding
