"""YAML tool declarations -> validated, typed tool definitions (no node needed).

Everything that can be wrong in a configuration is found here, at start-up, and reported
as a :class:`ToolConfigError` naming the file, the tool and the field: bad YAML (with its
line), an invalid JSON Schema, an unknown interface type, a goal/request/message field the
type does not have, a constant that does not fit the field, an input argument or table
column that does not exist. A robot that starts has tools that can be called.

This module keeps only what every tool has (name, description, input schema, timeout,
confirmation, cancellation flags, allowlist); each kind's section is read and checked by
its plug-in (``sonic_voice.tools.bindings.<kind>``), imported only when a tool uses it.

File shape (see docs/adding-a-tool.md for the full reference)::

    allow: [navigate_to, stop]        # optional global allowlist
    defaults: {timeout_s: 60, server_wait_s: 2}
    tables: {speeds: {slow: {v: 0.2}}} # optional named lookup tables (+ ``locations``)
    tools:
      - name: navigate_to
        description: ...
        requires_confirmation: false
        cancel_on_barge_in: false      # also stopped when the visitor talks over the robot
                                       # (unset: sonic_session's cancel_tools_on_barge_in)
        input: {type: object, properties: {...}, required: [...]}   # JSON Schema
        action: {type: nav2_msgs/action/NavigateToPose, server: navigate_to_pose, goal: {...}}
        # or one of: service, topic, cancel, read, knowledge, mcp, agent
"""

from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from sonic_voice.tools.bindings import KINDS, binding_class
from sonic_voice.tools.bindings.base import Binding, LoadContext, ToolConfigError

__all__ = ["KINDS", "LocationTable", "ToolConfig", "ToolConfigError", "ToolDef",
           "load_locations", "load_tool_config", "read_yaml"]  # fmt: skip

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")


# ------------------------------------------------------------------------------ YAML
class _LineLoader(yaml.SafeLoader):
    """SafeLoader that records each mapping's start line as ``__line__`` (1-based)."""


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> dict[str, Any]:
    mapping = loader.construct_mapping(node, deep=True)
    mapping["__line__"] = node.start_mark.line + 1
    return mapping


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _strip_lines(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _strip_lines(v) for k, v in obj.items() if k != "__line__"}
    if isinstance(obj, list):
        return [_strip_lines(v) for v in obj]
    return obj


