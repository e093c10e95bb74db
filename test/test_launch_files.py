"""The launch files and params YAML checked against the nodes, without running ``launch``.

``launch``/``launch_ros`` are not on PyPI, so the launch files are read as Python source
(ast): every ``DeclareLaunchArgument`` is used and every ``LaunchConfiguration`` declared;
every executable exists; every parameter a launch file or a config/<node>.yaml sets is
declared by the node, found by instantiating the node on a real ROS graph (autostart
false) -- and each params YAML is read by rcl itself (``--params-file``), in a namespace, so
the file really applies to the node and every value has the node's type. Emulator command
lines are parsed by the emulators' own argument parsers. Where ``launch_ros`` is
importable (a robot with apt ROS 2 and the package built with colcon), the launch files
are also run for real.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from rclpy.lifecycle import LifecycleNode

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_DIR = ROOT / "launch"
CONFIG_DIR = ROOT / "config"
LAUNCH_FILES = sorted(LAUNCH_DIR.glob("*.launch.py"))
# Parameters every rclpy node declares by itself.
BUILTIN_PARAMS = {"use_sim_time", "start_type_description_service"}
REQUIRED_ROBOT_ARGS = {
    "namespace",
    "params_file",
    "tools_file",
    "locations_file",
    "region",
    "model",
    "voice",
    "language",
    "use_sim_time",
    "enable_kvs",
    "enable_local_audio",
    "log_level",
}


# ----------------------------------------------------------------------------- ast helpers
def _name(func: ast.expr) -> str:
    if isinstance(func, ast.Name):
        return func.id
    if isinstance(func, ast.Attribute):
        return func.attr
    return ""


def calls(tree: ast.AST, name: str) -> list[ast.Call]:
    return [n for n in ast.walk(tree) if isinstance(n, ast.Call) and _name(n.func) == name]


def kwarg(call: ast.Call, key: str) -> ast.expr | None:
    for k in call.keywords:
        if k.arg == key:
            return k.value
    return None


def literal(node: ast.expr | None, what: str) -> Any:
    """A literal value; anything computed would make the check incomplete, so it fails."""
    assert node is not None, f"{what}: missing"
    try:
        return ast.literal_eval(node)
    except ValueError:
        pytest.fail(f"{what}: not a literal ({ast.unparse(node)}), so it cannot be checked")


def first_arg(call: ast.Call, key: str, what: str) -> Any:
    return literal(call.args[0] if call.args else kwarg(call, key), what)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(), filename=str(path))


def declared_args(tree: ast.AST, path: Path) -> dict[str, ast.Call]:
    out = {}
    for c in calls(tree, "DeclareLaunchArgument"):
        name = first_arg(c, "name", f"{path.name}: DeclareLaunchArgument name")
        assert name not in out, f"{path.name}: argument {name!r} declared twice"
        out[name] = c
    return out


def used_configs(tree: ast.AST, path: Path) -> set[str]:
    return {
        first_arg(c, "variable_name", f"{path.name}: LaunchConfiguration name")
        for c in calls(tree, "LaunchConfiguration")
    }


def console_scripts() -> dict[str, str]:
    tree = parse(ROOT / "setup.py")
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "CONSOLE_SCRIPTS" for t in node.targets
        ):
            entries = ast.literal_eval(node.value)
            return {e.split("=")[0].strip(): e.split("=")[1].strip() for e in entries}
    raise AssertionError("setup.py has no CONSOLE_SCRIPTS list")


def launched_nodes(tree: ast.AST, path: Path) -> list[dict[str, Any]]:
    """Each ``Node(...)``: executable, name, the parameter names it sets by dict, and the
    config/<node>.yaml files it loads through ``params_files(context, "<node>")``."""
    nodes = []
    for c in calls(tree, "Node") + calls(tree, "LifecycleNode"):
        exe = literal(kwarg(c, "executable"), f"{path.name}: Node executable")
        name = literal(kwarg(c, "name"), f"{path.name}: Node name of {exe}")
        params_expr = kwarg(c, "parameters")
        set_params: set[str] = set()
        yaml_files: list[str] = []
        if params_expr is not None:
            for sub in ast.walk(params_expr):
                if isinstance(sub, ast.Dict):
                    for k in sub.keys:
                        set_params.add(literal(k, f"{path.name}: parameter of {name}"))
                if isinstance(sub, ast.Call) and _name(sub.func) == "params_files":
                    yaml_files.append(
                        f"{literal(sub.args[1], f'{path.name}: params_files of {name}')}.yaml"
                    )
        nodes.append(
            {"executable": exe, "name": name, "params": set_params, "yaml_files": yaml_files}
        )
    return nodes


def global_params(tree: ast.AST, path: Path) -> set[str]:
    """Parameters set for every node by ``SetParameter(name=...)``."""
    return {
        first_arg(c, "name", f"{path.name}: SetParameter name") for c in calls(tree, "SetParameter")
    }


# ----------------------------------------------------------------------------- node helpers
def node_class(executable: str) -> type[LifecycleNode]:
    """The LifecycleNode class defined in sonic_voice/nodes/<executable>.py."""
    module = importlib.import_module(f"sonic_voice.nodes.{executable}")
    classes = [
        c
        for _, c in inspect.getmembers(module, inspect.isclass)
        if issubclass(c, LifecycleNode) and c.__module__ == module.__name__
    ]
    assert len(classes) == 1, f"sonic_voice.nodes.{executable}: {len(classes)} node classes"
    return classes[0]


def node_executables() -> list[str]:
    """Executables that are nodes (the module has a LifecycleNode), from setup.py."""
    out = []
    for exe, target in console_scripts().items():
        module = target.split(":")[0]
        if module.startswith("sonic_voice.nodes.") and module.split(".")[-1] == exe:
            source = (ROOT / (module.replace(".", "/") + ".py")).read_text()
            if "(VoiceNode)" in source:
                out.append(exe)
    return out


_declared_cache: dict[str, dict[str, Any]] = {}


def declared_params(graph, executable: str) -> dict[str, Any]:
    """name -> default value of every parameter the node declares (autostart false)."""
    if executable not in _declared_cache:
        from rclpy.parameter import Parameter

        cls = node_class(executable)
        node = cls(context=graph.context, parameter_overrides=[Parameter("autostart", value=False)])
        try:
            values = {n: p.value for n, p in node._parameters.items()}
            values["autostart"] = True  # the declared default, overridden above
            _declared_cache[executable] = values
        finally:
            node.destroy_node()
    return _declared_cache[executable]


# ----------------------------------------------------------------------------- launch files
def test_there_are_launch_files() -> None:
    names = {p.name for p in LAUNCH_FILES}
    assert {"sonic_voice.launch.py", "demo.launch.py"} <= names


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_arguments_declared_described_and_used(path: Path) -> None:
    tree = parse(path)
    declared = declared_args(tree, path)
    used = used_configs(tree, path)
    assert used - declared.keys() == set(), f"{path.name}: LaunchConfiguration never declared"
    assert declared.keys() - used == set(), f"{path.name}: DeclareLaunchArgument never used"
    for name, c in declared.items():
        desc = literal(kwarg(c, "description"), f"{path.name}: description of {name}")
        assert isinstance(desc, str) and len(desc) > 10, f"{path.name}: {name} needs a description"
        default = kwarg(c, "default_value")
        assert default is not None, f"{path.name}: {name} needs a default_value"
        choices = kwarg(c, "choices")
        if choices is not None:
            assert literal(default, name) in literal(choices, f"{path.name}: choices of {name}")
    assert "PythonExpression" not in path.read_text(), "conditions via IfCondition, not strings"


def test_robot_launch_has_the_documented_arguments() -> None:
    path = LAUNCH_DIR / "sonic_voice.launch.py"
    assert REQUIRED_ROBOT_ARGS <= declared_args(parse(path), path).keys()


def test_demo_launch_has_the_robot_arguments() -> None:
    robot = declared_args(parse(LAUNCH_DIR / "sonic_voice.launch.py"), Path("sonic_voice"))
    demo = declared_args(parse(LAUNCH_DIR / "demo.launch.py"), Path("demo"))
    # Same knobs on the demo, so it reads the same.
    assert robot.keys() <= demo.keys()


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_executables_exist(path: Path) -> None:
    scripts = console_scripts()
    for node in launched_nodes(parse(path), path):
        exe = node["executable"]
        assert exe in scripts, f"{path.name}: executable {exe!r} not in setup.py CONSOLE_SCRIPTS"
        wrapper = ROOT / "bin" / exe
        assert wrapper.is_file(), f"{path.name}: bin/{exe} missing (ros2 run needs it)"
        module, func = scripts[exe].split(":")
        assert importlib.util.find_spec(module) is not None, f"{module} not found"
        assert f"from {module} import {func}" in wrapper.read_text()


@pytest.mark.parametrize("path", LAUNCH_FILES, ids=lambda p: p.name)
def test_parameters_set_by_launch_files_are_declared(ros_graph, path: Path) -> None:
    tree = parse(path)
    every = global_params(tree, path)
    nodes = launched_nodes(tree, path)
    assert nodes, f"{path.name}: no Node actions found"
    for node in nodes:
        declared = declared_params(ros_graph, node["executable"])
        unknown = (node["params"] | every) - declared.keys()
        assert not unknown, f"{path.name}: {node['name']} does not declare {sorted(unknown)}"
        # Its own commented params file, from the share directory.
        assert node["yaml_files"] == [f"{node['name']}.yaml"], node
        assert (CONFIG_DIR / node["yaml_files"][0]).is_file()


# ----------------------------------------------------------------------------- params YAML
def config_files() -> list[Path]:
    return [CONFIG_DIR / f"{exe}.yaml" for exe in node_executables()]


def test_every_node_has_a_params_file() -> None:
    missing = [p.name for p in config_files() if not p.is_file()]
    assert not missing, f"config/ lacks {missing}"


@pytest.mark.parametrize("path", config_files(), ids=lambda p: p.name)
def test_params_yaml_lists_every_parameter_with_its_default(ros_graph, path: Path) -> None:
    doc = yaml.safe_load(path.read_text())
    assert list(doc) == ["/**"], f"{path.name}: one namespace-agnostic '/**' section"
    params = doc["/**"]["ros__parameters"]
    declared = declared_params(ros_graph, path.stem)
    for name, value in params.items():
        assert name in declared, f"{path.name}: {name!r} is not a parameter of {path.stem}"
        default = declared[name]
        assert type(value) is type(default) and value == default, (
            f"{path.name}: {name} = {value!r}, the node's default is {default!r}"
        )
    text = path.read_text()
    for name in declared.keys() - BUILTIN_PARAMS - params.keys():
        # Parameters without a usable YAML default are listed commented out.
        assert re.search(rf"^\s+# {re.escape(name)}:", text, re.M), (
            f"{path.name}: parameter {name!r} not listed"
        )
    # Every listed parameter has a comment line above it.
    lines = text.splitlines()
    for i, line in enumerate(lines):
        m = re.match(r"^    (\w+):", line)
        if m:
            assert lines[i - 1].lstrip().startswith("#"), f"{path.name}: {m[1]} has no comment"


@pytest.mark.parametrize("path", config_files(), ids=lambda p: p.name)
def test_params_yaml_applies_in_any_namespace(ros_graph, path: Path) -> None:
    """rcl reads the file (--params-file) for a node in a namespace and gets every value."""
    cls = node_class(path.stem)
    node = cls(
        context=ros_graph.context,
        namespace="/robot1/voice",
        cli_args=["--ros-args", "--params-file", str(path), "-p", "autostart:=false"],
    )
    try:
        params = yaml.safe_load(path.read_text())["/**"]["ros__parameters"]
        for name, value in params.items():
            if name == "autostart":
                continue
            got = node.get_parameter(name).value
            assert got == value, f"{path.name}: {name} read as {got!r}"
        assert node.get_parameter("autostart").value is False
    finally:
        node.destroy_node()


# ----------------------------------------------------------------------------- demo stand-ins
def emulator_commands(tree: ast.AST, path: Path) -> list[list[Any]]:
    """The ``cmd`` of each ExecuteProcess, LaunchConfiguration("x") replaced by its default."""
    defaults = {}
    for name, c in declared_args(tree, path).items():
        try:
            defaults[name] = ast.literal_eval(kwarg(c, "default_value"))
        except ValueError:  # computed (a path in the share directory)
            defaults[name] = f"/share/{name}"
    out = []
    for c in calls(tree, "ExecuteProcess"):
        cmd = kwarg(c, "cmd")
        assert isinstance(cmd, ast.List), f"{path.name}: ExecuteProcess cmd must be a list"
        argv = []
        for el in cmd.elts:
            if isinstance(el, ast.Call) and _name(el.func) == "LaunchConfiguration":
                argv.append(str(defaults[first_arg(el, "variable_name", "cmd")]))
            elif isinstance(el, ast.Constant):
                argv.append(el.value)
            else:
                argv.append(ast.unparse(el))  # e.g. sys.executable
        out.append(argv)
    return out


def test_demo_stand_ins_take_the_arguments_given() -> None:
    path = LAUNCH_DIR / "demo.launch.py"
    commands = emulator_commands(parse(path), path)
    modules = {argv[argv.index("-m") + 1] for argv in commands}
    assert modules == {"sonic_voice.emulators.sonic", "sonic_voice.emulators.kvs"}
    for argv in commands:
        i = argv.index("-m")
        module = importlib.import_module(f"{argv[i + 1]}.__main__")
        parse_args = getattr(module, "parse_args", None) or module._args
        parser_args = argv[i + 2 :]
        try:
            parse_args(parser_args)
        except SystemExit as e:
            pytest.fail(f"{argv[i + 1]} rejects {parser_args}: exit {e.code}")


# ----------------------------------------------------------------------------- real launch
def _launch_available() -> str:
    """'' when the launch files can really run here, else why not."""
    try:
        # Not find_spec: this repository's launch/ folder is a namespace package "launch".
        from launch_ros.actions import Node  # noqa: F401

        from launch import LaunchService  # noqa: F401
    except ImportError as e:
        return f"launch/launch_ros not importable ({e}); not on PyPI: install ROS 2 from apt"
    try:
        from ament_index_python.packages import get_package_share_directory

        get_package_share_directory("sonic_voice")
    except Exception as e:  # noqa: BLE001 - any failure means "not installed with colcon"
        return f"sonic_voice is not in the ament index (build it with colcon): {e}"
    return ""


LAUNCH_SKIP = _launch_available()


@pytest.mark.skipif(bool(LAUNCH_SKIP), reason=LAUNCH_SKIP or "launch available")
@pytest.mark.parametrize(
    ("launch_file", "arguments", "expect"),
    [
        (
            "sonic_voice.launch.py",
            {"enable_kvs": "false", "enable_local_audio": "false", "region": "eu-north-1"},
            {"sonic_session": {"region": "eu-north-1"}},
        ),
        (
            "demo.launch.py",
            {"enable_local_audio": "false", "enable_kvs": "false"},
            {"sim_base": {"action_name": "navigate_to_pose"}},
        ),
    ],
)
def test_launch_for_real(launch_file: str, arguments: dict, expect: dict, tmp_path: Path) -> None:
    """Run a launch file as ``ros2 launch`` does (LaunchService in the main thread of its
    own process), wait for its nodes to be active with their parameters, then Ctrl-C."""
    import os
    import signal
    import subprocess
    import sys

    import rclpy
    from lifecycle_msgs.srv import GetState
    from rcl_interfaces.srv import GetParameters
    from rclpy.context import Context

    from test.harness.ros import next_domain_id

    script = tmp_path / "run_launch.py"
    script.write_text(
        "import sys\n"
        "from launch import LaunchDescription, LaunchService\n"
        "from launch.actions import IncludeLaunchDescription\n"
        "from launch.launch_description_sources import PythonLaunchDescriptionSource\n"
        "ls = LaunchService()\n"
        "ls.include_launch_description(LaunchDescription([IncludeLaunchDescription(\n"
        "    PythonLaunchDescriptionSource(sys.argv[1]),\n"
        "    launch_arguments=[a.split(':=', 1) for a in sys.argv[2:]])]))\n"
        "sys.exit(ls.run())\n"
    )
    domain = next_domain_id()
    env = {**os.environ, "ROS_DOMAIN_ID": str(domain)}
    proc = subprocess.Popen(
        [sys.executable, str(script), str(LAUNCH_DIR / launch_file)]
        + [f"{k}:={v}" for k, v in arguments.items()],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain)
    probe = rclpy.create_node("launch_probe", context=ctx)

    def call(srv: Any, name: str, req: Any) -> Any:
        client = probe.create_client(srv, name)
        assert client.wait_for_service(timeout_sec=60), f"{name} did not come up"
        fut = client.call_async(req)
        rclpy.spin_until_future_complete(probe, fut, timeout_sec=30)
        return fut.result()

    try:
        for node_name, params in expect.items():
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:  # driven by the launch file, not by itself
                state = call(GetState, f"/{node_name}/get_state", GetState.Request())
                if state.current_state.label == "active":
                    break
                time.sleep(0.2)
            assert state.current_state.label == "active", state.current_state.label
            got = call(
                GetParameters,
                f"/{node_name}/get_parameters",
                GetParameters.Request(names=list(params)),
            )
            assert [v.string_value for v in got.values] == list(params.values())
        proc.send_signal(signal.SIGINT)
        out, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        probe.destroy_node()
        ctx.try_shutdown()


# ----------------------------------------------------------------------------- docs
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]


def _code_blocks(path: Path, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", path.read_text(), re.S)


def _shell_commands(path: Path) -> list[str]:
    """Shell lines of ```bash blocks, continuation lines joined, comments dropped."""
    out = []
    for block in _code_blocks(path, "bash"):
        for cmd in block.replace("\\\n", " ").splitlines():
            cmd = re.sub(r"\s#.*$", "", cmd).strip()
            if cmd and not cmd.startswith("#"):
                out.append(cmd)
    return out


def _make_targets() -> set[str]:
    return set(re.findall(r"^([a-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_documented_commands_name_real_things(path: Path) -> None:
    """ros2 launch/run, make targets, venv scripts and files named in the docs exist, and
    every launch argument given in the docs is declared by that launch file."""
    scripts = console_scripts()
    targets = _make_targets()
    for cmd in _shell_commands(path):
        for m in re.finditer(r"ros2 launch sonic_voice (\S+)((?:\s+[\w]+:=\S+)*)", cmd):
            launch_file = LAUNCH_DIR / m[1]
            assert launch_file.is_file(), f"{path.name}: {cmd}"
            declared = declared_args(parse(launch_file), launch_file)
            for arg in re.findall(r"(\w+):=", m[2]):
                assert arg in declared, f"{path.name}: {m[1]} has no argument {arg!r}: {cmd}"
        for exe in re.findall(r"ros2 run sonic_voice (\S+)", cmd):
            assert exe in scripts, f"{path.name}: no executable {exe!r}: {cmd}"
        for target in re.findall(r"(?:^|&&\s*|;\s*)make (\w+)", cmd):
            assert target in targets, f"{path.name}: no make target {target!r}: {cmd}"
        for exe in re.findall(r"\.venv/bin/([\w-]+)", cmd):
            assert exe in scripts or exe in {"python", "pip", "ruff", "pytest"}, (
                f"{path.name}: .venv/bin/{exe} is not installed by setup.py: {cmd}"
            )
        for f in re.findall(r"(?:^|\s)((?:config|scripts|launch)/[\w./-]+)", cmd):
            assert (ROOT / f).exists(), f"{path.name}: {f} does not exist: {cmd}"


def test_iam_policies_in_aws_setup_are_valid_json_with_known_actions() -> None:
    import json

    blocks = [json.loads(b) for b in _code_blocks(ROOT / "docs" / "aws-setup.md", "json")]
    actions = set()
    for doc in blocks:
        statements = doc["Statement"] if "Statement" in doc else [doc]
        for st in statements:
            assert st["Effect"] == "Allow"
            acts = st["Action"] if isinstance(st["Action"], list) else [st["Action"]]
            actions |= set(acts)
            assert st.get("Resource") or st.get("Principal"), st
    # What the robot does, and nothing more: Bedrock invoke, KVS signaling as master.
    assert {
        "bedrock:InvokeModel",
        "kinesisvideo:DescribeSignalingChannel",
        "kinesisvideo:GetSignalingChannelEndpoint",
        "kinesisvideo:GetIceServerConfig",
        "kinesisvideo:ConnectAsMaster",
        "kinesisvideo:CreateSignalingChannel",
    } <= actions
    assert not any("*" in a for a in actions), "no wildcard actions in a least-privilege policy"


def test_quickstart_params_example_sets_declared_parameters(ros_graph) -> None:
    """The params_file example of the quickstart names real nodes and parameters."""
    blocks = _code_blocks(ROOT / "docs" / "quickstart.md", "yaml")
    assert blocks, "quickstart has a params file example"
    for block in blocks:
        for key, section in yaml.safe_load(block).items():
            node = key.removeprefix("/**/")
            declared = declared_params(ros_graph, node)
            unknown = set(section["ros__parameters"]) - declared.keys()
            assert not unknown, f"quickstart example: {node} has no {sorted(unknown)}"
