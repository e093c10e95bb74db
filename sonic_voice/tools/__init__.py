"""YAML-declared tools bound to ROS 2 actions, services and topics.

- :func:`load_tool_config` reads and checks a tools YAML against the installed interface
  types (no node needed; used by tests and for validating a config before a run).
- :func:`load_provider` builds the :class:`RosToolProvider` the session node hands tool
  calls to (the ToolProvider protocol of ``sonic_voice.sonic.tools_seam`` + ``shutdown()``).
"""

from __future__ import annotations

from typing import Any

from sonic_voice.tools.config import (
    LocationTable,
    ToolConfig,
    ToolConfigError,
    ToolDef,
    load_locations,
    load_tool_config,
)

__all__ = [
    "LocationTable",
    "RosToolProvider",
    "ToolConfig",
    "ToolConfigError",
    "ToolDef",
    "load_locations",
    "load_provider",
    "load_tool_config",
]

ALLOWLIST_PARAM = "tools_allowlist"


def load_provider(node: Any, tools_file: str, locations_file: str | None = None) -> Any:
    """Load ``tools_file`` (+ named locations) and make the ROS clients.

    The clients live on a node of their own, ``<node>_tools``, with its own executor thread
    (see :class:`sonic_voice.tools.provider.ToolsExecutor`); call ``shutdown()`` on the
    provider before the context goes (it joins that thread).

    Declares the node parameter ``tools_allowlist`` (string array; empty = every tool the
    file allows). Raises :class:`ToolConfigError` naming file, tool and field on any
    configuration problem, so the node's configure transition fails loudly.
    """
    from rcl_interfaces.msg import ParameterDescriptor
    from rclpy.exceptions import ParameterUninitializedException
    from rclpy.parameter import Parameter

    from sonic_voice.tools.provider import RosToolProvider

    config = load_tool_config(tools_file, locations_file)
    if not node.has_parameter(ALLOWLIST_PARAM):
        node.declare_parameter(
            ALLOWLIST_PARAM,
            Parameter.Type.STRING_ARRAY,
            ParameterDescriptor(
                description="Tools the model may call (a global allowlist); empty = all "
                "declared (and allowed by the file's 'allow:')."
            ),
        )
    try:
        allow = list(node.get_parameter(ALLOWLIST_PARAM).value or [])
    except ParameterUninitializedException:  # declared by type, no value given: all tools
        allow = []
    unknown = [a for a in allow if a not in config.tools]
    if unknown:
        raise ToolConfigError(f"{ALLOWLIST_PARAM} names undeclared tool(s): {unknown}")
    provider = RosToolProvider(node, config, list(allow))
    names = ", ".join(provider.tools) or "none"
    node.get_logger().info(f"tools from {tools_file}: {names}")
    if provider.blocked:
        node.get_logger().info(f"tools not allowed: {', '.join(provider.blocked)}")
    return provider


def __getattr__(name: str) -> Any:
    if name == "RosToolProvider":
        from sonic_voice.tools.provider import RosToolProvider

        return RosToolProvider
    raise AttributeError(name)