def read_yaml(path: str | Path) -> Any:
    """Parse a YAML file keeping line numbers; a syntax error names file and line."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ToolConfigError(f"{p}: cannot read: {e.strerror or e}") from e
    try:
        return yaml.load(text, Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}:{mark.column + 1}" if mark else str(p)
        problem = getattr(e, "problem", None) or str(e)
        raise ToolConfigError(f"{where}: invalid YAML: {problem}") from e


def _where(path: Path, obj: Any) -> str:
    line = obj.get("__line__") if isinstance(obj, dict) else None
    return f"{path}:{line}" if line else str(path)


# ------------------------------------------------------------------------------ locations
@dataclass
class LocationTable:
    """Named places: canonical name -> row; aliases (any language) -> canonical name.

    Each row has ``name, frame, x, y, z, yaw`` (radians) plus the derived ``pose``
    (geometry_msgs/Pose as a dict), ``pose_stamped`` (geometry_msgs/PoseStamped) and any
    extra keys of the file, so goal mappings can pick what their type needs.
    """

    rows: dict[str, dict[str, Any]] = field(default_factory=dict)
    aliases: dict[str, str] = field(default_factory=dict)

    def names(self) -> list[str]:
        return list(self.rows)

    def choices(self) -> list[str]:
        """What the model may say: canonical names first, then every alias."""
        extra = [a for a in self.aliases_display() if a not in self.rows]
        return [*self.rows, *extra]

    def aliases_display(self) -> list[str]:
        out: list[str] = []
        for name, row in self.rows.items():
            for a in row.get("_alias_list", []):
                if a not in out and a != name:
                    out.append(a)
        return out

    def resolve(self, key: Any) -> str | None:
        if not isinstance(key, str):
            return None
        if key in self.rows:
            return key
        return self.aliases.get(_norm(key))

    def row(self, key: Any) -> dict[str, Any] | None:
        name = self.resolve(key)
        return None if name is None else self.rows[name]

    def describe(self) -> str:
        """One line per place with its aliases, for the tool description the model reads."""
        parts = []
        for name, row in self.rows.items():
            al = [a for a in row.get("_alias_list", []) if a != name]
            parts.append(f"{name} ({', '.join(al)})" if al else name)
        return "; ".join(parts)


def _norm(s: str) -> str:
    return " ".join(s.casefold().replace("_", " ").split())


def _pose_dict(frame: str, x: float, y: float, z: float, yaw: float) -> dict[str, Any]:
    return {
        "position": {"x": x, "y": y, "z": z},
        "orientation": {"x": 0.0, "y": 0.0, "z": math.sin(yaw / 2), "w": math.cos(yaw / 2)},
    }


def load_locations(source: str | Path | dict[str, Any] | LocationTable | None) -> LocationTable:
    """Read ``config/locations.yaml`` (or an equivalent dict) into a :class:`LocationTable`.

    Shape: ``{frame: map, locations: {kitchen: {x, y, yaw | yaw_deg, frame?, aliases:
    {es: [cocina], ...} | [..]}}}``.
    """
    if isinstance(source, LocationTable):
        return source
    if source is None:
        return LocationTable()
    path = Path(source) if not isinstance(source, dict) else Path("<locations>")
    doc = read_yaml(source) if not isinstance(source, dict) else source
    if not isinstance(doc, dict) or not isinstance(doc.get("locations"), dict):
        raise ToolConfigError(f"{path}: expected a mapping with a 'locations:' mapping")
    default_frame = doc.get("frame", "map")
    table = LocationTable()
    for name, spec in doc["locations"].items():
        if name == "__line__":
            continue
        where = f"{_where(path, spec)}: location {name!r}"
        if not isinstance(spec, dict):
            raise ToolConfigError(f"{where}: expected a mapping with x, y and yaw")
        try:
            x = float(spec["x"])
            y = float(spec["y"])
            z = float(spec.get("z", 0.0))
            if "yaw_deg" in spec:
                yaw = math.radians(float(spec["yaw_deg"]))
            else:
                yaw = float(spec.get("yaw", 0.0))
        except KeyError as e:
            raise ToolConfigError(f"{where}: missing {e.args[0]!r}") from e
        except (TypeError, ValueError) as e:
            raise ToolConfigError(f"{where}: x, y, z, yaw must be numbers ({e})") from e
        frame = str(spec.get("frame", default_frame))
        raw_aliases = spec.get("aliases", [])
        if isinstance(raw_aliases, dict):
            alias_list = [str(a) for k, v in raw_aliases.items() if k != "__line__" for a in v]
        elif isinstance(raw_aliases, list):
            alias_list = [str(a) for a in raw_aliases]
        else:
            raise ToolConfigError(f"{where}: aliases must be a list or a language -> list map")
        pose = _pose_dict(frame, x, y, z, yaw)
        row = {
            k: v
            for k, v in _strip_lines(spec).items()
            if k not in ("aliases", "x", "y", "z", "yaw", "yaw_deg", "frame")
        }
        row.update(
            name=str(name),
            frame=frame,
            x=x,
            y=y,
            z=z,
            yaw=yaw,
            pose=pose,
            pose_stamped={"header": {"frame_id": frame}, "pose": copy.deepcopy(pose)},
            _alias_list=alias_list,
        )
        table.rows[str(name)] = row
        for a in [str(name), *alias_list]:
            other = table.aliases.get(_norm(a))
            if other is not None and other != name:
                raise ToolConfigError(f"{where}: alias {a!r} already names {other!r}")
            table.aliases[_norm(a)] = str(name)
    return table


# ------------------------------------------------------------------------------ tools
@dataclass
class ToolDef:
    """One tool the model may call: the common settings plus its kind's binding."""

    name: str
    description: str
    schema: dict[str, Any]  # what the model sees (confirmed added, enums filled)
    binding: Binding
    timeout_s: float
    server_wait_s: float
    requires_confirmation: bool = False
    moves_robot: bool = True
    cancels_running: bool = False
    cancel_on_barge_in: bool | None = None  # None: the session's default (false)
    lookup_args: dict[str, str] = field(default_factory=dict)  # input arg -> table name
    validator: Any = None
    source: str = ""  # file:line of its declaration (for start-up errors)

    @property
    def kind(self) -> str:
        return self.binding.kind

    def spec(self) -> dict[str, Any]:
        from sonic_voice.sonic.events import tool_spec

        return tool_spec(self.name, self.description, self.schema)


