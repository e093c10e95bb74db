"""Field mappings: tool input -> ROS message fields, and ROS messages -> plain JSON.

A mapping is ``{field.path: value}`` where a value is a constant, or one of::

    {input: arg, default: 0, scale: 1.0, offset: 0.0, map: {left: 0.5, right: -0.5}}
    {lookup: locations, key: arg, field: pose_stamped}   # a row (or a column) of a table
    {now: true}                                          # builtin_interfaces/Time, node clock
    {const: {...}}                                       # a constant that looks like a spec

Field types come from the generated classes (``get_fields_and_field_types``), so paths and
kinds are checked at start-up; values are coerced (int -> float for float fields) and the
generated setters check ranges at call time.
"""

from __future__ import annotations

import array
import copy
import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

SPEC_KEYS = {"input", "lookup", "now", "const"}
OPTION_KEYS = {"default", "scale", "offset", "map", "key", "field", "abs"}
FLOAT_TYPES = {"float", "double"}
INT_TYPES = {"int8", "uint8", "int16", "uint16", "int32", "uint32", "int64", "uint64",
             "byte", "octet", "char"}  # fmt: skip


class MappingError(ValueError):
    """An input value cannot become the message field it is mapped to (e.g. unknown key)."""


# ------------------------------------------------------------------------------ types
def message_class(type_str: str) -> Any | None:
    """``geometry_msgs/Pose`` -> the class; None for primitive type strings."""
    if "/" not in type_str or type_str.startswith(("sequence<", "string<")) or "[" in type_str:
        return None
    pkg, name = type_str.split("/", 1)
    return getattr(importlib.import_module(f"{pkg}.msg"), name.split("/")[-1])


def _fields(cls: Any) -> dict[str, str]:
    return cls.get_fields_and_field_types()


def resolve_field(cls: Any, path: str) -> str:
    """The type string of ``path`` in ``cls``; KeyError naming the missing part."""
    cur = cls
    parts = path.split(".")
    for i, part in enumerate(parts):
        fields = _fields(cur)
        if part not in fields:
            where = ".".join(parts[:i]) or cls.__name__
            raise KeyError(f"{where} has no field {part!r} (fields: {', '.join(fields) or 'none'})")
        ftype = fields[part]
        if i == len(parts) - 1:
            return ftype
        nxt = message_class(ftype)
        if nxt is None:
            raise KeyError(f"{'.'.join(parts[: i + 1])} is {ftype}, which has no fields")
        cur = nxt
    return ""


def field_class(cls: Any, path: str) -> Any | None:
    return message_class(resolve_field(cls, path))


def _base(ftype: str) -> str:
    return ftype.split("<")[0] if ftype.startswith("string<") else ftype


def coerce(value: Any, ftype: str, current: Any) -> Any:
    """Make a JSON-ish value fit a field (the generated setter does the final check)."""
    t = _base(ftype)
    if t in FLOAT_TYPES and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if t in INT_TYPES and isinstance(value, float) and value.is_integer():
        return int(value)
    cls = message_class(ftype)
    if cls is not None:
        if isinstance(value, dict):
            msg = copy.deepcopy(current) if current is not None else cls()
            fill(msg, value)
            return msg
        return value
    if ftype.startswith("sequence<") or ftype.endswith("]"):
        inner = (
            ftype[len("sequence<") : -1]
            if ftype.startswith("sequence<")
            else ftype[: ftype.index("[")]
        )
        inner = inner.split(",")[0]
        icls = message_class(inner)
        if isinstance(value, list):
            return [coerce(v, inner, icls() if icls else None) for v in value]
    return value


_INT_RANGES = {
    "int8": (-(2**7), 2**7), "uint8": (0, 2**8), "byte": (0, 2**8), "octet": (0, 2**8),
    "char": (0, 2**8), "int16": (-(2**15), 2**15), "uint16": (0, 2**16),
    "int32": (-(2**31), 2**31), "uint32": (0, 2**32), "int64": (-(2**63), 2**63),
    "uint64": (0, 2**64),
}  # fmt: skip


