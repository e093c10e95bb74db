"""ROS parameter files read the way ``ros2 launch`` / ``--params-file`` read them.

The all-in-one runner uses the same YAML files as the launch files, so a setting lives in
one place whichever way the nodes start. Supported keys: ``/**`` (any node), a node name,
or a fully qualified name (``/ns/node``), each holding ``ros__parameters``; nested maps
flatten to dotted names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from rclpy.parameter import Parameter


class ParamsFileError(ValueError):
    """A params file that cannot be used, with the file named."""


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


def read_params(path: str | Path, node_name: str, namespace: str = "") -> dict[str, Any]:
    """The parameters ``path`` gives node ``node_name`` (wildcard first, then by name)."""
    path = Path(path)
    try:
        doc = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ParamsFileError(f"{path}: {e}") from e
    if not isinstance(doc, dict):
        raise ParamsFileError(f"{path}: expected a mapping of node names")
    fq = f"{namespace.rstrip('/')}/{node_name}" if namespace else f"/{node_name}"
    out: dict[str, Any] = {}
    for key in ("/**", "**", node_name, fq, fq.lstrip("/")):
        section = doc.get(key)
        if section is None:
            continue
        if not isinstance(section, dict) or "ros__parameters" not in section:
            raise ParamsFileError(f"{path}: '{key}' needs a 'ros__parameters' mapping")
        _flatten("", section["ros__parameters"] or {}, out)
    return out


def overrides(values: dict[str, Any]) -> list[Parameter]:
    """rclpy ``parameter_overrides`` from plain values."""
    return [Parameter(name, value=value) for name, value in values.items()]