@dataclass
class ToolConfig:
    path: Path
    tools: dict[str, ToolDef]
    allow: list[str] | None
    tables: dict[str, Any]

    def kinds(self) -> set[str]:
        return {t.kind for t in self.tools.values()}


COMMON_KEYS = frozenset(
    {
        "name",
        "description",
        "input",
        "requires_confirmation",
        "moves_robot",
        "cancels_running",
        "cancel_on_barge_in",
        "timeout_s",
        "server_wait_s",
    }
)


def load_tool_config(
    path: str | Path,
    locations: str | Path | dict[str, Any] | LocationTable | None = None,
) -> ToolConfig:
    """Read and check a tools YAML (no node, no server started).

    Each kind's section is checked by its plug-in (interface types against the installed
    packages, documents folders, server commands on PATH...). What needs a running server
    (an MCP server's tool list) is checked when the provider starts. Raises
    :class:`ToolConfigError` naming file, line, tool and field for any problem.
    """
    path = Path(path)
    doc = read_yaml(path)
    if not isinstance(doc, dict) or not isinstance(doc.get("tools"), list):
        raise ToolConfigError(f"{path}: expected a mapping with a 'tools:' list")
    table_loc = load_locations(locations)
    tables: dict[str, Any] = {"locations": table_loc}
    for tname, rows in _strip_lines(doc.get("tables") or {}).items():
        if not isinstance(rows, dict):
            raise ToolConfigError(f"{path}: table {tname!r} must map names to rows")
        tables[tname] = rows
    defaults = _strip_lines(doc.get("defaults") or {})
    allow = doc.get("allow")
    if allow is not None and not (
        isinstance(allow, list) and all(isinstance(a, str) for a in allow)
    ):
        raise ToolConfigError(f"{path}: 'allow' must be a list of tool names")
    tools: dict[str, ToolDef] = {}
    for raw in doc["tools"]:
        tool = _load_tool(path, raw, tables, defaults)
        if tool.name in tools:
            raise ToolConfigError(f"{_where(path, raw)}: tool {tool.name!r} is declared twice")
        tools[tool.name] = tool
    for a in allow or []:
        if a not in tools:
            raise ToolConfigError(f"{path}: 'allow' names {a!r}, which is not declared")
    return ToolConfig(path=path, tools=tools, allow=allow, tables=tables)


def _load_tool(path: Path, raw: Any, tables: dict[str, Any], defaults: dict[str, Any]) -> ToolDef:
    if not isinstance(raw, dict):
        raise ToolConfigError(f"{path}: each entry of 'tools' must be a mapping")
    name = raw.get("name")
    where = f"{_where(path, raw)}: tool {name!r}"
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise ToolConfigError(f"{where}: name must be snake_case (a-z, 0-9, _; 1-64 chars)")
    unknown = set(raw) - COMMON_KEYS - set(KINDS) - {"__line__"}
    if unknown:
        raise ToolConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    kinds = [k for k in KINDS if k in raw]
    if len(kinds) != 1:
        raise ToolConfigError(
            f"{where}: needs exactly one binding of {', '.join(KINDS)} (found {kinds or 'none'})"
        )
    kind = kinds[0]
    cls = binding_class(kind)
    desc = raw.get("description")
    if not isinstance(desc, str) or not desc.strip():
        if cls.takes_input:
            raise ToolConfigError(f"{where}: 'description' (what the model reads) is required")
        desc = ""
    if not cls.takes_input and raw.get("input") is not None:
        raise ToolConfigError(f"{where}: input: a {kind} tool's input schema comes from "
                              "its server; remove 'input'")  # fmt: skip
    raw_input = _strip_lines(raw.get("input"))
    if raw_input is None and cls.default_input is not None:
        raw_input = cls.default_input
    schema, lookup_args = _input_schema(where, raw_input, tables)
    requires_conf = bool(raw.get("requires_confirmation", False))
    if cls.takes_input:
        desc = _with_lookups(desc, lookup_args, tables)
    ctx = LoadContext(
        path=path, line=raw.get("__line__"), tool=name, kind=kind,
        props=schema.get("properties", {}), tables=tables, defaults=defaults,
    )  # fmt: skip
    try:
        binding = cls.load(ctx, _strip_lines(raw[kind]) or {})
    except ToolConfigError:
        raise
    except (ValueError, TypeError, KeyError) as e:
        raise ToolConfigError(f"{where}: {kind}: {e}") from e
    timeout = raw.get("timeout_s", binding.timeout_s)
    if timeout is None:
        timeout = defaults.get("timeout_s", 60.0)
    return make_tool(
        name=name,
        description=desc,
        schema=schema,
        binding=binding,
        where=where,
        timeout_s=float(timeout),
        server_wait_s=float(raw.get("server_wait_s", defaults.get("server_wait_s", 2.0))),
        requires_confirmation=requires_conf,
        moves_robot=bool(raw.get("moves_robot", binding.moves_robot_default())),
        cancels_running=bool(raw.get("cancels_running", kind == "cancel")),
        cancel_on_barge_in=(
            None if raw.get("cancel_on_barge_in") is None else bool(raw["cancel_on_barge_in"])
        ),
        lookup_args=lookup_args,
        source=_where(path, raw),
    )