def check_value(value: Any, ftype: str) -> None:
    """Raise TypeError/ValueError when ``value`` cannot be ``ftype``.

    The generated setters only check with ROS_PYTHON_CHECK_FIELDS=1 (off by default in
    Kilted), and a bad value would otherwise fail late, at serialization, inside rclpy.
    """
    t = _base(ftype)
    if t in FLOAT_TYPES:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{value!r} is not a number")
    elif t in _INT_RANGES:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{value!r} is not an integer")
        lo, hi = _INT_RANGES[t]
        if not lo <= value < hi:
            raise ValueError(f"{value!r} is out of range for {t}")
    elif t == "boolean":
        if not isinstance(value, bool):
            raise TypeError(f"{value!r} is not true/false")
    elif t in ("string", "wstring"):
        if not isinstance(value, str):
            raise TypeError(f"{value!r} is not a string")
        if ftype.startswith("string<=") and len(value) > int(ftype[len("string<=") :]):
            raise ValueError(f"{value!r} is longer than {ftype}")
    elif ftype.startswith("sequence<") or ftype.endswith("]"):
        if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__iter__"):
            raise TypeError(f"{value!r} is not a list")
        inner = (
            ftype[len("sequence<") : -1]
            if ftype.startswith("sequence<")
            else ftype[: ftype.index("[")]
        )
        inner = inner.split(",")[0]
        for v in value:
            check_value(v, inner)
    else:
        cls = message_class(ftype)
        if cls is not None and not isinstance(value, cls):
            raise TypeError(f"{value!r} is not a {ftype} (give a mapping of its fields)")


def fill(msg: Any, values: dict[str, Any]) -> None:
    """Set nested fields of ``msg`` from a (nested) dict."""
    fields = _fields(type(msg))
    for k, v in values.items():
        if k not in fields:
            raise MappingError(f"{type(msg).__name__} has no field {k!r}")
        value = coerce(v, fields[k], getattr(msg, k))
        check_value(value, fields[k])
        setattr(msg, k, value)


def set_path(msg: Any, path: str, value: Any) -> None:
    parts = path.split(".")
    target = msg
    for p in parts[:-1]:
        target = getattr(target, p)
    ftype = _fields(type(target))[parts[-1]]
    value = coerce(value, ftype, getattr(target, parts[-1]))
    check_value(value, ftype)
    setattr(target, parts[-1], value)


# ------------------------------------------------------------------------------ to JSON
def to_jsonable(value: Any) -> Any:
    """A ROS message / field value -> plain JSON types."""
    if hasattr(value, "get_fields_and_field_types"):
        return {k: to_jsonable(getattr(value, k)) for k in value.get_fields_and_field_types()}
    if isinstance(value, (bytes, bytearray)):
        return list(value)
    if isinstance(value, array.array):
        return value.tolist()
    if hasattr(value, "tolist"):  # numpy arrays and scalars
        return value.tolist()
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value


def get_path(msg: Any, path: str) -> Any:
    for p in path.split("."):
        msg = getattr(msg, p)
    return msg


def extract(msg: Any, fields: list[str] | None) -> dict[str, Any]:
    """The chosen fields (dotted paths, None = all) of a message as JSON."""
    if fields is None:
        return to_jsonable(msg)
    return {f: to_jsonable(get_path(msg, f)) for f in fields}


# ------------------------------------------------------------------------------ values
@dataclass
class ValueSpec:
    """How one field's value is made from the tool input."""

    kind: str  # const | input | lookup | now
    const: Any = None
    arg: str = ""
    table: str = ""
    column: str = ""  # dotted path inside a table row ('' = the whole row)
    default: Any = None
    has_default: bool = False
    scale: float | None = None
    offset: float | None = None
    mapping: dict[str, Any] | None = None
    absolute: bool = False
    where: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def is_constant(self) -> bool:
        return self.kind == "const"

    def constant_value(self) -> Any:
        return copy.deepcopy(self.const)

    # -------------------------------------------------------------- evaluation
    def evaluate(
        self, inp: dict[str, Any], tables: dict[str, Any], now: Callable[[], Any] | None
    ) -> Any:
        if self.kind == "const":
            return copy.deepcopy(self.const)
        if self.kind == "now":
            return now() if now is not None else None
        if self.kind == "input":
            if self.arg in inp:
                v = inp[self.arg]
            elif self.has_default:
                v = copy.deepcopy(self.default)
            else:
                raise MappingError(f"argument {self.arg!r} is missing")
            return self._post(v)
        key = inp.get(self.arg)
        row = lookup_row(tables[self.table], key)
        if row is None:
            known = ", ".join(table_names(tables[self.table]))
            raise MappingError(f"unknown {self.table} entry {key!r}; known: {known}")
        v = row
        if self.column:
            for p in self.column.split("."):
                v = v[p]
        return self._post(copy.deepcopy(v))

    def _post(self, v: Any) -> Any:
        if self.mapping is not None:
            if v not in self.mapping:
                raise MappingError(f"{self.arg}: {v!r} is not one of {list(self.mapping)}")
            v = copy.deepcopy(self.mapping[v])
        if self.scale is not None or self.offset is not None or self.absolute:
            if not isinstance(v, (int, float)) or isinstance(v, bool):
                raise MappingError(f"{self.arg}: {v!r} is not a number")
            v = v * (self.scale if self.scale is not None else 1.0) + (self.offset or 0.0)
            if self.absolute:
                v = abs(v)
        return v

    # -------------------------------------------------------------- start-up checks
    def check_fits(
        self,
        where: str,
        ftype: str,
        fcls: Any,
        probe: Any,
        fpath: str,
        tables: dict[str, Any],
    ) -> None:
        """Raise ValueError when this value can never fit the field of type ``ftype``."""
        t = _base(ftype)
        if self.kind == "now":
            if ftype != "builtin_interfaces/Time":
                raise ValueError(
                    f"{where}: 'now' needs a builtin_interfaces/Time field, not {ftype}"
                )
            return
        if self.kind == "const":
            return
        samples: list[Any] = []
        if self.kind == "lookup":
            rows = table_rows(tables[self.table])
            for name, row in rows.items():
                v: Any = row
                for p in self.column.split(".") if self.column else []:
                    if not isinstance(v, dict) or p not in v:
                        raise ValueError(
                            f"{where}: {self.table} entry {name!r} has no {self.column!r}"
                        )
                    v = v[p]
                samples.append(self._post(copy.deepcopy(v)))
        elif self.mapping is not None:
            samples = [self._post(k) for k in self.mapping]
        elif self.has_default:
            samples = [self._post(copy.deepcopy(self.default))]
        if self.kind == "input" and self.mapping is None:
            jtype = self.extra.get("json_type")
            want = (
                {"number", "integer"} if t in FLOAT_TYPES else {"integer"} if t in INT_TYPES
                else {"boolean"} if t == "boolean" else {"string"} if t in ("string", "wstring")
                else {"object"} if fcls is not None else {"array"}
            )  # fmt: skip
            if self.scale is not None or self.offset is not None:
                want = {"number", "integer"} if (t in FLOAT_TYPES | INT_TYPES) else set()
            if jtype and jtype not in want:
                raise ValueError(
                    f"{where}: input {self.arg!r} is {jtype}, which does not fit {ftype}"
                )
        for s in samples:
            test = copy.deepcopy(probe)
            try:
                set_path(test, fpath, s)
            except Exception as e:
                raise ValueError(f"{where}: value {s!r} does not fit {ftype} ({e})") from e


