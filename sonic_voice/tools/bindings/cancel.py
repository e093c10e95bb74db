"""``cancel: {}`` a tool that only stops what is running (the provider does the work:
a cancel tool has ``cancels_running`` on, and its result says how many calls it stopped)."""

from __future__ import annotations

from typing import Any

from sonic_voice.sonic.tools_seam import ToolResult
from sonic_voice.tools.bindings.base import Binding, Call, LoadContext


class CancelBinding(Binding):
    kind = "cancel"
    keys = frozenset()

    @classmethod
    def load(cls, ctx: LoadContext, raw: dict[str, Any]) -> CancelBinding:
        if raw:
            raise ValueError(f"takes no settings (got {sorted(raw)})")
        return cls()

    async def run(self, call: Call) -> ToolResult:
        n = call.cancelled_calls
        return ToolResult(
            call.use_id,
            "ok",
            {"outcome": "stopped", "cancelled_calls": n,
             "message": f"Stopped {n} running task(s)." if n else "Nothing was running."},
        )  # fmt: skip


BINDING = CancelBinding
