"""The stack in one process: the same nodes as ``launch/sonic_voice.launch.py``, with the
same parameter files, read by rcl's own ``--params-file`` rules.

Each node gets ``--ros-args --params-file config/<node>.yaml [--params-file extra ...]`` as
its own arguments (the launch files pass the same files), then the runner's computed
values as ``parameter_overrides`` (which win, as ``-p`` would). The :class:`Stack` is the
nodes' lifecycle manager (like nav2's ``lifecycle_manager`` with ``autostart``): it
configures and activates them in order and stops them in reverse, within the runtime's
shutdown budget.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from rclpy.lifecycle import TransitionCallbackReturn
from rclpy.parameter import Parameter

from sonic_voice.paths import config_dir
from sonic_voice.ros.node import VoiceNode
from sonic_voice.ros.runtime import Runtime, describe_startup_error

NODES = {
    "audio_io": "sonic_voice.nodes.audio_io:AudioIONode",
    "sonic_session": "sonic_voice.nodes.sonic_session:SonicSessionNode",
    "kvs_webrtc": "sonic_voice.nodes.kvs_webrtc:KvsWebrtcNode",
    "sim_base": "sonic_voice.nodes.sim_base:SimBaseNode",
}


class StartupError(Exception):
    """The stack cannot start as configured; ``str()`` is one line saying what to fix."""


class Stack:
    """The nodes of one process, their runtime, and their lifecycle."""

    def __init__(
        self,
        params_files: list[Path] | None = None,
        config: Path | None = None,
        domain_id: int | None = None,
    ) -> None:
        self.config = config or config_dir()
        self.params_files = list(params_files or [])
        self.runtime = Runtime([], domain_id=domain_id)
        self.context = self.runtime.context
        self.nodes: dict[str, VoiceNode] = {}

    def node(self, name: str, overrides: dict[str, Any] | None = None, **kwargs: Any) -> Any:
        """Make node ``name`` with its params files and ``overrides``; not yet configured."""
        module, cls = NODES[name].split(":")
        factory = getattr(importlib.import_module(module), cls)
        files = [self.config / f"{name}.yaml", *self.params_files]
        cli = ["--ros-args"]
        for f in files:
            if f.exists():
                cli += ["--params-file", str(f)]
        params = [Parameter(k, value=v) for k, v in (overrides or {}).items()]
        try:
            node = factory(context=self.context, cli_args=cli, parameter_overrides=params, **kwargs)
        except Exception as e:
            line = describe_startup_error(name, e)
            if line is None:
                raise
            raise StartupError(line) from None
        self.runtime.add(node)
        self.nodes[name] = node
        self._check_types(name, node)
        return node

    def _check_types(self, name: str, node: Any) -> None:
        """A value of the wrong type in the user's params file: rcl keeps the value of the
        same name from an earlier file (config/<node>.yaml) and says nothing, so say it.
        The values are read as YAML wrote them (a quoted "[]" is a string): rclpy's own
        params-file reader re-parses strings and would call it an array."""
        import yaml
        from rclpy.parameter import Parameter as P

        kinds = {bool: P.Type.BOOL, int: P.Type.INTEGER, float: P.Type.DOUBLE, str: P.Type.STRING}
        fq = node.get_fully_qualified_name()
        keys = ("/**", "**", f"/**/{node.get_name()}", node.get_name(), fq, fq.lstrip("/"))
        for f in self.params_files:
            try:
                doc = yaml.safe_load(Path(f).read_text()) or {}
            except (OSError, yaml.YAMLError):
                continue  # rcl itself reports a broken file
            for key in keys:
                section = doc.get(key) if isinstance(doc, dict) else None
                values = (
                    (section or {}).get("ros__parameters") if isinstance(section, dict) else None
                )
                for pname, value in (values or {}).items():
                    if not node.has_parameter(pname) or type(value) not in kinds:
                        continue
                    want, got = node.get_parameter(pname).type_, kinds[type(value)]
                    if want in (got, P.Type.NOT_SET):
                        continue
                    raise StartupError(
                        f"{name}: parameter {pname} in {f} is {got.name.lower()} {value!r}; "
                        f"it must be {want.name.lower()}"
                    )

    def add(self, node: Any) -> Any:
        """A plain node (the monitor) on the same executor."""
        return self.runtime.add(node)

    def configure(self, name: str) -> None:
        """Configure one node now (e.g. to check its settings before slower start-up)."""
        node = self.nodes[name]
        if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
            raise StartupError(f"{name}: {node.config_error or 'could not configure'}")

    def start(self) -> None:
        """Configure every node (where not done yet), spin, activate them in order.

        Configuration comes before spinning: an action client made on a node that another
        thread spins can be handed to the executor before its lock exists (rclpy 9.1.2,
        ros2/rclpy#1589; see ``ros/compat.py``)."""
        for name, node in self.nodes.items():
            if node._state_machine.current_state[1] == "unconfigured":
                self.configure(name)
        self.runtime.start()
        for name, node in self.nodes.items():
            if node.trigger_activate() != TransitionCallbackReturn.SUCCESS:
                raise StartupError(f"{name}: {node.config_error or 'could not activate'}")

    def fatal_errors(self) -> dict[str, str]:
        return {n: node.fatal_error for n, node in self.nodes.items() if node.fatal_error}

    def close(self) -> float:
        """Bounded shutdown (goals cancelled first); returns how long it took."""
        return self.runtime.shutdown()
