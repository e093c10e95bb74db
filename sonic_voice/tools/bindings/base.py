"""What every tool kind shares: the plug-in interface, the load context and the running call.

A kind is one module under ``sonic_voice.tools.bindings`` holding one :class:`Binding`
subclass. It owns its YAML section (``keys``), checks it at start-up (``load``), may do
start-up work once the provider exists (``start``: make clients, start servers, build an
index) and runs one call (``run``). Everything else that makes a tool call safe is common
and lives in the provider and in :class:`Call`: the JSON-schema input check, the
allowlist, ``requires_confirmation``, the timeout, cancellation (barge-in, a stop tool,
session end, shutdown), rate-limited spoken progress and exactly one ToolResult per call.

A binding waits only through :meth:`Call.wait`, which raises :class:`Interrupted` when the
call is cancelled or its deadline passes; a binding with something to undo (a goal to
cancel, a message to send) catches it, undoes, and re-raises (adding ``extra`` facts for
the model, e.g. ``cancel_accepted``).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

from sonic_voice.sonic.tools_seam import ProgressFn, ToolResult, ToolUse

if TYPE_CHECKING:
    from sonic_voice.tools.config import ToolDef

log = logging.getLogger(__name__)


class ToolConfigError(ValueError):
    """A tool configuration cannot be used; the message names file, tool and field."""


@dataclass
class LoadContext:
    """Where a tool's section is being read, and what it may refer to."""

    path: Path  # the tools YAML
    line: int | None
    tool: str
    kind: str
    props: dict[str, Any]  # the input schema's properties
    tables: dict[str, Any]
    defaults: dict[str, Any]

    @property
    def where(self) -> str:
        at = f"{self.path}:{self.line}" if self.line else str(self.path)
        return f"{at}: tool {self.tool!r}"

    @property
    def base_dir(self) -> Path:
        """Relative paths in a tool section are relative to the tools file's folder."""
        return self.path.parent

    def error(self, field_: str, message: str) -> ToolConfigError:
        """One line naming file, line, tool and field (``kind.field``)."""
        f = f"{self.kind}.{field_}" if field_ else self.kind
        return ToolConfigError(f"{self.where}: {f}: {message}")


@dataclass
class ProgressSpec:
    """How often progress reaches the session, and how often it may be spoken."""

    every_s: float = 2.0
    speak_every_s: float = 10.0


class Binding:
    """One tool kind's settings and behaviour (subclass per kind, see the module docstring)."""

    kind: ClassVar[str] = ""
    keys: ClassVar[frozenset[str]] = frozenset()
    needs_ros: ClassVar[bool] = False
    takes_input: ClassVar[bool] = True  # False: the input schema comes from elsewhere (mcp)
    default_input: ClassVar[dict[str, Any] | None] = None  # schema when 'input' is omitted

    timeout_s: float | None = None  # a kind-level timeout_s (the tool's own wins)
    progress: ProgressSpec | None = None

    @classmethod
    def load(cls, ctx: LoadContext, raw: dict[str, Any]) -> Binding:
        """Check the YAML section and return the binding; raise ``ctx.error(field, why)``."""
        raise NotImplementedError

    def moves_robot_default(self) -> bool:
        return False

    def setup(self, env: Any, tool: ToolDef) -> list[ToolDef]:
        """Start-up work when the provider is built (make clients, start servers, build an
        index); returns the tools this entry offers (usually ``[tool]``; an MCP server
        offers one per server tool). Raise ToolConfigError naming file, tool and field."""
        return [tool]

    def after_setup(self, env: Any, tool: ToolDef) -> None:
        """Checks that need every tool set up (e.g. an agent's tool names)."""

    async def run(self, call: Call) -> ToolResult:
        raise NotImplementedError

    def on_shutdown(self, call: Call) -> None:
        """Any thread, at node shutdown, for each running call (send what must go out)."""

    def stop_now(self, call: Call) -> None:
        """Any thread, when the call is cancelled (stop tool, barge-in, safety stop): send
        what stops the robot at once, before the call's coroutine even resumes (an action:
        its cancel request). The call is then cancelled on its loop as usual; ``run``
        reuses what was sent here."""

    def close(self) -> None:
        """Free what ``setup`` made (any thread, once per binding, after the calls ended)."""


class Interrupted(Exception):
    """The call was cancelled or ran out of time; bindings undo and re-raise."""

    def __init__(self, why: str, reason: str = "") -> None:
        super().__init__(why)
        self.why = why  # "cancelled" | "timeout"
        self.reason = reason
        self.extra: dict[str, Any] = {}


