"""Tools on a real ROS graph: action, service and topic bindings against recording servers.

The provider runs on an asyncio loop in the test thread (as on the session's loop); the
graph's executor thread spins the provider's node and the servers. Assertions are on what
the servers saw (goals, cancels, requests, messages) and on the ToolResults.
"""

from __future__ import annotations

import asyncio
import math
import textwrap
from pathlib import Path
from typing import Any

import pytest

from sonic_voice.sonic.tools_seam import ToolResult, ToolUse
from sonic_voice.tools import load_provider

from test.harness import servers
from test.harness.ros import wait_for
from test.harness.servers import RecordingService, TopicRecorder


def fibonacci_server(node: Any, **kw: Any) -> Any:
    """A Fibonacci server that has discovered the tools' client (see wait_for_clients)."""
    server = servers.fibonacci_server(node, **kw)
    assert server.wait_for_clients(), "the server never discovered the tools' client"
    return server


def navigate_server(node: Any, **kw: Any) -> Any:
    server = servers.navigate_server(node, **kw)
    assert server.wait_for_clients(), "the server never discovered the tools' client"
    return server


ROOT = Path(__file__).resolve().parent.parent
LOCATIONS = str(ROOT / "config" / "locations.yaml")

TOOLS = """
defaults: {timeout_s: 20, server_wait_s: 5}
tools:
  - name: fib
    description: Fibonacci numbers.
    input:
      type: object
      properties: {order: {type: integer, minimum: 1, maximum: 40}}
      required: [order]
      additionalProperties: false
    action:
      type: test_msgs/action/Fibonacci
      server: fibonacci
      goal: {order: {input: order}}
      feedback: {fields: [sequence], every_s: 0, speak: "{sequence}", speak_every_s: 0}
      result: [sequence]
  - name: fib_short
    description: Fibonacci with a short timeout.
    timeout_s: 0.5
    input: {properties: {order: {type: integer}}, required: [order]}
    action:
      type: test_msgs/action/Fibonacci
      server: fibonacci
      goal: {order: {input: order}}
  - name: fib_nowhere
    description: A server that is not running.
    server_wait_s: 0.3
    input: {properties: {}}
    action: {type: test_msgs/action/Fibonacci, server: no_such_server, goal: {order: 3}}
  - name: navigate_to
    description: Go to a place.
    input:
      properties: {location: {enum_from: locations}}
      required: [location]
    action:
      type: nav2_msgs/action/NavigateToPose
      server: navigate_to_pose
      goal:
        pose: {lookup: locations, key: location, field: pose_stamped}
        pose.header.stamp: {now: true}
      feedback:
        fields: [distance_remaining]
        every_s: 0
        speak: "{distance_remaining:.0f} m to go"
      result: [error_code, error_msg]
  - name: go_charge
    description: Go charge.
    requires_confirmation: true
    input: {properties: {}}
    action:
      type: nav2_msgs/action/NavigateToPose
      server: navigate_to_pose
      goal: {pose.header.frame_id: map, pose.pose.position: {x: -1, y: -1.5}}
  - name: lights
    description: Lights on or off.
    input: {properties: {enabled: {type: boolean}}, required: [enabled]}
    service:
      type: std_srvs/srv/SetBool
      name: set_lights
      request: {data: {input: enabled}}
      ok_field: success
  - name: stop
    description: Stop.
    cancels_running: true
    moves_robot: false
    input: {properties: {}}
    topic: {type: geometry_msgs/msg/Twist, name: cmd_vel, message: {}}
  - name: drive
    description: Drive.
    input:
      properties:
        speed: {type: number, minimum: -1, maximum: 1}
        turn: {type: string, enum: [left, right, none]}
      required: [speed]
    topic:
      type: geometry_msgs/msg/Twist
      name: cmd_vel
      message:
        linear.x: {input: speed}
        angular.z: {input: turn, map: {left: 0.5, right: -0.5, none: 0}, default: none}
  - name: turn
    description: Turn in place.
    input:
      properties: {degrees: {type: number, minimum: 1, maximum: 360}}
      required: [degrees]
    topic:
      type: geometry_msgs/msg/Twist
      name: cmd_vel
      rate_hz: 20
      message: {angular.z: 0.5}
      duration_s: {input: degrees, scale: 0.0349066}
      then: {}
  - name: cancel
    description: Cancel everything.
    cancel: {}
"""


class Progress:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, text: str, data: dict[str, Any]) -> None:
        self.events.append((text, data))


