"""Test action/service servers and topic recorders that remember what they saw.

Each server records every goal/request it receives and every cancel request, and signals
threading Events, so tests assert on what reached ROS (values, counts) and wait on events
instead of sleeping. Action servers follow the ros2/examples shape: explicit goal and
cancel callbacks (cancel accepted), a reentrant callback group, an execute callback that
checks ``is_cancel_requested`` between steps.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.node import Node


class RecordingActionServer:
    """A configurable action server.

    - ``mode``: ``succeed`` (after ``steps`` feedback steps), ``abort`` (after the steps),
      ``hold`` (runs until cancelled — for cancel and timeout tests);
    - ``reject``: refuse every goal;
    - ``feedback(goal, step) -> Feedback`` and ``result(goal, steps_done) -> Result``.
    """

    def __init__(
        self,
        node: Node,
        action_type: Any,
        name: str,
        feedback: Callable[[Any, int], Any],
        result: Callable[[Any, int], Any],
        *,
        steps: int = 3,
        step_s: float = 0.05,
        mode: str = "succeed",
        reject: bool = False,
        accept_delay_s: float = 0.0,
    ) -> None:
        self.node = node
        self.name = name
        self.action_type = action_type
        self.steps = steps
        self.step_s = step_s
        self.mode = mode
        self.reject = reject
        self.accept_delay_s = accept_delay_s  # a server slow to answer a goal (its goal
        # callback blocks): the client gives up before it hears the acceptance
        self._feedback = feedback
        self._result = result
        self.goals: list[Any] = []
        self.cancels = 0
        self.goal_received = threading.Event()
        self.cancel_received = threading.Event()
        self.finished = threading.Event()
        self._wake = threading.Event()
        self.server = ActionServer(
            node,
            action_type,
            name,
            execute_callback=self._execute,
            goal_callback=self._on_goal,
            cancel_callback=self._on_cancel,
            callback_group=ReentrantCallbackGroup(),
        )

    def _on_goal(self, goal: Any) -> GoalResponse:
        self.goals.append(goal)
        self.goal_received.set()
        if self.accept_delay_s:
            time.sleep(self.accept_delay_s)
        return GoalResponse.REJECT if self.reject else GoalResponse.ACCEPT

    def _on_cancel(self, goal_handle: Any) -> CancelResponse:
        self.cancels += 1
        self.cancel_received.set()
        self._wake.set()
        return CancelResponse.ACCEPT

    def _execute(self, goal_handle: Any) -> Any:
        goal = goal_handle.request
        done = 0
        try:
            while self.mode == "hold" or done < self.steps:
                if goal_handle.is_cancel_requested:
                    goal_handle.canceled()
                    return self._result(goal, done)
                goal_handle.publish_feedback(self._feedback(goal, done))
                done += 1
                self._wake.wait(self.step_s)
            if self.mode == "abort":
                goal_handle.abort()
            else:
                goal_handle.succeed()
            return self._result(goal, done)
        finally:
            self.finished.set()

    def wait_for_clients(self, n: int = 1, timeout: float = 5.0) -> bool:
        """Until this server's node has discovered ``n`` clients of every part of the action
        (goal and result services, feedback and status topics). A client that calls the
        moment it sees the server can otherwise send its goal before the server has matched
        the client's reply readers: under load (a full run on 2 cores) a goal or its answer
        was lost and the call waited for its timeout. Robots do not meet this: their action
        servers run long before the first call."""
        from test.harness.ros import wait_for

        base = self.server._action_name if hasattr(self.server, "_action_name") else None
        name = self.node.resolve_topic_name(base or self.name)
        parts = (
            (self.node.count_clients, f"{name}/_action/send_goal"),
            (self.node.count_clients, f"{name}/_action/get_result"),
            (self.node.count_subscribers, f"{name}/_action/feedback"),
            (self.node.count_subscribers, f"{name}/_action/status"),
        )
        return wait_for(lambda: all(count(topic) >= n for count, topic in parts), timeout)

    def destroy(self) -> None:
        self.server.destroy()


def fibonacci_server(node: Node, name: str = "fibonacci", **kw: Any) -> RecordingActionServer:
    """test_msgs/action/Fibonacci: feedback is the sequence so far, result the sequence."""
    from test_msgs.action import Fibonacci

    def seq(n: int) -> list[int]:
        s = [0, 1]
        while len(s) < n + 1:
            s.append(s[-1] + s[-2])
        return s[: n + 1]

    def fb(goal: Any, step: int) -> Any:
        return Fibonacci.Feedback(sequence=seq(min(step + 1, goal.order)))

    def res(goal: Any, done: int) -> Any:
        return Fibonacci.Result(sequence=seq(goal.order))

    kw.setdefault("steps", 3)
    return RecordingActionServer(node, Fibonacci, name, fb, res, **kw)


def navigate_server(node: Node, name: str = "navigate_to_pose", **kw: Any) -> RecordingActionServer:
    """nav2_msgs/action/NavigateToPose (the fixture): distance falls to zero, then succeed."""
    from nav2_msgs.action import NavigateToPose

    steps = kw.setdefault("steps", 3)

    def fb(goal: Any, step: int) -> Any:
        f = NavigateToPose.Feedback()
        f.current_pose.header.frame_id = goal.pose.header.frame_id
        f.distance_remaining = float(10.0 * (steps - step))
        f.number_of_recoveries = 0
        f.estimated_time_remaining.sec = steps - step
        return f

    def res(goal: Any, done: int) -> Any:
        r = NavigateToPose.Result()
        if kw.get("mode") == "abort":
            r.error_code = NavigateToPose.Result.UNKNOWN
            r.error_msg = "path blocked"
        return r

    return RecordingActionServer(node, NavigateToPose, name, fb, res, **kw)


class RecordingService:
    """A service that records requests and answers with ``respond(request) -> Response``."""

    def __init__(
        self, node: Node, srv_type: Any, name: str, respond: Callable[[Any, Any], Any]
    ) -> None:
        self.requests: list[Any] = []
        self.received = threading.Event()
        self._respond = respond
        self.service = node.create_service(
            srv_type, name, self._cb, callback_group=ReentrantCallbackGroup()
        )

    def _cb(self, request: Any, response: Any) -> Any:
        self.requests.append(request)
        self.received.set()
        return self._respond(request, response)


class TopicRecorder:
    """Subscribes to a topic and keeps every message (with an event per arrival)."""

    def __init__(self, node: Node, msg_type: Any, name: str, depth: int = 100) -> None:
        self.messages: list[Any] = []
        self._cond = threading.Condition()
        self.sub = node.create_subscription(msg_type, name, self._cb, depth)

    def _cb(self, msg: Any) -> None:
        with self._cond:
            self.messages.append(msg)
            self._cond.notify_all()

    def wait_count(self, n: int, timeout: float = 10.0) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: len(self.messages) >= n, timeout)
