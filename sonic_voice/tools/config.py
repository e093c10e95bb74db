"""YAML tool declarations -> validated, typed tool definitions (no node needed).

Everything that can be wrong in a configuration is found here, at start-up, and reported
as a :class:`ToolConfigError` naming the file, the tool and the field: bad YAML (with its
line), an invalid JSON Schema, an unknown interface type, a goal/request/message field the
type does not have, a constant that does not fit the field, an input argument or table
column that does not exist. A robot that starts has tools that can be called.

File shape (see docs/adding-a-tool.md for the full reference)::

    allow: [navigate_to, stop]        # optional global allowlist
    defaults: {timeout_s: 60, server_wait_s: 2}
    tables: {speeds: {slow: {v: 0.2}}} # optional named lookup tables (+ ``locations``)
    tools:
      - name: navigate_to
        description: ...
        requires_confirmation: false
        input: {type: object, properties: {...}, required: [...]}   # JSON Schema
        action: {type: nav2_msgs/action/NavigateToPose, server: navigate_to_pose, goal: {...}}
        # or service: {...} / topic: {...} / cancel: {}
"""

from __future__ import annotations

import copy
import importlib
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from sonic_voice.tools.mapping import (
    ValueSpec,
    field_class,
    parse_value_spec,
    resolve_field,
    set_path,
)

NAME_RE = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
KINDS = ("action", "service", "topic", "cancel")


class ToolConfigError(ValueError):
    """A tool configuration cannot be used; the message names file, tool and field."""


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


# ------------------------------------------------------------------------------ types
def load_interface(type_name: str, kind: str) -> Any:
    """``pkg/action/Name`` -> the generated class, with its type support checked."""
    parts = type_name.split("/")
    if len(parts) == 2:
        parts = [parts[0], {"action": "action", "service": "srv", "topic": "msg"}[kind], parts[1]]
    if len(parts) != 3 or not all(parts):
        raise ValueError(f"type {type_name!r} is not of the form package/{kind_dir(kind)}/Name")
    pkg, sub, name = parts
    if sub != kind_dir(kind):
        raise ValueError(f"type {type_name!r} is not a {kind} type (expected {pkg}/"
                         f"{kind_dir(kind)}/{name})")  # fmt: skip
    try:
        module = importlib.import_module(f"{pkg}.{sub}")
    except ImportError as e:
        raise ValueError(f"type {type_name!r}: package {pkg!r} is not installed ({e})") from e
    cls = getattr(module, name, None)
    if cls is None:
        raise ValueError(f"type {type_name!r}: {pkg}.{sub} has no {name!r}")
    from rclpy.type_support import check_for_type_support

    check_for_type_support(cls)
    return cls


def kind_dir(kind: str) -> str:
    return {"action": "action", "service": "srv", "topic": "msg"}[kind]


# ------------------------------------------------------------------------------ tools
@dataclass
class FeedbackSpec:
    fields: list[str] | None  # None = all
    every_s: float = 2.0
    speak: str = ""  # template with {field} placeholders; '' = never spoken
    speak_every_s: float = 10.0


@dataclass
class Binding:
    kind: str  # action | service | topic | cancel
    type_name: str = ""
    cls: Any = None
    name: str = ""  # server / service / topic name
    mapping: dict[str, ValueSpec] = field(default_factory=dict)
    returns: list[str] | None = None  # result/response fields; None = all
    ok_field: str = ""  # service: a bool response field that must be true
    feedback: FeedbackSpec | None = None
    rate_hz: float = 0.0  # topic: repeat at this rate ...
    duration: ValueSpec | None = None  # ... for this long (seconds)
    then: dict[str, ValueSpec] | None = None  # topic: message sent when done / cancelled
    qos_depth: int = 10


@dataclass
class ToolDef:
    name: str
    description: str
    schema: dict[str, Any]  # what the model sees (confirmed added, enums filled)
    binding: Binding
    timeout_s: float
    server_wait_s: float
    requires_confirmation: bool = False
    moves_robot: bool = True
    cancels_running: bool = False
    lookup_args: dict[str, str] = field(default_factory=dict)  # input arg -> table name
    validator: Any = None

    def spec(self) -> dict[str, Any]:
        from sonic_voice.sonic.events import tool_spec

        return tool_spec(self.name, self.description, self.schema)


