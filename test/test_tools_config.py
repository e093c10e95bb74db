"""Tool declarations: shipped configs load against the real types; every configuration
mistake is a start-up error naming file/line, tool and field (no ROS graph needed)."""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import pytest

from sonic_voice.tools import ToolConfigError, load_locations, load_tool_config

ROOT = Path(__file__).resolve().parent.parent
LOCATIONS = ROOT / "config" / "locations.yaml"


def write(tmp_path: Path, text: str, name: str = "tools.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


FIB = """
tools:
  - name: fib
    description: Fibonacci numbers.
    input:
      type: object
      properties: {order: {type: integer, minimum: 1}}
      required: [order]
    action:
      type: test_msgs/action/Fibonacci
      server: fibonacci
      goal: {order: {input: order}}
"""


@pytest.mark.parametrize("name", ["tools.yaml", "tools_nav2.yaml"])
def test_shipped_configs_load_against_real_types(name: str) -> None:
    cfg = load_tool_config(ROOT / "config" / name, LOCATIONS)
    assert {"navigate_to", "stop", "turn"} <= set(cfg.tools)
    nav = cfg.tools["navigate_to"]
    assert nav.binding.type_name == "nav2_msgs/action/NavigateToPose"
    assert nav.binding.cls.__module__.startswith("nav2_msgs.action")
    assert nav.binding.name == "navigate_to_pose"
    spec = nav.spec()["toolSpec"]
    schema = json.loads(spec["inputSchema"]["json"])
    enum = schema["properties"]["location"]["enum"]
    assert enum[:5] == ["reception", "kitchen", "meeting_room", "elevator", "charging_station"]
    assert {"cocina", "Küche", "台所", "ascenseur"} <= set(enum)
    assert cfg.tools["stop"].cancels_running and not cfg.tools["stop"].moves_robot
    turn = cfg.tools["turn"]
    assert turn.binding.type_name == "geometry_msgs/msg/Twist" and turn.binding.name == "cmd_vel"
    assert turn.moves_robot and turn.binding.duration is not None


def test_locations_aliases_in_several_languages() -> None:
    t = load_locations(LOCATIONS)
    assert t.resolve("kitchen") == "kitchen"
    for alias in ("cocina", "Cuisine", "KÜCHE", "台所", "キッチン"):
        assert t.resolve(alias) == "kitchen", alias
    assert t.resolve("ascensor") == "elevator"
    assert t.resolve("attic") is None
    row = t.row("cocina")
    assert (row["frame"], row["x"], row["y"]) == ("map", 4.0, 2.5)
    q = row["pose_stamped"]["pose"]["orientation"]
    assert math.isclose(q["z"], math.sin(math.pi / 4)) and math.isclose(
        q["w"], math.cos(math.pi / 4)
    )


def test_bad_yaml_names_file_and_line(tmp_path: Path) -> None:
    p = write(tmp_path, "tools:\n  - name: a\n    description: [unclosed\n  - name: b\n")
    with pytest.raises(ToolConfigError) as e:
        load_tool_config(p)
    msg = str(e.value)
    assert str(p) in msg and "invalid YAML" in msg
    assert f"{p}:4:" in msg or f"{p}:3:" in msg


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(ToolConfigError, match="cannot read"):
        load_tool_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("old", "new", "expect"),
    [
        ("test_msgs/action/Fibonacci", "test_msgs/action/Fibonaci", ["'fib'", "Fibonaci"]),
        ("test_msgs/action/Fibonacci", "no_such_pkg/action/X", ["'fib'", "no_such_pkg"]),
        ("test_msgs/action/Fibonacci", "test_msgs/srv/Empty", ["'fib'", "not a action"]),
        ("goal: {order: {input: order}}", "goal: {ordr: {input: order}}", ["'fib'", "ordr"]),
        ("goal: {order: {input: order}}", "goal: {order: {input: count}}", ["'fib'", "count"]),
        ("goal: {order: {input: order}}", "goal: {order: fast}", ["'fib'", "goal.order", "fast"]),
        ("name: fib", "name: FibTool", ["snake_case"]),
        ("      server: fibonacci\n", "", ["'fib'", "server"]),
        ("    action:", "    topic: {type: std_msgs/msg/Empty, name: x}\n    action:",
         ["exactly one"]),
        ("type: integer, minimum: 1", "type: integer, minimum: one", ["'fib'", "JSON Schema"]),
        ("goal: {order: {input: order}}", "goal: {order: {input: order}}\n      extra: 1",
         ["'fib'", "extra"]),
    ],
)  # fmt: skip
def test_config_errors_name_tool_and_field(
    tmp_path: Path, old: str, new: str, expect: list[str]
) -> None:
    assert old in FIB
    p = write(tmp_path, FIB.replace(old, new, 1))
    with pytest.raises(ToolConfigError) as e:
        load_tool_config(p)
    for piece in expect:
        assert piece in str(e.value), str(e.value)
    assert str(p) in str(e.value)


