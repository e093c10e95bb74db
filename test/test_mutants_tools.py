"""Tools layer: value checks and the location table, the cases bench/mutation.py found
untested (integer bounds off by one, bounded strings, alias listing)."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path

import pytest

from sonic_voice.tools.config import load_locations
from sonic_voice.tools.mapping import check_value

LOCATIONS = str(Path(__file__).resolve().parent.parent / "config" / "locations.yaml")

INT_BOUNDS = {
    "int8": (-128, 127),
    "uint8": (0, 255),
    "byte": (0, 255),
    "octet": (0, 255),
    "char": (0, 255),
    "int16": (-32768, 32767),
    "uint16": (0, 65535),
    "int32": (-(2**31), 2**31 - 1),
    "uint32": (0, 2**32 - 1),
    "int64": (-(2**63), 2**63 - 1),
    "uint64": (0, 2**64 - 1),
}


@pytest.mark.parametrize("ftype", sorted(INT_BOUNDS))
def test_integer_bounds_are_exact(ftype: str) -> None:
    """Kills: a bound of ``_INT_RANGES`` off by one (0 -> 1 and the like)."""
    lo, hi = INT_BOUNDS[ftype]
    check_value(lo, ftype)
    check_value(hi, ftype)
    for bad in (lo - 1, hi + 1):
        with pytest.raises(ValueError, match=f"out of range for {ftype}"):
            check_value(bad, ftype)
    with pytest.raises(TypeError, match="not an integer"):
        check_value(True, ftype)  # a bool is not an integer here
    with pytest.raises(TypeError, match="not an integer"):
        check_value(1.5, ftype)


def test_strings_bounded_and_unbounded() -> None:
    """Kills: ``startswith('string<=') and len > bound`` -> ``or`` (every string checked
    against a bound it does not have)."""
    check_value("x" * 1000, "string")
    check_value("abc", "string<=3")
    with pytest.raises(ValueError, match="longer than string<=3"):
        check_value("abcd", "string<=3")
    with pytest.raises(TypeError, match="not a string"):
        check_value(3, "string")


def test_numbers_booleans_and_sequences() -> None:
    check_value(1, "double")
    check_value(2.5, "float")
    with pytest.raises(TypeError, match="not a number"):
        check_value(True, "double")
    check_value(False, "boolean")
    with pytest.raises(TypeError, match="true/false"):
        check_value(0, "boolean")
    check_value([1, 2, 3], "sequence<int32>")
    check_value([1, 2], "sequence<uint8, 4>")
    check_value([0.5, 1.0], "double[2]")
    with pytest.raises(ValueError, match="out of range for uint8"):
        check_value([1, 256], "sequence<uint8>")
    with pytest.raises(TypeError, match="not a list"):
        check_value("abc", "sequence<int32>")


def test_location_aliases_are_listed_once_and_resolve() -> None:
    """Kills: the alias listing's ``a not in out`` inverted (no alias offered to the
    model) and duplicates or the canonical name listed as its own alias."""
    table = load_locations(
        {
            "frame": "map",
            "locations": {
                "kitchen": {"x": 1, "y": 2, "yaw_deg": 30, "aliases": ["cafe", "cocina"]},
                "lobby": {"x": 0, "y": 0, "aliases": {"en": ["hall"], "es": ["hall", "lobby"]}},
            },
        }
    )
    assert table.names() == ["kitchen", "lobby"]
    assert table.aliases_display() == ["cafe", "cocina", "hall"]
    assert table.choices() == ["kitchen", "lobby", "cafe", "cocina", "hall"]
    assert table.resolve("Cocina") == "kitchen" and table.resolve("HALL") == "lobby"
    assert table.resolve("nowhere") is None and table.resolve(3) is None
    assert table.describe().startswith("kitchen (cafe, cocina); lobby (")


FIB_TOOL = """
defaults: {timeout_s: 20, server_wait_s: 5}
tools:
  - name: fib
    description: Fibonacci numbers.
    input:
      type: object
      properties: {order: {type: integer, minimum: 1, maximum: 40}}
      required: [order]
    action:
      type: test_msgs/action/Fibonacci
      server: fibonacci
      goal: {order: {input: order}}
      result: [sequence]