@pytest.fixture
def tools(ros_graph: Any, tmp_path: Path) -> Any:
    p = tmp_path / "tools.yaml"
    p.write_text(textwrap.dedent(TOOLS))
    node = ros_graph.node("tools_test", spin=False)
    provider = load_provider(node, str(p), LOCATIONS)
    ros_graph.add(node)  # spun once its action clients exist (ros/compat.py item 2)
    yield provider
    provider.shutdown()


def run(provider: Any, name: str, args: dict[str, Any], progress: Any = None) -> ToolResult:
    use = ToolUse(tool_use_id=f"id-{name}", name=name, input=args)
    return asyncio.run(provider.run(use, progress or Progress()))


def test_fibonacci_action_feedback_and_result(ros_graph: Any, tools: Any) -> None:
    server = fibonacci_server(ros_graph.node("fib_server"), steps=4)
    prog = Progress()
    r = run(tools, "fib", {"order": 6}, prog)
    assert r.status == "ok", r.content
    assert r.content["outcome"] == "succeeded"
    assert r.content["result"] == {"sequence": [0, 1, 1, 2, 3, 5, 8]}
    assert [g.order for g in server.goals] == [6]
    seqs = [d["feedback"]["sequence"] for _, d in prog.events]
    assert seqs and seqs[0] == [0, 1] and all(len(s) >= 2 for s in seqs)
    assert prog.events[0][0] == "[0, 1]" and prog.events[0][1]["speak"] is True


def test_navigate_to_named_location_by_alias(ros_graph: Any, tools: Any) -> None:
    server = navigate_server(ros_graph.node("nav_server"), steps=3)
    prog = Progress()
    r = run(tools, "navigate_to", {"location": "cocina"}, prog)
    assert r.status == "ok", r.content
    assert r.content["result"] == {"error_code": 0, "error_msg": ""}
    (goal,) = server.goals
    pose = goal.pose
    assert pose.header.frame_id == "map"
    assert (pose.pose.position.x, pose.pose.position.y) == (4.0, 2.5)
    assert math.isclose(pose.pose.orientation.z, math.sin(math.pi / 4))
    assert math.isclose(pose.pose.orientation.w, math.cos(math.pi / 4))
    assert pose.header.stamp.sec > 0  # {now: true}
    dists = [d["feedback"]["distance_remaining"] for _, d in prog.events]
    assert dists[:3] == [30.0, 20.0, 10.0]
    assert prog.events[0][0] == "30 m to go"


def test_aborted_goal_is_an_error_the_model_can_relay(ros_graph: Any, tools: Any) -> None:
    navigate_server(ros_graph.node("nav_server"), steps=1, mode="abort")
    r = run(tools, "navigate_to", {"location": "kitchen"})
    assert r.status == "error"
    assert r.content["outcome"] == "aborted"
    assert "aborted" in r.content["error"] and "navigate_to" in r.content["error"]
    assert r.content["result"]["error_msg"] == "path blocked"


def test_goal_rejected(ros_graph: Any, tools: Any) -> None:
    server = fibonacci_server(ros_graph.node("fib_server"), reject=True)
    r = run(tools, "fib", {"order": 3})
    assert r.status == "error" and r.content.get("rejected") is True
    assert "rejected" in r.content["error"]
    assert len(server.goals) == 1


def test_server_absent(tools: Any) -> None:
    r = run(tools, "fib_nowhere", {})
    assert r.status == "error" and r.content.get("server_absent") is True
    assert "no_such_server" in r.content["error"] and "not running" in r.content["error"]


def test_timeout_cancels_goal(ros_graph: Any, tools: Any) -> None:
    server = fibonacci_server(ros_graph.node("fib_server"), mode="hold")
    r = run(tools, "fib_short", {"order": 5})
    assert r.status == "timeout", r.content
    assert "0.5 s" in r.content["error"]
    assert r.content["cancel_accepted"] is True
    assert server.cancel_received.wait(10) and server.cancels == 1
    assert server.finished.wait(10)