def test_input_type_must_fit_field(tmp_path: Path) -> None:
    p = write(tmp_path, FIB.replace("{order: {type: integer", "{order: {type: string"))
    with pytest.raises(ToolConfigError, match=r"'order' is string.*int32"):
        load_tool_config(p)


def test_lookup_column_must_exist_and_fit(tmp_path: Path) -> None:
    text = """
    tools:
      - name: go
        description: go somewhere
        input: {properties: {where: {enum_from: locations}}, required: [where]}
        action:
          type: nav2_msgs/action/NavigateToPose
          server: navigate_to_pose
          goal: {pose.pose.position.x: {lookup: locations, key: where, field: %s}}
    """
    with pytest.raises(ToolConfigError, match=r"'go'.*has no 'height'"):
        load_tool_config(write(tmp_path, text % "height"), LOCATIONS)
    with pytest.raises(ToolConfigError, match=r"'go'.*does not fit double"):
        load_tool_config(write(tmp_path, text % "frame"), LOCATIONS)
    cfg = load_tool_config(write(tmp_path, text % "x"), LOCATIONS)
    assert cfg.tools["go"].lookup_args == {"where": "locations"}
    # No locations file: the enum would be empty, which is an error, not a silent no-op.
    with pytest.raises(ToolConfigError, match="no locations file"):
        load_tool_config(write(tmp_path, text % "x"), None)


def test_confirmation_adds_required_confirmed_argument(tmp_path: Path) -> None:
    p = write(
        tmp_path,
        FIB.replace("    description:", "    requires_confirmation: true\n    description:"),
    )
    tool = load_tool_config(p).tools["fib"]
    schema = json.loads(tool.spec()["toolSpec"]["inputSchema"]["json"])
    assert schema["properties"]["confirmed"] == {
        "type": "boolean",
        "const": True,
        "description": "true only after the person said yes to doing this now.",
    }
    assert schema["required"] == ["order", "confirmed"]
    assert "confirm" in tool.description
    assert not list(tool.validator.iter_errors({"order": 3, "confirmed": True}))
    assert list(tool.validator.iter_errors({"order": 3, "confirmed": False}))


def test_allow_list_must_name_declared_tools(tmp_path: Path) -> None:
    p = write(tmp_path, "allow: [fib, fly]\n" + FIB)
    with pytest.raises(ToolConfigError, match="'fly'"):
        load_tool_config(p)


@pytest.mark.parametrize(
    ("yaw_deg", "z", "w"),
    [(0.0, 0.0, 1.0), (180.0, 1.0, 0.0), (30.0, 0.25881904510252074, 0.9659258262890683)],
)
def test_goal_orientation_quaternion_from_yaw(yaw_deg: float, z: float, w: float) -> None:
    """yaw -> (z, w) = (sin(yaw/2), cos(yaw/2)). At ±90° both are 0.7071, so a swap of z
    and w hides there; at 0°, 180° and 30° it does not (findings: issue 16 survivor)."""
    table = load_locations({"locations": {"spot": {"x": 1.0, "y": 2.0, "yaw_deg": yaw_deg}}})
    row = table.row("spot")
    q = row["pose"]["orientation"]
    assert (q["x"], q["y"]) == (0.0, 0.0)
    assert q["z"] == pytest.approx(z, abs=1e-12) and q["w"] == pytest.approx(w, abs=1e-12)
    assert row["pose_stamped"]["pose"]["orientation"] == q
    assert math.atan2(2 * q["w"] * q["z"], 1 - 2 * q["z"] ** 2) == pytest.approx(
        math.radians(yaw_deg) if yaw_deg <= 180 else math.radians(yaw_deg - 360), abs=1e-9
    )
