"""``action:`` a ROS 2 action goal per call (e.g. Nav2's NavigateToPose).

YAML::

    action:
      type: nav2_msgs/action/NavigateToPose
      server: navigate_to_pose
      goal: {pose: {lookup: locations, key: location, field: pose_stamped}}
      feedback: {fields: [distance_remaining], every_s: 1, speak: "{distance_remaining:.0f} m",
                 speak_every_s: 12}
      result: [error_code]
      timeout_s: 180

The path of a call, one thread crossing per step: the loop builds and sends the goal; on
the ROS thread, an accepted goal's get-result request is sent at once, then the handle is
handed to the loop; the result is handed over the same way. A timeout or cancellation
cancels the goal and reports whether the server accepted the cancel.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from dataclasses import dataclass, field
from typing import Any

from action_msgs.msg import GoalStatus
from rclpy.action.client import ClientGoalHandle
from unique_identifier_msgs.msg import UUID

from sonic_voice.sonic.tools_seam import ToolResult
from sonic_voice.tools.bindings import _ros
from sonic_voice.tools.bindings.base import Binding, Call, Interrupted, LoadContext, ProgressSpec
from sonic_voice.tools.bindings.base import error as _err
from sonic_voice.tools.mapping import ValueSpec, extract

log = logging.getLogger(__name__)

CANCEL_ACK_S = 3.0  # how long a cancel waits for the server's answer
KEYS = frozenset({"type", "server", "goal", "result", "feedback", "timeout_s"})


@dataclass
class FeedbackSpec:
    fields: list[str] | None  # None = all
    every_s: float = 2.0
    speak: str = ""  # template with {field} placeholders; '' = never spoken
    speak_every_s: float = 10.0


@dataclass
class ActionBinding(Binding):
    kind = "action"
    keys = KEYS
    needs_ros = True

    type_name: str = ""
    cls: Any = None
    name: str = ""  # the action server
    mapping: dict[str, ValueSpec] = field(default_factory=dict)
    returns: list[str] | None = None
    feedback: FeedbackSpec | None = None
    timeout_s: float | None = None
    progress: ProgressSpec | None = None
    client: Any = None
    tables: dict[str, Any] = field(default_factory=dict)
    port: Any = None

    @classmethod
    def load(cls, ctx: LoadContext, raw: dict[str, Any]) -> ActionBinding:
        _ros.unknown_keys(raw, KEYS)
        type_name, icls, server = _ros.type_and_name(raw, "action", "server")
        b = cls(type_name=type_name, cls=icls, name=server, tables=ctx.tables)
        b.timeout_s = raw.get("timeout_s")
        b.mapping = _ros.mapping("goal", raw.get("goal"), icls.Goal, ctx.props, ctx.tables)
        b.returns = _ros.field_list("result", raw.get("result"), icls.Result)
        fb = raw.get("feedback")
        if fb is not None:
            if isinstance(fb, list):
                fb = {"fields": fb}
            if not isinstance(fb, dict):
                raise ValueError("feedback must be a list of fields or a mapping")
            bad = set(fb) - {"fields", "every_s", "speak", "speak_every_s"}
            if bad:
                raise ValueError(f"feedback: unknown key(s) {sorted(bad)}")
            fields = _ros.field_list("feedback.fields", fb.get("fields"), icls.Feedback)
            speak = str(fb.get("speak", ""))
            if speak:
                _ros.check_template("feedback.speak", speak, icls.Feedback)
            b.feedback = FeedbackSpec(
                fields=fields,
                every_s=float(fb.get("every_s", 2.0)),
                speak=speak,
                speak_every_s=float(fb.get("speak_every_s", 10.0)),
            )
            b.progress = ProgressSpec(b.feedback.every_s, b.feedback.speak_every_s)
        return b

    def moves_robot_default(self) -> bool:
        return True

    def setup(self, env: Any, tool: Any) -> list[Any]:
        self.port = env.ros
        self.client = _ros.action_client(self.port, self.cls, self.name)
        env.clients[tool.name] = self.client
        return [tool]

    def on_shutdown(self, call: Call) -> Any:
        """Send the goal's cancel; returns its rclpy future (the provider lets it leave
        before the client is destroyed)."""
        try:
            if call.goal_handle is not None:
                return call.goal_handle.cancel_goal_async()
            return self._cancel_unanswered(call)
        except Exception as e:  # noqa: BLE001
            log.warning("cancel at shutdown failed: %s", e)
            return None

    def _cancel_unanswered(self, call: Call) -> Any:
        """Cancel a goal whose acceptance never reached us, by the UUID we gave it: the
        server may be running it (its answer lost or late on a loaded machine) and the
        robot must not keep moving for a call that is over. A server that never got the
        goal answers the cancel with 'unknown goal'. Returns the cancel's rclpy future."""
        if call.goal_id is None:
            return None
        response = self.cls.Impl.SendGoalService.Response(accepted=True)
        handle = ClientGoalHandle(self.client, call.goal_id, response)
        call.env.mark(call.use_id, "cancel_sent")
        log.warning(
            "%s: no answer to the goal yet; cancelling it by its id in case it runs",
            call.tool.name,
        )
        return handle.cancel_goal_async()

    async def run(self, call: Call) -> ToolResult:
        tool, use, env = call.tool, call.use, call.env
        goal = _ros.build(self.port, self.cls.Goal, self.mapping, use.input, self.tables)
        if not await _ros.wait_ready(call, self.client.server_is_ready):
            return _err(
                call,
                f"{tool.name} could not start: the {self.name} action server is not running "
                f"(waited {tool.server_wait_s:g} s).",
                server_absent=True,
            )
        loop = call.loop
        call.deadline = loop.time() + tool.timeout_s  # from the server's discovery on
        goal_fut: asyncio.Future = loop.create_future()
        result_fut: asyncio.Future = loop.create_future()
        self._send_goal(call, goal, goal_fut, result_fut)
        try:
            try:
                gh = await call.wait(goal_fut)
            except Interrupted:
                # Cancelled before the server answered: wait for the answer to cancel it.
                try:
                    gh = await asyncio.wait_for(asyncio.shield(goal_fut), CANCEL_ACK_S)
                    call.goal_handle = gh if gh.accepted else None
                except TimeoutError:
                    self._cancel_unanswered(call)
                    goal_fut.add_done_callback(_cancel_if_accepted)  # a late acceptance
                raise
            env.mark(use.tool_use_id, "accepted")
            if not gh.accepted:
                return _err(
                    call,
                    f"The {self.name} server rejected the {tool.name} goal; the robot will "
                    "not do it.",
                    rejected=True,
                )
            call.goal_handle = gh
            call.accepted.set()
            res = await call.wait(result_fut)  # requested on acceptance
            env.mark(use.tool_use_id, "result")
            content: dict[str, Any] = {"result": extract(res.result, self.returns)}
            if res.status == GoalStatus.STATUS_SUCCEEDED:
                return ToolResult(use.tool_use_id, "ok", {"outcome": "succeeded", **content})
            if res.status == GoalStatus.STATUS_ABORTED:
                return ToolResult(
                    use.tool_use_id,
                    "error",
                    {"outcome": "aborted",
                     "error": f"The robot could not finish {tool.name}: the {self.name} "
                              "server aborted the goal.", **content},
                )  # fmt: skip
            if res.status == GoalStatus.STATUS_CANCELED:
                return ToolResult(
                    use.tool_use_id,
                    "cancelled",
                    {"outcome": "cancelled",
                     "error": f"{tool.name} was cancelled on the robot's side.", **content},
                )  # fmt: skip
            return _err(call, f"{tool.name} ended with unexpected status {res.status}.")
        except Interrupted as i:
            accepted = await self._cancel_goal(call, env)
            if accepted is not None:
                i.extra["cancel_accepted"] = accepted
            raise
        except asyncio.CancelledError:
            # The session gave up on this call (its own timeout or its end): stop the robot.
            if call.goal_handle is not None:
                call.goal_handle.cancel_goal_async()
            elif not goal_fut.done():
                self._cancel_unanswered(call)
                goal_fut.add_done_callback(_cancel_if_accepted)
            raise

    def _send_goal(
        self, call: Call, goal: Any, goal_fut: asyncio.Future, result_fut: asyncio.Future
    ) -> None:
        """Loop thread: send the goal. On the server's answer (ROS thread), the result is
        asked for at once, before the loop even hears of the acceptance."""
        loop, port, env = call.loop, self.port, call.env
        on_feedback = None
        if self.feedback is not None and call.progress_fn is not None:

            def on_feedback(msg: Any) -> None:  # ROS thread
                port.call_soon(loop, self._on_feedback, call, msg.feedback)

        def on_goal_response(f: Any) -> None:  # ROS thread
            env.mark(call.use_id, "goal_response")
            try:
                gh = f.result()
                if gh.accepted:
                    gh.get_result_async().add_done_callback(
                        port.relay(
                            loop, result_fut, call.wake,
                            lambda: env.mark(call.use_id, "result_response"),
                        )
                    )  # fmt: skip
            except Exception as e:  # noqa: BLE001 - the loop side reports it
                port.settle(loop, goal_fut, exc=e, wake=call.wake)
                return
            port.settle(loop, goal_fut, gh, wake=call.wake)

        try:
            call.goal_id = UUID(uuid=list(uuid.uuid4().bytes))
            fut = self.client.send_goal_async(
                goal, feedback_callback=on_feedback, goal_uuid=call.goal_id
            )
            fut.add_done_callback(on_goal_response)  # inline, or now if already answered
            env.mark(call.use_id, "goal_sent")
        except Exception as e:  # noqa: BLE001
            if not goal_fut.done():
                goal_fut.set_exception(e)

    async def _cancel_goal(self, call: Call, env: Any) -> bool | None:
        """Ask the server to cancel (or take the answer to the request ``stop_now`` sent);
        True if it accepted, None if there was no goal."""
        gh = call.goal_handle
        if gh is None or env.closed:  # at shutdown the cancel was already sent
            return None
        try:
            fut: asyncio.Future = call.loop.create_future()
            rfut = call.stop_future
            if rfut is None:
                rfut = gh.cancel_goal_async()
                env.mark(call.use_id, "cancel_sent")
                rfut.add_done_callback(lambda _f: env.mark(call.use_id, "cancel_ack"))
            rfut.add_done_callback(self.port.relay(call.loop, fut))
            resp = await asyncio.wait_for(fut, CANCEL_ACK_S)
        except TimeoutError:
            return False
        except Exception as e:  # noqa: BLE001 - e.g. the client was destroyed meanwhile
            log.warning("cancel of %s failed: %s", call.tool.name, e)
            return False
        return bool(resp.goals_canceling)

    def stop_now(self, call: Call) -> None:
        """Any thread: send the goal's cancel request now (no wait for the loop)."""
        gh = call.goal_handle
        if gh is None or call.stop_future is not None or call.env.closed:
            return  # not accepted yet: the loop side cancels it when it is
        env = call.env
        call.stop_future = gh.cancel_goal_async()
        env.mark(call.use_id, "cancel_sent")
        call.stop_future.add_done_callback(lambda _f: env.mark(call.use_id, "cancel_ack"))

    def _on_feedback(self, call: Call, fb: Any) -> None:
        """Loop thread: feedback as rate-limited progress (and a spoken sentence)."""
        spec = self.feedback
        if spec is None:
            return
        text = _ros.render(spec.speak, fb) if spec.speak else ""
        call.report({"feedback": extract(fb, spec.fields)}, text)


def _cancel_if_accepted(goal_fut: asyncio.Future) -> None:
    """Loop thread: a goal accepted after its call was over is cancelled at once."""
    if goal_fut.cancelled() or goal_fut.exception() is not None:
        return
    gh = goal_fut.result()
    if gh.accepted:
        log.warning("a goal was accepted after its call ended: cancelling it")
        gh.cancel_goal_async()


BINDING = ActionBinding