def test_a_goal_accepted_after_its_call_timed_out_is_cancelled(ros_graph: Any, tools: Any) -> None:
    """The server answers the goal only after the call is over (0.5 s timeout, then 3 s for
    the answer): the robot must not keep moving. The goal is cancelled by its id at once
    and again the moment its acceptance arrives; the held goal ends cancelled."""
    server = fibonacci_server(ros_graph.node("fib_server"), mode="hold", accept_delay_s=4.5)

    async def main() -> ToolResult:  # the loop lives on, as the process's loop does
        r = await tools.run(ToolUse("id-late", "fib_short", {"order": 5}), Progress())
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, server.finished.wait, 10)
        return r

    r = asyncio.run(main())
    assert r.status == "timeout", r.content
    assert server.cancel_received.wait(10), "the server never saw a cancel"
    assert server.finished.wait(10), "the late goal still runs"
    assert server.cancels >= 1


async def _accepted(provider: Any) -> None:
    """After the server saw the goal: wait until the provider holds its goal handle."""
    (call,) = provider._active.values()
    await asyncio.wait_for(call.accepted.wait(), 10)


async def _goal_reached(server: Any, task: asyncio.Task) -> None:
    """The server got the goal; else say what the call did meanwhile (a full run once
    failed here with a bare ``assert False``)."""
    loop = asyncio.get_running_loop()
    if not await loop.run_in_executor(None, server.goal_received.wait, 10):
        result = task.result().content if task.done() else "still running"
        pytest.fail(f"the server never got the goal in 10 s; the call: {result}")


async def _start_then(provider: Any, name: str, args: dict, server: Any, then: Any) -> tuple:
    task = asyncio.create_task(provider.run(ToolUse("id-1", name, args), Progress()))
    await _goal_reached(server, task)
    await _accepted(provider)
    other = await then()
    return await asyncio.wait_for(task, 20), other


def test_cancel_all_cancels_running_goal(ros_graph: Any, tools: Any) -> None:
    server = fibonacci_server(ros_graph.node("fib_server"), mode="hold")

    async def main() -> tuple:
        return await _start_then(
            tools, "fib", {"order": 5}, server, lambda: tools.cancel_all("barge-in")
        )

    r, n = asyncio.run(main())
    assert n == 1
    assert r.status == "cancelled" and "barge-in" in r.content["error"]
    assert r.content["cancel_accepted"] is True
    assert server.cancel_received.is_set() and server.cancels == 1
    assert tools.running == 0


def test_stop_tool_cancels_goal_and_stops_base(ros_graph: Any, tools: Any) -> None:
    server = navigate_server(ros_graph.node("nav_server"), mode="hold")
    rec = TopicRecorder(ros_graph.node("cmd_vel_rec"), _twist(), "cmd_vel")

    async def main() -> tuple:
        async def stop() -> ToolResult:
            return await tools.run(ToolUse("id-stop", "stop", {}), Progress())

        return await _start_then(tools, "navigate_to", {"location": "elevator"}, server, stop)

    nav, stop = asyncio.run(main())
    assert stop.status == "ok" and stop.content["cancelled_calls"] == 1
    assert nav.status == "cancelled" and "stop" in nav.content["error"]
    assert server.cancels == 1
    assert rec.wait_count(1)
    assert (rec.messages[0].linear.x, rec.messages[0].angular.z) == (0.0, 0.0)


def test_cancel_tool_and_session_cancellation(ros_graph: Any, tools: Any) -> None:
    server = fibonacci_server(ros_graph.node("fib_server"), mode="hold")

    async def via_tool() -> tuple:
        async def cancel() -> ToolResult:
            return await tools.run(ToolUse("id-c", "cancel", {}), Progress())

        return await _start_then(tools, "fib", {"order": 3}, server, cancel)

    r, c = asyncio.run(via_tool())
    assert c.status == "ok" and c.content["cancelled_calls"] == 1
    assert r.status == "cancelled" and server.cancels == 1

    # The session itself gives up on the call (its own timeout / end): the goal is cancelled.
    server.goal_received.clear()
    server.cancel_received.clear()

    async def session_gives_up() -> None:
        task = asyncio.create_task(tools.run(ToolUse("id-s", "fib", {"order": 3}), Progress()))
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, server.goal_received.wait, 10)
        await _accepted(tools)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(session_gives_up())
    assert server.cancel_received.wait(10) and server.cancels == 2


def test_shutdown_cancels_running_goal(ros_graph: Any, tools: Any) -> None:
    server = fibonacci_server(ros_graph.node("fib_server"), mode="hold")

    async def main() -> ToolResult:
        task = asyncio.create_task(tools.run(ToolUse("id-1", "fib", {"order": 3}), Progress()))
        loop = asyncio.get_running_loop()
        await _goal_reached(server, task)
        await _accepted(tools)
        await loop.run_in_executor(None, tools.shutdown)  # another thread, as the node does
        return await asyncio.wait_for(task, 10)

    r = asyncio.run(main())
    assert r.status == "cancelled"
    assert server.cancel_received.wait(10) and server.cancels == 1
    after = run(tools, "fib", {"order": 3})
    assert after.status == "error" and "shutting down" in after.content["error"]


