"""RosToolProvider: the session's tool calls run as ROS 2 action goals, service calls and
topic messages.

Threads: ``run``/``cancel_all`` are awaited on the session's asyncio loop. The tools' ROS
clients live on their own node (``<node>_tools``) spun by a SingleThreadedExecutor in a
thread of its own (:class:`ToolsExecutor`), not on the session node's executor, where a
response waits behind audio callbacks and rclpy's MultiThreadedExecutor thread hand-offs.

The path of an action call, one thread crossing per step:

- loop: validate, build the goal, send it (:class:`_ActionClient` makes that safe from
  this thread);
- tools thread, as the goal response is taken: an accepted goal's get-result request is
  sent at once, then the handle is handed to the loop (``call_soon_threadsafe``);
- tools thread, as the result is taken: handed to the loop the same way; ``run`` resumes on
  the loop's next iteration (:meth:`_Call.wake`) and returns the ToolResult.

rclpy done-callbacks on the action client's futures run inline on the tools thread (no
executor task each). Every call ends in exactly one ToolResult with words the model can
relay: invalid input (no ROS call made), server absent, goal rejected, aborted, timeout (the
goal is cancelled), cancelled (barge-in, a stop tool, session end, shutdown).
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from action_msgs.msg import GoalStatus
from rclpy.action import ActionClient
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.node import Node
from rclpy.parameter import Parameter

from sonic_voice.sonic.tools_seam import ProgressFn, ToolResult, ToolUse
from sonic_voice.tools.config import ToolConfig, ToolDef
from sonic_voice.tools.mapping import MappingError, extract, set_path, table_names, to_jsonable

log = logging.getLogger(__name__)

CANCEL_ACK_S = 3.0  # how long a cancel waits for the server's answer
SERVER_POLL_S = 0.02  # only while a server is not (yet) discovered; rclpy has no event for it
JOIN_S = 5.0


class _Interrupted(Exception):
    def __init__(self, why: str, reason: str = "") -> None:
        super().__init__(why)
        self.why = why  # "cancelled" | "timeout"
        self.reason = reason


@dataclass
class _Call:
    """One running tool call (registered while it may move the robot)."""

    tool: ToolDef
    use_id: str
    loop: asyncio.AbstractEventLoop
    cancel_event: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)
    accepted: asyncio.Event = field(default_factory=asyncio.Event)  # goal_handle is set
    reason: str = ""
    goal_handle: Any = None
    last_progress: float = -1e9
    last_spoken: float = -1e9
    feedback_count: int = 0
    stop_msg: Any = None  # topic tools: sent when a timed publication ends early
    gate: asyncio.Future | None = None  # what _wait awaits: one wake-up, whoever settles it

    def wake(self) -> None:
        """Loop thread: release the current ``_wait`` (it then looks at why)."""
        if self.gate is not None and not self.gate.done():
            self.gate.set_result(None)

    def cancel(self, reason: str) -> None:
        """Loop thread: interrupt this call (its goal is then cancelled)."""
        if not self.cancel_event.is_set():
            self.reason = reason
            self.cancel_event.set()
        self.wake()


def _settle(
    call: _Call, afut: asyncio.Future, value: Any = None, exc: BaseException | None = None
) -> None:
    """From any thread: complete ``afut`` on the call's loop and wake the call's ``_wait``.

    One ``call_soon_threadsafe`` callback does both, so the awaiting coroutine resumes on
    the loop's next iteration (no combinator in between: each extra loop iteration is one
    more select() that gives the GIL away and must win it back).
    """

    def settle() -> None:
        if not afut.done():
            if isinstance(exc, asyncio.CancelledError):
                afut.cancel()
            elif exc is not None:
                afut.set_exception(exc)
            else:
                afut.set_result(value)
        call.wake()

    try:
        call.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # loop closed: nobody waits any more
        pass


def _relay(
    call: _Call, afut: asyncio.Future, mark: Callable[[], None] | None = None
) -> Callable[[Any], None]:
    """An rclpy done-callback (tools thread) handing the outcome to ``afut`` on the loop."""

    def done(rfut: Any) -> None:
        if mark is not None:
            mark()
        if rfut.cancelled():
            _settle(call, afut, exc=asyncio.CancelledError())
        elif rfut.exception() is not None:
            _settle(call, afut, exc=rfut.exception())
        else:
            _settle(call, afut, rfut.result())

    return done


class _ActionClient(ActionClient):
    """ActionClient whose goals are sent from the loop thread and answered inline.

    - rclpy 9.1.2 (Kilted) ``send_goal_async`` registers a future under the client's lock
      and then, in a leftover duplicate block outside it, a second one that replaces it.
      Called from a thread other than the executor's, a response taken in between completes
      the first future and the returned one never completes (the race of ros2/rclpy#1123).
      Here the lock is reentrant and held across the whole send, so the executor cannot
      take the answer before both registrations (and the feedback callback's) are done.
    - The client's futures are not handed to the executor (``add_future`` keeps nothing).
      rclpy's executor stamps itself on every future a waitable holds before each response
      it handles, and a stamped future runs each done-callback as one more executor task:
      one more trip round the executor's wait loop, holding the GIL, before the loop thread
      can even be woken. Unstamped, the done-callbacks (rclpy's bookkeeping and ours) run
      inline on the tools thread as the answer is handled. It also ends the leak of 9.1.2's
      orphaned first future, which that list kept (and walked) for the whole session.

    Must be made before its node is spun (rclpy creates the lock after announcing the
    waitable: ros2/rclpy#1589).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._lock = threading.RLock()  # type: ignore[assignment]

    def add_future(self, future: Any) -> None:
        pass  # see the class docstring

    def remove_future(self, future: Any) -> None:
        pass

    def send_goal_async(
        self, goal: Any, feedback_callback: Any = None, goal_uuid: Any = None
    ) -> Any:
        with self._lock:
            return super().send_goal_async(goal, feedback_callback, goal_uuid)


class ToolsExecutor:
    """The tools' own node and a SingleThreadedExecutor spinning it in a dedicated thread.

    Why not the session node's executor (``run_node``'s MultiThreadedExecutor): there each
    response waits for the spin thread's wake-up, its rebuild of a wait set over all the
    node's entities, a hand-off to a pool thread, then one more task and hand-off for each
    rclpy done-callback, every thread having to win the GIL in turn. And rclpy 9.1.2's
    MultiThreadedExecutor re-submits a task that has not started yet instead of waiting
    (ros2/rclpy#1452): with 50 Hz of audio it keeps about half a core busy and the GIL with
    it. Here a response is taken and handled on one thread whose wait set holds only the
    tools' clients.

    The node is named ``<parent>_tools`` in the parent's namespace, so relative server
    names resolve as before; process-wide remappings apply, node-specific ones must name
    this node. It runs on wall time (``use_sim_time`` off: no /clock subscription waking
    this thread); goal stamps are taken from the parent node's clock.
    """

    def __init__(self, parent: Node) -> None:
        name = f"{parent.get_name()}_tools"
        self.node = Node(
            name,
            context=parent.context,
            namespace=parent.get_namespace(),
            # A launch file's `__node:=sonic_session` is a process-wide argument: without a
            # local rename it would name this node `sonic_session` too (two nodes, one name).
            # Local arguments win over global ones; global remappings still apply.
            cli_args=["--ros-args", "-r", f"__node:={name}"],
            start_parameter_services=False,
            parameter_overrides=[
                Parameter("use_sim_time", Parameter.Type.BOOL, False),
                Parameter("start_type_description_service", Parameter.Type.BOOL, False),
            ],
        )
        self.executor = SingleThreadedExecutor(context=parent.context)
        self.executor.add_node(self.node)
        self._stopping = False
        self._thread = threading.Thread(target=self._spin, name=f"{name}-executor", daemon=True)

    def start(self) -> None:
        """Start spinning (after the clients exist: see :class:`_ActionClient`)."""
        self._thread.start()

    def _spin(self) -> None:
        while not self._stopping and self.node.context.ok():
            try:
                self.executor.spin_once()
            except ExternalShutdownException:
                break
            except Exception:  # a callback's bug must not stop the tools' thread
                if self._stopping:
                    break
                log.exception("tools executor callback failed")

    def close(self) -> None:
        """Stop the thread (joined, so no spinning thread outlives the context), free the node."""
        self._stopping = True
        try:
            self.executor.shutdown(timeout_sec=JOIN_S)
        except Exception as e:  # noqa: BLE001 - e.g. the context is already shut down
            log.warning("tools executor shutdown: %s", e)
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(JOIN_S)
        for w in list(self.node.waitables):  # action clients: destroy_node leaves them
            try:
                w.destroy()
            except Exception as e:  # noqa: BLE001
                log.warning("destroying %s: %s", w, e)
        try:
            self.node.destroy_node()
        except Exception as e:  # noqa: BLE001
            log.warning("destroying the tools node: %s", e)


class RosToolProvider:
    """Implements the session's ToolProvider with ROS 2 clients on ``node``."""

    def __init__(self, node: Node, config: ToolConfig, allowlist: list[str] | None = None) -> None:
        self.node = node
        self.config = config
        allowed = set(config.tools)
        if config.allow is not None:
            allowed &= set(config.allow)
        if allowlist:
            allowed &= set(allowlist)
        self.tools: dict[str, ToolDef] = {n: t for n, t in config.tools.items() if n in allowed}
        self.blocked = sorted(set(config.tools) - allowed)
        self._clients: dict[str, Any] = {}
        self._active: dict[str, _Call] = {}
        self._closed = False
        # Latency marks for bench/tool_latency.py: tool_use_id -> {mark: perf_counter}.
        self.marks: dict[str, dict[str, float]] = {}
        self.keep_marks = False
        self._ros = ToolsExecutor(node)
        tnode = self._ros.node
        try:
            for t in self.tools.values():
                b = t.binding
                if b.kind == "action":
                    self._clients[t.name] = _ActionClient(tnode, b.cls, b.name)
                elif b.kind == "service":
                    self._clients[t.name] = tnode.create_client(b.cls, b.name)
                elif b.kind == "topic":
                    self._clients[t.name] = tnode.create_publisher(b.cls, b.name, b.qos_depth)
        except Exception:
            self._ros.close()
            raise
        self._ros.start()

    # ------------------------------------------------------------------ ToolProvider
    def tool_specs(self) -> list[dict[str, Any]]:
        return [t.spec() for t in self.tools.values()]

    @property
    def running(self) -> int:
        return len(self._active)

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
        try:
            if tool.cancels_running:
                n = await self.cancel_all(f"the {use.name} tool")
                if tool.binding.kind == "cancel":
                    return ToolResult(
                        use.tool_use_id,
                        "ok",
                        {"outcome": "stopped", "cancelled_calls": n,
                         "message": f"Stopped {n} running task(s)." if n else
                         "Nothing was running."},
                    )  # fmt: skip
            kind = tool.binding.kind
            if kind == "action":
                result = await self._run_action(tool, use, progress)
            elif kind == "service":
                result = await self._run_service(tool, use)
            else:
                result = await self._run_topic(tool, use)
            if tool.cancels_running:
                result.content["cancelled_calls"] = n
            return result
        except MappingError as e:
            return _err(use, f"{use.name}: {e}", invalid_input=True)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            log.exception("tool %s failed", use.name)
            return _err(use, f"{use.name} failed: {e}")

    async def cancel_all(self, reason: str) -> int:
        """Cancel every running call that moves the robot; waits for the servers' answers."""
        calls = [c for c in self._active.values() if c.tool.moves_robot]
        for c in calls:
            c.cancel(reason)
        if calls:
            await asyncio.wait(
                [asyncio.ensure_future(c.finished.wait()) for c in calls],
                timeout=CANCEL_ACK_S + 1.0,
            )
        return len(calls)

    def shutdown(self) -> None:
        """Node shutdown: cancel running goals, stop timed publications, free the clients.

        Called from any thread; sends the cancel requests (rclpy sends them under the
        client's lock, safe from any thread) without waiting for answers, then stops the
        tools thread.
        """
        if self._closed:
            return
        self._closed = True
        for c in list(self._active.values()):
            if c.goal_handle is not None:
                try:
                    c.goal_handle.cancel_goal_async()
                except Exception as e:  # noqa: BLE001
                    log.warning("cancel at shutdown failed: %s", e)
            if c.stop_msg is not None:
                self._clients[c.tool.name].publish(c.stop_msg)
            try:
                c.loop.call_soon_threadsafe(c.cancel, "shutdown")
            except RuntimeError:
                pass
        self._ros.close()  # joins the thread: nothing uses the clients after this
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

    def _build(self, tool: ToolDef, cls: Any, mapping: dict, args: dict[str, Any]) -> Any:
        msg = cls()
        now = self.node.get_clock().now().to_msg
        for fpath, spec in mapping.items():
            value = spec.evaluate(args, self.config.tables, now)
            try:
                set_path(msg, fpath, value)
            except (TypeError, ValueError, AssertionError, AttributeError) as e:
                raise MappingError(f"{fpath}: {value!r} does not fit ({e})") from e
        return msg

    async def _wait_ready(self, tool: ToolDef, ready: Callable[[], bool]) -> bool:
        if ready():
            return True
        deadline = time.monotonic() + tool.server_wait_s
        while time.monotonic() < deadline:
            await asyncio.sleep(SERVER_POLL_S)
            if ready():
                return True
        return False

    async def _wait(self, call: _Call, fut: asyncio.Future, deadline: float) -> Any:
        """``fut``'s result, or _Interrupted on cancel_all / the tool's deadline.

        Awaits the call's gate, which the outcome's settle, ``cancel`` and the deadline
        timer all release directly: the coroutine resumes one loop iteration after the
        outcome lands (``asyncio.wait`` would add a task and an iteration per wait).
        """
        loop = call.loop
        expired = False

        def expire() -> None:
            nonlocal expired
            expired = True
            call.wake()

        timer = loop.call_at(deadline, expire)
        try:
            while not (fut.done() or call.cancel_event.is_set() or expired):
                call.gate = loop.create_future()  # (again after a stray wake-up)
                await call.gate
        finally:
            timer.cancel()
            call.gate = None
        if fut.done():
            return fut.result()
        if call.cancel_event.is_set():
            raise _Interrupted("cancelled", call.reason)
        raise _Interrupted("timeout")

    def _register(self, tool: ToolDef, use: ToolUse) -> _Call:
        call = _Call(tool=tool, use_id=use.tool_use_id, loop=asyncio.get_running_loop())
        self._active[use.tool_use_id] = call
        return call

    def _finish(self, call: _Call) -> None:
        self._active.pop(call.use_id, None)
        call.finished.set()

    def _mark(self, use_id: str, what: str) -> None:
        if self.keep_marks:
            self.marks.setdefault(use_id, {})[what] = time.perf_counter()

    # ------------------------------------------------------------------ action
    async def _run_action(self, tool: ToolDef, use: ToolUse, progress: ProgressFn) -> ToolResult:
        b = tool.binding
        goal = self._build(tool, b.cls.Goal, b.mapping, use.input)
        client = self._clients[tool.name]
        if not await self._wait_ready(tool, client.server_is_ready):
            return _err(
                use,
                f"{tool.name} could not start: the {b.name} action server is not running "
                f"(waited {tool.server_wait_s:g} s).",
                server_absent=True,
            )
        call = self._register(tool, use)
        loop = call.loop
        deadline = loop.time() + tool.timeout_s
        goal_fut: asyncio.Future = loop.create_future()
        result_fut: asyncio.Future = loop.create_future()
        self._send_goal(call, client, goal, progress if b.feedback else None, goal_fut, result_fut)
        try:
            try:
                gh = await self._wait(call, goal_fut, deadline)
            except _Interrupted:
                # Cancelled before the server answered: wait for the answer to cancel it.
                try:
                    gh = await asyncio.wait_for(asyncio.shield(goal_fut), CANCEL_ACK_S)
                    call.goal_handle = gh if gh.accepted else None
                except TimeoutError:
                    pass
                raise
            self._mark(use.tool_use_id, "accepted")
            if not gh.accepted:
                return _err(
                    use,
                    f"The {b.name} server rejected the {tool.name} goal; the robot will not do it.",
                    rejected=True,
                )
            call.goal_handle = gh
            call.accepted.set()
            res = await self._wait(call, result_fut, deadline)  # requested on acceptance
            self._mark(use.tool_use_id, "result")
            content: dict[str, Any] = {"result": extract(res.result, b.returns)}
            if res.status == GoalStatus.STATUS_SUCCEEDED:
                return ToolResult(use.tool_use_id, "ok", {"outcome": "succeeded", **content})
            if res.status == GoalStatus.STATUS_ABORTED:
                return ToolResult(
                    use.tool_use_id,
                    "error",
                    {"outcome": "aborted",
                     "error": f"The robot could not finish {tool.name}: the {b.name} server "
                              "aborted the goal.", **content},
                )  # fmt: skip
            if res.status == GoalStatus.STATUS_CANCELED:
                return ToolResult(
                    use.tool_use_id,
                    "cancelled",
                    {"outcome": "cancelled",
                     "error": f"{tool.name} was cancelled on the robot's side.", **content},
                )  # fmt: skip
            return _err(use, f"{tool.name} ended with unexpected status {res.status}.")
        except _Interrupted as i:
            accepted = await self._cancel_goal(call)
            return _interrupted_result(use, tool, i, accepted)
        except asyncio.CancelledError:
            # The session gave up on this call (its own timeout or its end): stop the robot.
            if call.goal_handle is not None:
                call.goal_handle.cancel_goal_async()
            raise
        finally:
            self._finish(call)

    def _send_goal(
        self,
        call: _Call,
        client: _ActionClient,
        goal: Any,
        progress: ProgressFn | None,
        goal_fut: asyncio.Future,
        result_fut: asyncio.Future,
    ) -> None:
        """Loop thread: send the goal. On the server's answer (tools thread), the result is
        asked for at once, before the loop even hears of the acceptance."""
        loop = call.loop
        on_feedback = None
        if progress is not None:

            def on_feedback(msg: Any) -> None:  # tools thread
                try:
                    loop.call_soon_threadsafe(self._on_feedback, call, msg.feedback, progress)
                except RuntimeError:
                    pass

        def result_response() -> None:
            self._mark(call.use_id, "result_response")

        def on_goal_response(f: Any) -> None:  # tools thread
            self._mark(call.use_id, "goal_response")
            try:
                gh = f.result()
                if gh.accepted:
                    gh.get_result_async().add_done_callback(
                        _relay(call, result_fut, result_response)
                    )
            except Exception as e:  # noqa: BLE001 - the loop side reports it
                _settle(call, goal_fut, exc=e)
                return
            _settle(call, goal_fut, gh)

        try:
            fut = client.send_goal_async(goal, feedback_callback=on_feedback)
            fut.add_done_callback(on_goal_response)  # inline, or now if already answered
            self._mark(call.use_id, "goal_sent")
        except Exception as e:  # noqa: BLE001
            if not goal_fut.done():
                goal_fut.set_exception(e)

    async def _cancel_goal(self, call: _Call) -> bool | None:
        """Ask the server to cancel; True if it accepted, None if there was no goal."""
        gh = call.goal_handle
        if gh is None or self._closed:  # at shutdown the cancel was already sent
            return None
        try:
            fut: asyncio.Future = call.loop.create_future()
            gh.cancel_goal_async().add_done_callback(_relay(call, fut))  # safe from any thread
            resp = await asyncio.wait_for(fut, CANCEL_ACK_S)
        except TimeoutError:
            return False
        except Exception as e:  # noqa: BLE001 - e.g. the client was destroyed meanwhile
            log.warning("cancel of %s failed: %s", call.tool.name, e)
            return False
        return bool(resp.goals_canceling)

    def _on_feedback(self, call: _Call, fb: Any, progress: ProgressFn) -> None:
        """Loop thread: rate-limited progress (and, at a slower rate, a spoken sentence)."""
        spec = call.tool.binding.feedback
        call.feedback_count += 1
        now = time.monotonic()
        if spec is None or now - call.last_progress < spec.every_s or call.finished.is_set():
            return
        call.last_progress = now
        data: dict[str, Any] = {"feedback": extract(fb, spec.fields), "speak": False}
        text = ""
        if spec.speak:
            try:
                names = type(fb).get_fields_and_field_types()
                text = spec.speak.format(**{k: _fmt_value(getattr(fb, k)) for k in names})
            except (ValueError, KeyError, AttributeError) as e:
                text = ""
                log.warning("feedback template of %s: %s", call.tool.name, e)
            if text and now - call.last_spoken >= spec.speak_every_s:
                call.last_spoken = now
                data["speak"] = True
        try:
            progress(text, data)
        except Exception:
            log.exception("progress callback failed")

    # ------------------------------------------------------------------ service
    async def _run_service(self, tool: ToolDef, use: ToolUse) -> ToolResult:
        b = tool.binding
        req = self._build(tool, b.cls.Request, b.mapping, use.input)
        client = self._clients[tool.name]
        if not await self._wait_ready(tool, client.service_is_ready):
            return _err(
                use,
                f"{tool.name} could not run: the {b.name} service is not available "
                f"(waited {tool.server_wait_s:g} s).",
                server_absent=True,
            )
        call = self._register(tool, use)
        fut: asyncio.Future = call.loop.create_future()
        self._mark(use.tool_use_id, "goal_sent")
        rfut = client.call_async(req)  # sent under the client's lock: safe from this thread
        rfut.add_done_callback(
            _relay(call, fut, lambda: self._mark(use.tool_use_id, "result_response"))
        )
        try:
            resp = await self._wait(call, fut, call.loop.time() + tool.timeout_s)
            self._mark(use.tool_use_id, "result")
        except _Interrupted as i:
            client.remove_pending_request(rfut)
            return _interrupted_result(use, tool, i, None)
        except asyncio.CancelledError:
            client.remove_pending_request(rfut)
            raise
        finally:
            self._finish(call)
        content = {"response": extract(resp, b.returns)}
        if b.ok_field and not extract(resp, [b.ok_field])[b.ok_field]:
            return ToolResult(
                use.tool_use_id,
                "error",
                {"outcome": "failed", "error": f"{tool.name}: the {b.name} service reported "
                 "failure.", **content},
            )  # fmt: skip
        return ToolResult(use.tool_use_id, "ok", {"outcome": "done", **content})

    # ------------------------------------------------------------------ topic
    async def _run_topic(self, tool: ToolDef, use: ToolUse) -> ToolResult:
        b = tool.binding
        msg = self._build(tool, b.cls, b.mapping, use.input)
        pub = self._clients[tool.name]
        sent = extract(msg, list(b.mapping) or None)
        if b.duration is None:
            pub.publish(msg)
            self._mark(use.tool_use_id, "result")
            return ToolResult(
                use.tool_use_id, "ok", {"outcome": "sent", "topic": b.name, "message": sent}
            )
        duration = float(b.duration.evaluate(use.input, self.config.tables, None))
        stop_msg = self._build(tool, b.cls, b.then, use.input) if b.then is not None else None
        call = self._register(tool, use)
        call.stop_msg = stop_msg
        loop = call.loop
        period = 1.0 / b.rate_hz
        start = loop.time()
        end = start + min(duration, tool.timeout_s)
        count = 0
        interrupted: _Interrupted | None = None
        try:
            while True:
                pub.publish(msg)
                count += 1
                nxt = start + count * period
                if nxt >= end:
                    break
                try:
                    await asyncio.wait_for(call.cancel_event.wait(), nxt - loop.time())
                    interrupted = _Interrupted("cancelled", call.reason)
                    break
                except TimeoutError:
                    pass
            if loop.time() < end and interrupted is None:
                await asyncio.sleep(max(0.0, end - loop.time()))
        finally:
            if stop_msg is not None and not self._closed:
                pub.publish(stop_msg)
            self._finish(call)
        if interrupted is not None:
            return _interrupted_result(use, tool, interrupted, None)
        return ToolResult(
            use.tool_use_id,
            "ok",
            {"outcome": "done", "topic": b.name, "message": sent, "seconds": round(duration, 2),
             "messages_sent": count},
        )  # fmt: skip


def _fmt_value(v: Any) -> Any:
    """Arrays as lists in spoken templates; messages stay objects ({pose.position.x})."""
    if hasattr(v, "get_fields_and_field_types") or isinstance(v, (int, float, str)):
        return v
    return to_jsonable(v)


def _err(use: ToolUse, text: str, **flags: Any) -> ToolResult:
    return ToolResult(use.tool_use_id, "error", {"error": text, **flags})


def _interrupted_result(
    use: ToolUse, tool: ToolDef, i: _Interrupted, cancel_accepted: bool | None
) -> ToolResult:
    extra: dict[str, Any] = {}
    if cancel_accepted is not None:
        extra["cancel_accepted"] = cancel_accepted
    if i.why == "timeout":
        return ToolResult(
            use.tool_use_id,
            "timeout",
            {"error": f"{tool.name} did not finish within {tool.timeout_s:g} s, so it was "
                      "stopped.", **extra},
        )  # fmt: skip
    why = f" ({i.reason})" if i.reason else ""
    return ToolResult(
        use.tool_use_id, "cancelled", {"error": f"{tool.name} was stopped{why}.", **extra}
    )
