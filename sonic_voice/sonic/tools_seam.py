"""The seam between the Nova Sonic session and whatever runs tools (no ROS here).

The session never blocks on a tool: for each ``toolUse`` it starts a task that awaits
``ToolProvider.run`` and always sends exactly one ``toolResult`` (result, error, timeout
or cancelled). The tools layer (``sonic_voice.tools``) implements the provider with ROS
actions, services and topics.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

ToolStatus = Literal["ok", "error", "timeout", "cancelled"]


@dataclass
class ToolUse:
    """One tool call from the model, arguments already decoded (double encoding undone)."""

    tool_use_id: str
    name: str
    input: dict[str, Any]
    raw: str = ""


@dataclass
class ToolResult:
    """What goes back to the model as the ``toolResult`` content (a JSON object).

    ``content`` should carry words the model can relay ("the navigation server is not
    running") rather than stack traces.
    """

    tool_use_id: str
    status: ToolStatus
    content: dict[str, Any] = field(default_factory=dict)


class ToolError(Exception):
    """A tool failed in a way the model should hear about (raised by providers)."""


# Progress reports from a running tool (e.g. action feedback), already rate-limited by the
# tools layer. ``text`` is a short sentence the session may speak on Nova 2.
ProgressFn = Callable[[str, dict[str, Any]], None]


class ToolProvider(Protocol):
    def tool_specs(self) -> list[dict[str, Any]]:
        """``[{"toolSpec": {"name", "description", "inputSchema": {"json": "<str>"}}}]``."""
        ...

    async def run(self, use: ToolUse, progress: ProgressFn) -> ToolResult:
        """Run one call to completion (never raises; failures are a ToolResult)."""
        ...

    async def cancel_all(self, reason: str) -> int:
        """Cancel every running call that moves the robot; returns how many."""
        ...

    # Optional (the session's barge-in policy uses them when present, issue 15):
    # ``running_tools() -> [{"tool_use_id", "tool", "cancel_on_barge_in": bool | None, ...}]``
    # and ``async cancel(tool_use_id, reason, wait=True) -> int``.


ToolRunner = Callable[[ToolUse, ProgressFn], Awaitable[ToolResult]]