def test_service_tool(ros_graph: Any, tools: Any) -> None:
    from std_srvs.srv import SetBool

    def respond(req: Any, resp: Any) -> Any:
        resp.success = bool(req.data)
        resp.message = "lights on" if req.data else "cannot switch off"
        return resp

    srv = RecordingService(ros_graph.node("lights"), SetBool, "set_lights", respond)
    r = run(tools, "lights", {"enabled": True})
    assert r.status == "ok", r.content
    assert r.content["response"] == {"success": True, "message": "lights on"}
    r2 = run(tools, "lights", {"enabled": False})
    assert r2.status == "error" and r2.content["response"]["message"] == "cannot switch off"
    assert [q.data for q in srv.requests] == [True, False]


def _twist() -> Any:
    from geometry_msgs.msg import Twist

    return Twist


def test_topic_tool_publishes_mapped_twist(ros_graph: Any, tools: Any) -> None:
    rec = TopicRecorder(ros_graph.node("cmd_vel_rec"), _twist(), "cmd_vel")
    pub = tools._clients["drive"]
    assert wait_for(lambda: pub.get_subscription_count() > 0, 10)
    r = run(tools, "drive", {"speed": 0.25, "turn": "left"})
    assert r.status == "ok" and r.content["outcome"] == "sent"
    assert r.content["message"] == {"linear.x": 0.25, "angular.z": 0.5}
    r = run(tools, "drive", {"speed": -1})  # integer input into a float field; default map
    assert r.status == "ok", r.content
    assert rec.wait_count(2)
    got = [(m.linear.x, m.angular.z) for m in rec.messages]
    assert got == [(0.25, 0.5), (-1.0, 0.0)]


def test_timed_topic_tool_turns_then_stops(ros_graph: Any, tools: Any) -> None:
    rec = TopicRecorder(ros_graph.node("cmd_vel_rec"), _twist(), "cmd_vel")
    pub = tools._clients["turn"]
    assert wait_for(lambda: pub.get_subscription_count() > 0, 10)
    r = run(tools, "turn", {"degrees": 9})  # 9 deg at 0.5 rad/s = 0.314 s at 20 Hz
    assert r.status == "ok", r.content
    n = r.content["messages_sent"]
    assert n == math.ceil(9 * 0.0349066 * 20)
    assert rec.wait_count(n + 1)
    assert [m.angular.z for m in rec.messages] == [0.5] * n + [0.0]


def test_malformed_input_makes_no_ros_call(ros_graph: Any, tools: Any) -> None:
    fib = fibonacci_server(ros_graph.node("fib_server"))
    nav = navigate_server(ros_graph.node("nav_server"), steps=1)
    cases = [
        ("fib", {}, "'order' is a required property"),
        ("fib", {"order": "ten"}, "order: 'ten' is not of type 'integer'"),
        ("fib", {"order": 99}, "order: 99 is greater than the maximum of 40"),
        ("fib", {"order": 3, "speed": 1}, "Additional properties"),
        ("fib", {"order": True}, "is not of type 'integer'"),
        ("navigate_to", {"location": "attic"}, "unknown locations 'attic' for location"),
        ("navigate_to", {"location": 3}, "unknown locations 3"),
        ("go_charge", {}, "ask them first"),
        ("go_charge", {"confirmed": False}, "ask them first"),
        ("no_such_tool", {}, "There is no tool named no_such_tool"),
    ]
    for name, args, expect in cases:
        r = run(tools, name, args)
        assert r.status == "error", (name, args)
        assert expect in r.content["error"], (expect, r.content["error"])
        if name != "no_such_tool":
            assert r.content.get("invalid_input") is True
    # Then a valid call of each: the servers saw exactly those, nothing before.
    assert run(tools, "fib", {"order": 2}).status == "ok"
    assert run(tools, "go_charge", {"confirmed": True}).status == "ok"
    assert [g.order for g in fib.goals] == [2]
    assert len(nav.goals) == 1 and nav.goals[0].pose.pose.position.x == -1.0