def _with_lookups(desc: str, lookup_args: dict[str, str], tables: dict[str, Any]) -> str:
    for arg, tname in lookup_args.items():
        t = tables[tname]
        if isinstance(t, LocationTable) and t.rows:
            desc = desc.rstrip() + f" Known {tname} for '{arg}': {t.describe()}."
    return desc


def make_tool(
    *, name: str, description: str, schema: dict[str, Any], binding: Binding, where: str,
    requires_confirmation: bool = False, **common: Any,
) -> ToolDef:  # fmt: skip
    """A ToolDef with its confirmation argument and compiled validator (also used by
    kinds that learn their tools at start-up, e.g. an MCP server's)."""
    schema = copy.deepcopy(schema)
    desc = description
    if requires_confirmation:
        schema.setdefault("properties", {})["confirmed"] = {
            "type": "boolean",
            "const": True,
            "description": "true only after the person said yes to doing this now.",
        }
        req = schema.setdefault("required", [])
        if "confirmed" not in req:
            req.append("confirmed")
        desc = (
            desc.rstrip()
            + " Ask the person to confirm before calling this, then pass confirmed: true."
        )
    try:
        validator_cls = jsonschema.validators.validator_for(schema)
        validator_cls.check_schema(schema)
        validator = validator_cls(schema)
    except jsonschema.SchemaError as e:
        raise ToolConfigError(f"{where}: input is not a valid JSON Schema: {e.message}") from e
    return ToolDef(
        name=name,
        description=desc,
        schema=schema,
        binding=binding,
        requires_confirmation=requires_confirmation,
        validator=validator,
        **common,
    )


def _input_schema(
    where: str, raw: Any, tables: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, str]]:
    """The model-facing schema; ``enum_from: <table>`` becomes that table's enum."""
    schema: dict[str, Any] = copy.deepcopy(raw) if raw else {}
    if not isinstance(schema, dict):
        raise ToolConfigError(f"{where}: input must be a JSON Schema mapping")
    schema.setdefault("type", "object")
    if schema["type"] != "object":
        raise ToolConfigError(f"{where}: input: the top-level type must be 'object'")
    schema.setdefault("properties", {})
    schema.setdefault("required", [])
    lookup_args: dict[str, str] = {}
    for arg, prop in schema["properties"].items():
        if not isinstance(prop, dict):
            raise ToolConfigError(f"{where}: input.properties.{arg} must be a mapping")
        tname = prop.pop("enum_from", None)
        if tname is None:
            continue
        if tname not in tables:
            raise ToolConfigError(
                f"{where}: input.properties.{arg}: enum_from names unknown table {tname!r} "
                f"(known: {sorted(tables)})"
            )
        t = tables[tname]
        choices = t.choices() if isinstance(t, LocationTable) else list(t)
        if not choices:
            raise ToolConfigError(
                f"{where}: input.properties.{arg}: table {tname!r} is empty"
                + (" (no locations file given?)" if tname == "locations" else "")
            )
        prop.setdefault("type", "string")
        prop["enum"] = choices
        lookup_args[arg] = tname
    return schema, lookup_args