@dataclass
class ToolConfig:
    path: Path
    tools: dict[str, ToolDef]
    allow: list[str] | None
    tables: dict[str, Any]


_TOOL_KEYS = {
    "name",
    "description",
    "input",
    "requires_confirmation",
    "moves_robot",
    "cancels_running",
    "timeout_s",
    "server_wait_s",
    *KINDS,
}


def load_tool_config(
    path: str | Path,
    locations: str | Path | dict[str, Any] | LocationTable | None = None,
) -> ToolConfig:
    """Read and check a tools YAML against the installed interface types (no node needed).

    Raises :class:`ToolConfigError` naming file, line, tool and field for any problem.
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
    unknown = set(raw) - _TOOL_KEYS - {"__line__"}
    if unknown:
        raise ToolConfigError(f"{where}: unknown key(s) {sorted(unknown)}")
    desc = raw.get("description")
    if not isinstance(desc, str) or not desc.strip():
        raise ToolConfigError(f"{where}: 'description' (what the model reads) is required")
    kinds = [k for k in KINDS if k in raw]
    if len(kinds) != 1:
        raise ToolConfigError(
            f"{where}: needs exactly one binding of action, service, topic or cancel "
            f"(found {kinds or 'none'})"
        )
    kind = kinds[0]
    schema, lookup_args = _input_schema(where, _strip_lines(raw.get("input")), tables)
    requires_conf = bool(raw.get("requires_confirmation", False))
    if requires_conf:
        schema["properties"]["confirmed"] = {
            "type": "boolean",
            "const": True,
            "description": "true only after the person said yes to doing this now.",
        }
        if "confirmed" not in schema["required"]:
            schema["required"].append("confirmed")
        desc = (
            desc.rstrip()
            + " Ask the person to confirm before calling this, then pass confirmed: true."
        )
    for arg, tname in lookup_args.items():
        t = tables[tname]
        if isinstance(t, LocationTable) and t.rows:
            desc = desc.rstrip() + f" Known {tname} for '{arg}': {t.describe()}."
    try:
        validator_cls = jsonschema.validators.validator_for(schema)
        validator_cls.check_schema(schema)
        validator = validator_cls(schema)
    except jsonschema.SchemaError as e:
        raise ToolConfigError(f"{where}: input is not a valid JSON Schema: {e.message}") from e
    props = schema.get("properties", {})
    try:
        binding = _load_binding(kind, _strip_lines(raw[kind]) or {}, props, tables)
    except (ValueError, TypeError, KeyError) as e:
        raise ToolConfigError(f"{where}: {kind}: {e}") from e
    moves_default = kind == "action" or (kind == "topic" and binding.duration is not None)
    timeout = raw.get("timeout_s", (raw.get(kind) or {}).get("timeout_s"))
    if timeout is None:
        timeout = defaults.get("timeout_s", 60.0)
    return ToolDef(
        name=name,
        description=desc,
        schema=schema,
        binding=binding,
        timeout_s=float(timeout),
        server_wait_s=float(raw.get("server_wait_s", defaults.get("server_wait_s", 2.0))),
        requires_confirmation=requires_conf,
        moves_robot=bool(raw.get("moves_robot", moves_default)),
        cancels_running=bool(raw.get("cancels_running", kind == "cancel")),
        lookup_args=lookup_args,
        validator=validator,
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


def _load_binding(
    kind: str, raw: dict[str, Any], props: dict[str, Any], tables: dict[str, Any]
) -> Binding:
    if kind == "cancel":
        if raw:
            raise ValueError(f"takes no settings (got {sorted(raw)})")
        return Binding(kind="cancel")
    allowed = {
        "action": {"type", "server", "goal", "result", "feedback", "timeout_s"},
        "service": {"type", "name", "request", "response", "ok_field", "timeout_s"},
        "topic": {"type", "name", "message", "rate_hz", "duration_s", "then", "qos_depth",
                  "timeout_s"},
    }[kind]  # fmt: skip
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} (allowed: {sorted(allowed)})")
    type_name = raw.get("type")
    if not isinstance(type_name, str):
        raise ValueError("'type' (e.g. pkg/action/Name) is required")
    cls = load_interface(type_name, kind)
    name_key = "server" if kind == "action" else "name"
    ros_name = raw.get(name_key)
    if not isinstance(ros_name, str) or not ros_name:
        raise ValueError(f"'{name_key}' is required")
    b = Binding(kind=kind, type_name=type_name, cls=cls, name=ros_name)
    if kind == "action":
        b.mapping = _mapping("goal", raw.get("goal"), cls.Goal, props, tables)
        b.returns = _field_list("result", raw.get("result"), cls.Result)
        fb = raw.get("feedback")
        if fb is not None:
            if isinstance(fb, list):
                fb = {"fields": fb}
            if not isinstance(fb, dict):
                raise ValueError("feedback must be a list of fields or a mapping")
            bad = set(fb) - {"fields", "every_s", "speak", "speak_every_s"}
            if bad:
                raise ValueError(f"feedback: unknown key(s) {sorted(bad)}")
            fields = _field_list("feedback.fields", fb.get("fields"), cls.Feedback)
            speak = str(fb.get("speak", ""))
            if speak:
                _check_template("feedback.speak", speak, cls.Feedback)
            b.feedback = FeedbackSpec(
                fields=fields,
                every_s=float(fb.get("every_s", 2.0)),
                speak=speak,
                speak_every_s=float(fb.get("speak_every_s", 10.0)),
            )
    elif kind == "service":
        b.mapping = _mapping("request", raw.get("request"), cls.Request, props, tables)
        b.returns = _field_list("response", raw.get("response"), cls.Response)
        ok = raw.get("ok_field", "")
        if ok:
            ftype = resolve_field(cls.Response, ok)
            if ftype != "boolean":
                raise ValueError(f"ok_field {ok!r} must be a boolean field (it is {ftype})")
            b.ok_field = ok
    else:
        b.mapping = _mapping("message", raw.get("message"), cls, props, tables)
        b.rate_hz = float(raw.get("rate_hz", 0.0))
        if "duration_s" in raw:
            b.duration = parse_value_spec("duration_s", raw["duration_s"], props, tables)
            if b.rate_hz <= 0:
                b.rate_hz = 10.0
        if "then" in raw:
            b.then = _mapping("then", raw.get("then"), cls, props, tables)
        b.qos_depth = int(raw.get("qos_depth", 10))
    return b


def _mapping(
    what: str, raw: Any, cls: Any, props: dict[str, Any], tables: dict[str, Any]
) -> dict[str, ValueSpec]:
    """Check every ``field.path: value`` against the type; constants are test-assigned."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ValueError(f"{what} must map field paths to values")
    out: dict[str, ValueSpec] = {}
    probe = cls()
    for fpath, spec in raw.items():
        try:
            ftype = resolve_field(cls, fpath)
        except KeyError as e:
            raise ValueError(f"{what}.{fpath}: {e.args[0]}") from e
        vs = parse_value_spec(f"{what}.{fpath}", spec, props, tables)
        vs.check_fits(f"{what}.{fpath}", ftype, field_class(cls, fpath), probe, fpath, tables)
        if vs.is_constant():
            try:
                set_path(probe, fpath, vs.constant_value())
            except (TypeError, ValueError, AssertionError, AttributeError) as e:
                raise ValueError(
                    f"{what}.{fpath}: {vs.constant_value()!r} does not fit {ftype} ({e})"
                ) from e
        out[fpath] = vs
    return out


def _field_list(what: str, raw: Any, cls: Any) -> list[str] | None:
    if raw is None or raw == "all":
        return None
    if isinstance(raw, str):
        raw = [raw]
    if not isinstance(raw, list):
        raise ValueError(f"{what} must be a list of field names or 'all'")
    for f in raw:
        try:
            resolve_field(cls, f)
        except KeyError as e:
            raise ValueError(f"{what}: {e.args[0]}") from e
    return [str(f) for f in raw]


def _check_template(what: str, template: str, cls: Any) -> None:
    import string

    for _, fname, _, _ in string.Formatter().parse(template):
        if fname:
            try:
                resolve_field(cls, fname)
            except KeyError as e:
                raise ValueError(f"{what}: {e.args[0]}") from e