def test_allowlist_parameter(ros_graph: Any, tmp_path: Path) -> None:
    from rclpy.parameter import Parameter

    p = tmp_path / "tools.yaml"
    p.write_text(textwrap.dedent(TOOLS))
    node = ros_graph.node(
        "tools_allow",
        parameter_overrides=[Parameter("tools_allowlist", Parameter.Type.STRING_ARRAY, ["fib"])],
        automatically_declare_parameters_from_overrides=False,
        spin=False,
    )
    provider = load_provider(node, str(p), LOCATIONS)
    ros_graph.add(node)
    try:
        assert [s["toolSpec"]["name"] for s in provider.tool_specs()] == ["fib"]
        r = run(provider, "lights", {"enabled": True})
        assert r.status == "error" and "not allowed" in r.content["error"]
    finally:
        provider.shutdown()


def _fib(n: int) -> list[int]:
    s = [0, 1]
    while len(s) < n + 1:
        s.append(s[-1] + s[-2])
    return s[: n + 1]


def test_concurrent_goals_all_answered(ros_graph: Any, tools: Any) -> None:
    """Goals sent from the loop while the tools thread takes answers: every call gets its
    own result (rclpy 9.1.2's send/take race would leave one waiting), and the client keeps
    no future per goal (9.1.2 leaked one). Rounds of 8 at once: a server's goal service keeps
    the default 10 requests, so a bigger burst loses requests at the server, not here."""
    server = fibonacci_server(ros_graph.node("fib_server"), steps=0)
    rounds = [[1 + (r + i) % 12 for i in range(8)] for r in range(5)]

    async def main() -> list[ToolResult]:
        results: list[ToolResult] = []
        for r, orders in enumerate(rounds):
            calls = [tools.run(ToolUse(f"c{r}-{i}", "fib", {"order": o}), Progress())
                     for i, o in enumerate(orders)]  # fmt: skip
            results += await asyncio.gather(*calls)
        return results

    results = asyncio.run(main())
    orders = [o for r in rounds for o in r]
    assert [r.status for r in results] == ["ok"] * len(orders), [r.content for r in results]
    assert [r.content["result"]["sequence"] for r in results] == [_fib(o) for o in orders]
    assert sorted(g.order for g in server.goals) == sorted(orders)
    assert tools._clients["fib"]._futures == []
    assert tools.running == 0


def test_clients_on_the_node_itself_no_hidden_node_or_thread(
    ros_graph: Any, tmp_path: Path
) -> None:
    """The tools' clients live on the session node, spun by the process's one executor:
    no helper node, no executor thread of their own (docs/architecture.md)."""
    import threading

    p = tmp_path / "tools.yaml"
    p.write_text(textwrap.dedent(TOOLS))
    before = {t.name for t in threading.enumerate()}
    node = ros_graph.node("voice", spin=False)
    provider = load_provider(node, str(p), LOCATIONS)
    ros_graph.add(node)
    try:
        assert {t.name for t in threading.enumerate()} - before == set()
        n = sum(t.binding.kind == "topic" for t in provider.tools.values())  # all on cmd_vel
        assert n == 3 and wait_for(lambda: node.count_publishers("/cmd_vel") == n, 10)
        pubs = node.get_publisher_names_and_types_by_node("voice", "/")
        assert ("/cmd_vel", ["geometry_msgs/msg/Twist"]) in pubs
        assert not any(name.endswith("_tools") for name in node.get_node_names())
    finally:
        provider.shutdown()


def test_tool_node_keeps_its_name_under_a_launch_rename(tmp_path: Path) -> None:
    """`ros2 launch` passes `__node:=sonic_session` and remappings to the whole process: the
    tools' clients are the node's own, so they go with its name and the remappings."""
    import rclpy
    from rclpy.node import Node

    from test.harness.ros import next_domain_id

    p = tmp_path / "tools.yaml"
    p.write_text(textwrap.dedent(TOOLS))
    ctx = rclpy.Context()
    args = ["x", "--ros-args", "-r", "__node:=sonic_session", "-r", "cmd_vel:=/base/cmd_vel"]
    rclpy.init(args=args, context=ctx, domain_id=next_domain_id())
    node = Node("anything", context=ctx)
    provider = load_provider(node, str(p), LOCATIONS)
    try:
        assert node.get_name() == "sonic_session"
        assert provider._ros.node is node
        assert node.count_publishers("/base/cmd_vel") == 3
    finally:
        provider.shutdown()
        node.destroy_node()
        rclpy.try_shutdown(context=ctx)