"""


def test_goal_cancelled_on_the_robots_side_is_reported_as_cancelled(
    ros_graph, tmp_path: Path
) -> None:
    """An operator cancels the running goal through the action's own cancel service (not
    the tool): the model hears "cancelled on the robot's side". Kills: the
    ``STATUS_CANCELED`` test of the result inverted (reported as an unexpected status)."""
    from action_msgs.srv import CancelGoal
    from test_msgs.action import Fibonacci

    from sonic_voice.sonic.tools_seam import ToolUse
    from sonic_voice.tools import load_provider

    from test.harness.servers import fibonacci_server

    server = fibonacci_server(ros_graph.node("fib_server"), mode="hold")
    tools = tmp_path / "tools.yaml"
    tools.write_text(FIB_TOOL)
    node = ros_graph.node("tools_test", spin=False)
    provider = load_provider(node, str(tools), LOCATIONS)
    ros_graph.add(node)  # spun once its action clients exist (ros/compat.py item 2)
    cancels: list = []

    def operator() -> None:
        assert server.goal_received.wait(20)
        cli = ros_graph.node("operator").create_client(
            Fibonacci.Impl.CancelGoalService, "fibonacci/_action/cancel_goal"
        )
        assert cli.wait_for_service(timeout_sec=10)
        cancels.append(cli.call_async(CancelGoal.Request()))  # zero id and stamp: all goals

    t = threading.Thread(target=operator, name="operator", daemon=True)
    t.start()
    try:
        use = ToolUse(tool_use_id="id-fib", name="fib", input={"order": 5})
        r = asyncio.run(provider.run(use, lambda _text, _data: None))
    finally:
        t.join(10)
        provider.shutdown()
    assert cancels, "the operator never sent its cancel"
    assert r.status == "cancelled", r.content
    assert r.content["outcome"] == "cancelled"
    assert "cancelled on the robot's side" in r.content["error"]
    assert server.cancels >= 1


def test_safety_stop_sends_the_cancel_while_the_session_loop_is_stalled(
    ros_graph, tmp_path: Path
) -> None:
    """The local safety stop (``stop_motion``, called on the safety-stop subscriber's
    thread) sends the goal's cancel request from that thread: the action server gets it
    while the session's loop is still busy (here blocked for up to 5 s), not when the loop
    next runs. Kills deleting ``c.tool.binding.stop_now(c)`` in ``stop_motion``."""
    from sonic_voice.sonic.tools_seam import ToolUse
    from sonic_voice.tools import load_provider

    from test.harness.servers import fibonacci_server

    server = fibonacci_server(ros_graph.node("fib_server"), mode="hold")
    tools = tmp_path / "tools.yaml"
    tools.write_text(FIB_TOOL)
    node = ros_graph.node("tools_test", spin=False)
    provider = load_provider(node, str(tools), LOCATIONS)
    ros_graph.add(node)
    seen: dict[str, object] = {}

    def safety_stop() -> None:
        seen["stopped"] = provider.stop_motion("the safety stop")
        seen["cancel_seen_while_stalled"] = server.cancel_received.wait(5)

    async def main():
        task = asyncio.create_task(
            provider.run(ToolUse("id-fib", "fib", {"order": 5}), lambda _t, _d: None)
        )
        loop = asyncio.get_running_loop()
        assert await loop.run_in_executor(None, server.goal_received.wait, 20)
        (call,) = provider._active.values()
        await asyncio.wait_for(call.accepted.wait(), 10)
        t = threading.Thread(target=safety_stop, name="safety-stop", daemon=True)
        t.start()
        t.join(10)  # the loop is stalled: only the stopping thread can reach ROS
        return await asyncio.wait_for(task, 20)

    try:
        r = asyncio.run(main())
    finally:
        provider.shutdown()
    assert seen["stopped"] == 1
    assert seen["cancel_seen_while_stalled"] is True, "the cancel waited for the loop"
    assert r.status == "cancelled" and "the safety stop" in r.content["error"], r.content
    assert server.cancels == 1
