"""YAML-declared tools: ROS 2 actions, services, topics and robot state, documents
(knowledge), MCP servers and Strands agents, each kind a plug-in (``tools/bindings``).

- :func:`load_tool_config` reads and checks a tools YAML (no node needed; used by tests and
  for validating a config before a run).
- :func:`load_provider` builds the :class:`ToolsProvider` the session node hands tool calls
  to (the ToolProvider protocol of ``sonic_voice.sonic.tools_seam`` + ``shutdown()``,
  ``running_tools()`` and ``cancel(use_id | predicate, reason)``).
- :func:`load_tools` builds one without a node (tools of kinds that need no ROS).
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
    "ToolsProvider",
    "load_locations",
    "load_provider",
    "load_tool_config",
    "load_tools",
]

ALLOWLIST_PARAM = "tools_allowlist"


def load_provider(node: Any, tools_file: str, locations_file: str | None = None) -> Any:
    """Load ``tools_file`` (+ named locations), make the ROS clients and start the rest
    (MCP servers, documents indexes, agents).

    The ROS clients live behind one port (``sonic_voice.tools.bindings._ros.RosPort``,
    built by ``make_ros_port``); call ``shutdown()`` on the provider before the context
    goes (it stops the port and the servers).

    Declares the node parameter ``tools_allowlist`` (string array; empty = every tool the
    file allows). Raises :class:`ToolConfigError` naming file, tool and field on any
    configuration problem, so the node's configure transition fails loudly.
    """
    from rcl_interfaces.msg import ParameterDescriptor
    from rclpy.exceptions import ParameterUninitializedException
    from rclpy.parameter import Parameter

    from sonic_voice.tools.provider import ToolsProvider

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
    provider = ToolsProvider(config, list(allow), node)
    names = ", ".join(provider.tools) or "none"
    node.get_logger().info(f"tools from {tools_file}: {names}")
    if provider.blocked:
        node.get_logger().info(f"tools not allowed: {', '.join(provider.blocked)}")
    return provider


def load_tools(
    tools_file: str, locations_file: str | None = None, allowlist: list[str] | None = None
) -> Any:
    """A provider without a node: for tools of kinds that need no ROS (knowledge, mcp,
    agent); a ROS tool in the file is a ToolConfigError."""
    from sonic_voice.tools.provider import ToolsProvider

    return ToolsProvider(load_tool_config(tools_file, locations_file), allowlist, None)


def __getattr__(name: str) -> Any:
    if name in ("RosToolProvider", "ToolsProvider"):
        from sonic_voice.tools import provider

        return getattr(provider, name)
    raise AttributeError(name)