@dataclass
class Call:
    """One running tool call: its cancel signal, deadline and progress reporter."""

    tool: ToolDef
    use: ToolUse
    loop: asyncio.AbstractEventLoop
    deadline: float  # loop time
    progress_fn: ProgressFn | None = None
    env: Any = None  # the provider's environment (marks, ROS port, other tools)
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    accepted: asyncio.Event = field(default_factory=asyncio.Event)  # action: goal accepted
    reason: str = ""
    goal_handle: Any = None  # action kinds
    goal_id: Any = None  # action kinds: the goal's UUID, ours (a cancel needs no answer)
    stop_msg: Any = None  # topic kinds: sent when a timed publication ends early
    stop_future: Any = None  # action kinds: the cancel request stop_now sent
    gate: asyncio.Future | None = None
    last_progress: float = -1e9
    last_spoken: float = -1e9
    progress_count: int = 0
    cancelled_calls: int = 0  # set when the tool cancels_running
    started: float = field(default_factory=time.monotonic)

    @property
    def use_id(self) -> str:
        return self.use.tool_use_id

    @property
    def input(self) -> dict[str, Any]:
        return self.use.input

    def wake(self) -> None:
        """Loop thread: release the current :meth:`wait` (it then looks at why)."""
        if self.gate is not None and not self.gate.done():
            self.gate.set_result(None)

    def cancel(self, reason: str) -> None:
        """Loop thread: interrupt this call."""
        if not self.cancel_event.is_set():
            self.reason = reason
            self.cancel_event.set()
        self.wake()

    async def wait(self, aw: Awaitable[Any] | asyncio.Future) -> Any:
        """``aw``'s result, or :class:`Interrupted` on cancel or at the deadline.

        Awaits one gate that the outcome, :meth:`cancel` and the deadline timer all
        release directly, so the coroutine resumes one loop iteration after the outcome
        lands (``asyncio.wait`` would add a task and an iteration per wait). A coroutine
        given here is run as a task and cancelled when the call is interrupted; a future
        given here is left alone (the caller may still want its answer).
        """
        owned = not isinstance(aw, asyncio.Future)
        fut = asyncio.ensure_future(aw)
        loop = self.loop
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            self.wake()

        timer = loop.call_at(self.deadline, expire)
        fut.add_done_callback(lambda _f: self.wake())
        try:
            while not (fut.done() or self.cancel_event.is_set() or expired):
                self.gate = loop.create_future()
                await self.gate
        except asyncio.CancelledError:
            if owned:
                fut.cancel()
            raise
        finally:
            timer.cancel()
            self.gate = None
        if fut.done():
            return fut.result()
        if owned:
            fut.cancel()
        if self.cancel_event.is_set():
            raise Interrupted("cancelled", self.reason)
        raise Interrupted("timeout")

    async def sleep_until(self, when: float) -> None:
        """Sleep until loop time ``when`` (raises Interrupted if cancelled first)."""
        if when <= self.loop.time():
            if self.cancel_event.is_set():
                raise Interrupted("cancelled", self.reason)
            return
        saved, self.deadline = self.deadline, min(self.deadline, when)
        try:
            await self.wait(self.loop.create_future())
        except Interrupted as i:
            if i.why == "cancelled" or self.loop.time() >= saved:
                raise
        finally:
            self.deadline = saved

    def report(self, data: dict[str, Any], text: str = "") -> None:
        """Loop thread: rate-limited progress; ``text`` is spoken at a slower rate."""
        spec = self.tool.binding.progress or ProgressSpec()
        self.progress_count += 1
        now = time.monotonic()
        if self.progress_fn is None or self.finished.is_set():
            return
        if now - self.last_progress < spec.every_s:
            return
        self.last_progress = now
        payload = {**data, "speak": False}
        if text and now - self.last_spoken >= spec.speak_every_s:
            self.last_spoken = now
            payload["speak"] = True
        try:
            self.progress_fn(text, payload)
        except Exception:
            log.exception("progress callback failed")

    def report_threadsafe(self, data: dict[str, Any], text: str = "") -> None:
        """From any thread: :meth:`report` on the call's loop."""
        try:
            self.loop.call_soon_threadsafe(self.report, data, text)
        except RuntimeError:  # loop closed
            pass


def ok(call: Call, **content: Any) -> ToolResult:
    return ToolResult(call.use_id, "ok", content)


def error(call: Call | ToolUse, text: str, **flags: Any) -> ToolResult:
    use_id = call.use_id if isinstance(call, Call) else call.tool_use_id
    return ToolResult(use_id, "error", {"error": text, **flags})


def interrupted_result(call: Call, i: Interrupted) -> ToolResult:
    """The words the model hears when a call was stopped."""
    name = call.tool.name
    if i.why == "timeout":
        return ToolResult(
            call.use_id,
            "timeout",
            {"error": f"{name} did not finish within {call.tool.timeout_s:g} s, so it was "
                      "stopped.", **i.extra},
        )  # fmt: skip
    why = f" ({i.reason})" if i.reason else ""
    return ToolResult(call.use_id, "cancelled", {"error": f"{name} was stopped{why}.", **i.extra})


def check_keys(ctx: LoadContext, raw: Any, allowed: frozenset[str] | set[str]) -> dict[str, Any]:
    """The section as a dict with only ``allowed`` keys (else one line naming the key)."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ctx.error("", "must be a mapping of settings")
    unknown = set(raw) - set(allowed) - {"__line__"}
    if unknown:
        raise ctx.error(
            sorted(unknown)[0], f"unknown key(s) {sorted(unknown)} (allowed: {sorted(allowed)})"
        )
    return {k: v for k, v in raw.items() if k != "__line__"}


def number(
    ctx: LoadContext, raw: dict[str, Any], key: str, default: float, lo: float = 0.0
) -> float:
    v = raw.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < lo:
        raise ctx.error(key, f"must be a number >= {lo:g} (got {v!r})")
    return float(v)


def text(ctx: LoadContext, raw: dict[str, Any], key: str, required: bool = True) -> str:
    v = raw.get(key)
    if v is None and not required:
        return ""
    if not isinstance(v, str) or not v.strip():
        raise ctx.error(key, "is required (a non-empty string)" if v is None else
                        f"must be a non-empty string (got {v!r})")  # fmt: skip
    return v
