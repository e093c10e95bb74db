"""Tool kinds as plug-ins: one module per kind, found by name in :data:`REGISTRY`.

Adding a kind is one new module here with a :class:`~.base.Binding` subclass and one line
in :data:`REGISTRY`; nothing else to edit. Modules are imported only for the kinds a tools
file uses, so a file with only ``knowledge``, ``mcp`` or ``agent`` tools never imports
rclpy.
"""

from __future__ import annotations

import importlib

from sonic_voice.tools.bindings.base import Binding

# kind (the YAML key of a tool's binding section) -> module holding ``BINDING``
REGISTRY: dict[str, str] = {
    "action": "sonic_voice.tools.bindings.action",
    "service": "sonic_voice.tools.bindings.service",
    "topic": "sonic_voice.tools.bindings.topic",
    "cancel": "sonic_voice.tools.bindings.cancel",
    "read": "sonic_voice.tools.bindings.read",
    "knowledge": "sonic_voice.tools.bindings.knowledge",
    "mcp": "sonic_voice.tools.bindings.mcp",
    "agent": "sonic_voice.tools.bindings.agent",
}

KINDS = tuple(REGISTRY)


def binding_class(kind: str) -> type[Binding]:
    """The Binding class of ``kind`` (its module imported on first use)."""
    return importlib.import_module(REGISTRY[kind]).BINDING
