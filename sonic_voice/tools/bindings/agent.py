"""``agent:`` hand a task to a Strands agent; its answer is the toolResult.

YAML::

    - name: concierge
      description: Plans an errand that needs several steps (places, times, bookings).
      agent:
        system_prompt: You help visitors of this building. Answer in one or two sentences.
        model_id: amazon.nova-lite-v1:0
        region: us-east-1               # optional; endpoint_url: for a stand-in/PrivateLink
        tools: [time_get_current_time, faq]   # tools of this file (MCP ones by their name)
        max_tokens: 1024

Default input: ``{task: string}``. The agent (``strands-agents``: its BedrockModel calls
Converse streaming through boto3, credentials from the usual chain) runs as one more
asyncio task on the session's loop, so the conversation goes on while it works (the
robot can say "let me check"). Its tools are this package's tools, called through the
same provider: the same allowlist, input check, ``requires_confirmation``, timeouts and
cancellation apply to the agent's calls as to the model's. A cancelled or timed-out agent
call cancels the agent and every tool call it has running.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from sonic_voice.sonic.tools_seam import ToolResult, ToolUse
from sonic_voice.tools.bindings.base import (
    Binding,
    Call,
    Interrupted,
    LoadContext,
    ProgressSpec,
    ToolConfigError,
    check_keys,
    number,
    text,
)
from sonic_voice.tools.bindings.base import error as _err

log = logging.getLogger(__name__)

KEYS = frozenset({"system_prompt", "model_id", "region", "endpoint_url", "tools", "max_tokens",
                  "temperature", "timeout_s"})  # fmt: skip
DEFAULT_INPUT = {
    "type": "object",
    "properties": {
        "task": {"type": "string", "minLength": 1,
                 "description": "What the visitor wants done, with every detail they gave."}
    },
    "required": ["task"],
}  # fmt: skip


@dataclass
class AgentBinding(Binding):
    kind = "agent"
    keys = KEYS
    default_input = DEFAULT_INPUT

    system_prompt: str = ""
    model_id: str = ""
    region: str | None = None
    endpoint_url: str | None = None
    tool_names: list[str] = field(default_factory=list)
    max_tokens: int = 1024
    temperature: float | None = None
    timeout_s: float | None = None
    progress: ProgressSpec | None = field(default_factory=lambda: ProgressSpec(every_s=0.0))
    where: str = ""
    env: Any = None
    model: Any = None

    @classmethod
    def load(cls, ctx: LoadContext, raw: dict[str, Any]) -> AgentBinding:
        raw = check_keys(ctx, raw, KEYS)
        b = cls(where=ctx.where, timeout_s=raw.get("timeout_s"))
        if "task" not in ctx.props:
            raise ctx.error("", "the input schema needs a 'task' string property")
        b.system_prompt = text(ctx, raw, "system_prompt")
        b.model_id = text(ctx, raw, "model_id")
        b.region = text(ctx, raw, "region", required=False) or None
        b.endpoint_url = text(ctx, raw, "endpoint_url", required=False) or None
        tools = raw.get("tools", [])
        if not isinstance(tools, list) or not all(isinstance(t, str) for t in tools):
            raise ctx.error("tools", "must be a list of tool names of this file")
        if ctx.tool in tools:
            raise ctx.error("tools", "an agent cannot call itself")
        b.tool_names = list(tools)
        b.max_tokens = int(number(ctx, raw, "max_tokens", 1024, 1))
        if "temperature" in raw:
            b.temperature = number(ctx, raw, "temperature", 0.0)
        return b

    def setup(self, env: Any, tool: Any) -> list[Any]:
        """Make the model (its boto3 client) once: a client costs ~0.2-0.5 s to make
        (botocore loads the service model), which would delay every call."""
        from strands.models.bedrock import BedrockModel

        self.env = env
        kwargs: dict[str, Any] = {"model_id": self.model_id, "max_tokens": self.max_tokens}
        if self.temperature is not None:
            kwargs["temperature"] = self.temperature
        self.model = BedrockModel(region_name=self.region, endpoint_url=self.endpoint_url, **kwargs)
        return [tool]

    def after_setup(self, env: Any, tool: Any) -> None:
        """Every tool the agent names exists and is allowed (all entries are set up now)."""
        for name in self.tool_names:
            if env.tool(name) is None:
                declared = ", ".join(sorted(env.provider.tools)) or "none"
                why = ("is not allowed (allowlist)" if name in env.provider.config.tools
                       else f"is not a tool of this file (offered: {declared})")  # fmt: skip
                raise ToolConfigError(f"{self.where}: agent.tools: {name!r} {why}")
            if env.tool(name).kind == "agent":
                raise ToolConfigError(f"{self.where}: agent.tools: {name!r} is an agent "
                                      "(agents do not call agents)")  # fmt: skip

    def make_agent(self, call: Call) -> Any:
        from strands import Agent
        from strands.tools.tools import PythonAgentTool

        tools = [PythonAgentTool(n, self._spec(n), self._runner(call, n)) for n in self.tool_names]
        return Agent(model=self.model, tools=tools, system_prompt=self.system_prompt,
                     callback_handler=None)  # fmt: skip

    def _spec(self, name: str) -> dict[str, Any]:
        t = self.env.tool(name)
        return {"name": name, "description": t.description, "inputSchema": {"json": t.schema}}

    def _runner(self, call: Call, name: str) -> Any:
        provider = self.env.provider

        async def run_tool(tool_use: dict[str, Any], **_state: Any) -> dict[str, Any]:
            use = ToolUse(f"{call.use_id}/{tool_use['toolUseId']}", name,
                          dict(tool_use.get("input") or {}))  # fmt: skip
            call.report({"feedback": {"agent_tool": name, "input": use.input}})
            res = await provider.run(use, lambda _t, _d: None)
            return {
                "toolUseId": tool_use["toolUseId"],
                "status": "success" if res.status == "ok" else "error",
                "content": [{"json": {"status": res.status, **res.content}}],
            }

        return run_tool

    async def run(self, call: Call) -> ToolResult:
        task = str(call.input["task"])
        agent = self.make_agent(call)
        try:
            result = await call.wait(agent.invoke_async(task))
        except Interrupted:
            raise
        except Exception as e:  # noqa: BLE001 - the model hears why, in words
            log.warning("agent %s failed: %s", call.tool.name, e)
            return _err(call, f"{call.tool.name} could not finish: {e}")
        answer = str(result).strip()
        return ToolResult(call.use_id, "ok", {"outcome": "done", "answer": answer})


BINDING = AgentBinding