def table_rows(table: Any) -> dict[str, Any]:
    return table.rows if hasattr(table, "rows") else table


def table_names(table: Any) -> list[str]:
    return list(table_rows(table))


def lookup_row(table: Any, key: Any) -> Any:
    if hasattr(table, "row"):
        return table.row(key)
    return table.get(key) if isinstance(key, str) else None


def parse_value_spec(
    where: str, raw: Any, props: dict[str, Any], tables: dict[str, Any]
) -> ValueSpec:
    """One mapping value -> :class:`ValueSpec`; unknown args/tables are start-up errors."""
    if not isinstance(raw, dict) or not (set(raw) & SPEC_KEYS):
        return ValueSpec(kind="const", const=raw, where=where)
    kinds = set(raw) & SPEC_KEYS
    if len(kinds) != 1:
        raise ValueError(f"{where}: use one of {sorted(SPEC_KEYS)}, not {sorted(kinds)}")
    kind = kinds.pop()
    bad = set(raw) - SPEC_KEYS - OPTION_KEYS
    if bad:
        raise ValueError(f"{where}: unknown key(s) {sorted(bad)}")
    if kind == "const":
        return ValueSpec(kind="const", const=raw["const"], where=where)
    if kind == "now":
        return ValueSpec(kind="now", where=where)
    vs = ValueSpec(kind=kind, where=where)
    vs.scale = float(raw["scale"]) if "scale" in raw else None
    vs.offset = float(raw["offset"]) if "offset" in raw else None
    vs.absolute = bool(raw.get("abs", False))
    if "map" in raw:
        if not isinstance(raw["map"], dict):
            raise ValueError(f"{where}: map must be a mapping")
        vs.mapping = dict(raw["map"])
    if "default" in raw:
        vs.default, vs.has_default = raw["default"], True
    if kind == "input":
        vs.arg = str(raw["input"])
    else:
        vs.table = str(raw["lookup"])
        if vs.table not in tables:
            raise ValueError(f"{where}: unknown table {vs.table!r} (known: {sorted(tables)})")
        if not table_rows(tables[vs.table]):
            raise ValueError(
                f"{where}: table {vs.table!r} is empty"
                + (" (no locations file given?)" if vs.table == "locations" else "")
            )
        if "key" not in raw:
            raise ValueError(f"{where}: lookup needs 'key' (the input argument to look up)")
        vs.arg = str(raw["key"])
        vs.column = str(raw.get("field", ""))
    if vs.arg not in props:
        raise ValueError(
            f"{where}: input argument {vs.arg!r} is not in the input schema "
            f"(properties: {', '.join(props) or 'none'})"
        )
    vs.extra["json_type"] = props[vs.arg].get("type") if kind == "input" else None
    return vs
