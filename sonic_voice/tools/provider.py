"""ToolsProvider: the session's tool calls, composed from the tools' kinds by tool name.

What every call shares lives here, once: the allowlist, the JSON-schema input check
(``requires_confirmation`` is a required ``confirmed: true`` argument), the timeout,
cancellation (barge-in, a stop tool, session end, shutdown), rate-limited spoken progress
and exactly one ToolResult with words the model can relay. Each kind's work is its
binding's ``run`` (``sonic_voice.tools.bindings``); a kind that needs ROS gets the
:class:`~sonic_voice.tools.bindings._ros.RosPort`, made only when such a tool exists, so a
provider of knowledge, MCP and agent tools never imports rclpy.

Threads: ``run``/``cancel``/``cancel_all`` are awaited on the session's asyncio loop;
``shutdown`` may come from any thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from sonic_voice.sonic.tools_seam import ProgressFn, ToolResult, ToolUse
from sonic_voice.tools.bindings.base import Call, Interrupted, ToolConfigError, interrupted_result
from sonic_voice.tools.bindings.base import error as _err
from sonic_voice.tools.config import ToolConfig, ToolDef
from sonic_voice.tools.mapping import MappingError, table_names

log = logging.getLogger(__name__)

CANCEL_ACK_S = 3.0
SHUTDOWN_CANCEL_WAIT_S = 0.3  # for cancels sent at shutdown to be acknowledged


@dataclass
class ProviderEnv:
    """What bindings get from the provider at set-up and while running."""

    provider: ToolsProvider
    parent: Any = None  # the node the provider serves (ROS kinds), or None
    clients: dict[str, Any] = field(default_factory=dict)  # tool name -> its ROS client
    _ros: Any = None

    @property
    def ros(self) -> Any:
        """The ROS port (made on first use, by the one factory the bridge replaces)."""
        if self._ros is None:
            if self.parent is None:
                raise ToolConfigError("ROS tools need a node (load_provider(node, ...))")
            from sonic_voice.tools.bindings._ros import make_ros_port

            self._ros = make_ros_port(self.parent)
        return self._ros

    @property
    def tables(self) -> dict[str, Any]:
        return self.provider.config.tables

    @property
    def closed(self) -> bool:
        return self.provider._closed

    def mark(self, use_id: str, what: str) -> None:
        self.provider._mark(use_id, what)

    def tool(self, name: str) -> ToolDef | None:
        return self.provider.tools.get(name)


class ToolsProvider:
    """Implements the session's ToolProvider over YAML-declared tools of any kind."""

    def __init__(
        self, config: ToolConfig, allowlist: list[str] | None = None, node: Any = None
    ) -> None:
        self.node = node
        self.config = config
        allowed = set(config.tools)
        if config.allow is not None:
            allowed &= set(config.allow)
        if allowlist:
            allowed &= set(allowlist)
        self.blocked = sorted(set(config.tools) - allowed)
        self.env = ProviderEnv(self, node)
        self._clients = self.env.clients
        self._active: dict[str, Call] = {}
        self._closed = False
        self.marks: dict[str, dict[str, float]] = {}  # bench/tool_latency.py
        self.keep_marks = False
        self.tools: dict[str, ToolDef] = {}
        self._bindings: list[Any] = []
        try:
            for name, t in config.tools.items():
                if name not in allowed:
                    continue
                if t.binding.needs_ros and node is None:
                    raise ToolConfigError(
                        f"{t.source}: tool {name!r}: {t.kind}: needs a ROS node "
                        "(load_provider(node, ...), not load_tools)"
                    )
                self._bindings.append(t.binding)
                for offered in t.binding.setup(self.env, t):
                    if offered.name in self.tools:
                        raise ToolConfigError(
                            f"{t.source}: tool {name!r}: offers {offered.name!r}, which "
                            "another tool already offers (set a different prefix)"
                        )
                    self.tools[offered.name] = offered
            for name, t in config.tools.items():
                if name in allowed:
                    t.binding.after_setup(self.env, t)
        except BaseException:
            self._close_bindings()
            raise
        if self.env._ros is not None:
            self.env._ros.start()

    @property
    def _ros(self) -> Any:
        return self.env._ros

    # ------------------------------------------------------------------ ToolProvider
    def tool_specs(self) -> list[dict[str, Any]]:
        return [t.spec() for t in self.tools.values()]

    @property
    def running(self) -> int:
        return len(self._active)

    def running_tools(self) -> list[dict[str, Any]]:
        """What runs now: ``[{tool_use_id, tool, kind, moves_robot, cancel_on_barge_in,
        seconds}]`` (for the session's barge-in policy and diagnostics)."""
        now = time.monotonic()
        return [
            {"tool_use_id": c.use_id, "tool": c.tool.name, "kind": c.tool.kind,
             "moves_robot": c.tool.moves_robot,
             "cancel_on_barge_in": c.tool.cancel_on_barge_in,
             "seconds": round(now - c.started, 3)}
            for c in self._active.values()
        ]  # fmt: skip

    async def run(self, use: ToolUse, progress: ProgressFn) -> ToolResult:
        """Run one call to completion; failures come back as a ToolResult, never raised."""
        self._mark(use.tool_use_id, "received")
        tool = self.tools.get(use.name)
        if tool is None:
            if use.name in self.config.tools:
                return _err(use, f"{use.name} is not allowed on this robot right now.")
            return _err(use, f"There is no tool named {use.name}.")
        if self._closed:
            return _err(use, f"{use.name} is unavailable: the robot's tools are shutting down.")
        problem = self._validate(tool, use.input)
        if problem:
            return _err(use, problem, invalid_input=True)
        loop = asyncio.get_running_loop()
        call = Call(
            tool=tool, use=use, loop=loop, deadline=loop.time() + tool.timeout_s,
            progress_fn=progress, env=self.env,
        )  # fmt: skip
        try:
            if tool.cancels_running:
                call.cancelled_calls = await self.cancel_all(f"the {use.name} tool")
            self._active[use.tool_use_id] = call
            try:
                result = await tool.binding.run(call)
            except Interrupted as i:
                result = interrupted_result(call, i)
            if tool.cancels_running and tool.kind != "cancel":
                result.content["cancelled_calls"] = call.cancelled_calls
            return result
        except MappingError as e:
            return _err(use, f"{use.name}: {e}", invalid_input=True)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("tool %s failed", use.name)
            return _err(use, f"{use.name} failed: {e}")
        finally:
            self._active.pop(use.tool_use_id, None)
            call.finished.set()

    async def cancel(
        self, which: str | Callable[[Call], bool], reason: str, wait: bool = True
    ) -> int:
        """Cancel the running call with this tool_use_id, or every call ``which(call)``
        selects; waits (bounded) until they have ended. Returns how many."""
        if isinstance(which, str):
            calls = [c for c in self._active.values() if c.use_id == which]
        else:
            calls = [c for c in self._active.values() if which(c)]
        for c in calls:
            try:
                c.tool.binding.stop_now(c)  # an action's cancel request leaves now
            except Exception as e:  # noqa: BLE001 - the binding's own cancel follows
                log.warning("cancel of %s: %s", c.tool.name, e)
            c.cancel(reason)
        if calls and wait:
            await asyncio.wait(
                [asyncio.ensure_future(c.finished.wait()) for c in calls],
                timeout=CANCEL_ACK_S + 1.0,
            )
        return len(calls)

    def stop_motion(self, reason: str) -> int:
        """Any thread, at once: stop every running call that moves the robot (the local
        safety stop). Each binding sends what stops the robot from the calling thread (an
        action's cancel request: no thread hop, no await; bench/tool_latency.py measures
        it), then the call is cancelled on its loop as usual, so its result says
        ``reason``. Returns how many."""
        for _ in range(3):
            try:
                calls = [c for c in list(self._active.values()) if c.tool.moves_robot]
                break
            except RuntimeError:  # the loop changed the dict meanwhile: look again
                continue
        else:
            calls = []
        try:
            here = asyncio.get_running_loop()
        except RuntimeError:
            here = None
        for c in calls:
            try:
                c.tool.binding.stop_now(c)
            except Exception as e:  # noqa: BLE001 - the loop-side cancel still follows
                log.warning("safety stop of %s: %s", c.tool.name, e)
            if c.loop is here:
                c.cancel(reason)
            else:
                with contextlib.suppress(RuntimeError):  # loop closed: nothing runs
                    c.loop.call_soon_threadsafe(c.cancel, reason)
        return len(calls)

    async def cancel_all(self, reason: str) -> int:
        """Cancel every running call that moves the robot or is marked
        ``cancel_on_barge_in``; waits for the servers' answers."""
        return await self.cancel(lambda c: c.tool.moves_robot or c.tool.cancel_on_barge_in, reason)

    def shutdown(self) -> None:
        """Node shutdown: cancel running calls, stop timed publications, free clients and
        servers. Any thread; sends what must go out without waiting for answers."""
        if self._closed:
            return
        self._closed = True
        sent = []
        for c in list(self._active.values()):
            try:
                sent.append(c.tool.binding.on_shutdown(c))
            except Exception as e:  # noqa: BLE001
                log.warning("shutdown of %s: %s", c.tool.name, e)
            try:
                c.loop.call_soon_threadsafe(c.cancel, "shutdown")
            except RuntimeError:
                pass
        # A cancel still unacknowledged when its client is destroyed can be lost (a full
        # run lost one): give the answers a moment, bounded, before closing the clients.
        pending = [f for f in sent if f is not None and hasattr(f, "done")]
        deadline = time.monotonic() + SHUTDOWN_CANCEL_WAIT_S
        while pending and time.monotonic() < deadline and not all(f.done() for f in pending):
            time.sleep(0.01)
        self._close_bindings()

    def _close_bindings(self) -> None:
        for b in self._bindings:
            try:
                b.close()
            except Exception as e:  # noqa: BLE001
                log.warning("closing %s tool: %s", b.kind, e)
        if self.env._ros is not None:
            self.env._ros.close()  # joins the thread: nothing uses the clients after this
        self._clients.clear()

    # ------------------------------------------------------------------ checks
    def _validate(self, tool: ToolDef, args: Any) -> str:
        """Schema errors as one sentence naming the argument ('' when valid)."""
        errors = sorted(tool.validator.iter_errors(args), key=lambda e: list(e.absolute_path))
        if not errors:
            return ""
        msgs = []
        for e in errors[:3]:
            path = ".".join(str(p) for p in e.absolute_path)
            if (e.validator == "required" and "'confirmed'" in e.message) or path == "confirmed":
                msgs.append(
                    "This needs the person's confirmation: ask them first, then call again "
                    "with confirmed: true"
                )
            elif path in tool.lookup_args and e.validator == "enum":
                tname = tool.lookup_args[path]
                known = table_names(self.config.tables[tname])
                msgs.append(f"unknown {tname} {e.instance!r} for {path}; known: {', '.join(known)}")
            else:
                msgs.append(f"{path}: {e.message}" if path else e.message)
        return f"Invalid input for {tool.name}: " + "; ".join(msgs) + "."

    def _mark(self, use_id: str, what: str) -> None:
        if self.keep_marks:
            self.marks.setdefault(use_id, {})[what] = time.perf_counter()


RosToolProvider = ToolsProvider  # the name the session node and older code know
