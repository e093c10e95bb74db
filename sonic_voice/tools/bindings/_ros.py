"""Everything the ROS kinds need from ROS, behind one object: :class:`RosPort`.

The bindings create their clients on ``port.node`` and wait on rclpy futures through the
port (``relay`` / ``wait``); nothing else of theirs knows how rclpy and the asyncio loop
meet. :func:`make_ros_port` is the one place that builds it, so the process-wide
rclpy<->asyncio bridge can replace the implementation without touching a binding.

The clients live on the session node itself, spun by the process's one executor
(docs/architecture.md): no hidden helper node, no thread of its own. An rclpy done-callback
runs inline on the executor thread (the action client's futures are not stamped with the
executor: ``ros/compat.py``) and hands the outcome to the loop with one
``call_soon_threadsafe`` that both completes the asyncio future and wakes the waiting call
(see :meth:`RosPort.relay`).

Also here: interface loading and the ``{field.path: value}`` message mappings the action,
service, topic and read kinds share.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import string
from collections.abc import Callable
from typing import Any

from rclpy.node import Node

from sonic_voice.ros.compat import LoopActionClient
from sonic_voice.tools.mapping import (
    MappingError,
    ValueSpec,
    field_class,
    parse_value_spec,
    resolve_field,
    set_path,
    to_jsonable,
)

log = logging.getLogger(__name__)

JOIN_S = 5.0
SERVER_POLL_S = 0.02  # only while a server is not (yet) discovered; rclpy has no event for it


# ------------------------------------------------------------------------------ the port
class RosPort:
    """The node the ROS bindings make clients on, its clock, and rclpy futures on the loop.

    ``relay``/``wait`` may be called from the loop; the done-callbacks they install run on
    whatever thread completes the rclpy future and cross to the loop once.
    """

    def __init__(self, parent: Node) -> None:
        self.parent = parent
        self.node: Node = parent
        self._made: list[Any] = []  # action clients made for the tools, destroyed on close

    def now_msg(self) -> Any:
        """builtin_interfaces/Time from the node's clock (sim time if it uses it)."""
        return self.parent.get_clock().now().to_msg()

    def start(self) -> None:
        """Nothing to start: the process's executor spins the node."""

    def close(self) -> None:
        """Destroy the action clients the tools made (a node's own destroy leaves them)."""
        for w in self._made:
            try:
                self.node.remove_waitable(w)
                w.destroy()
            except Exception as e:  # noqa: BLE001 - the node may be gone already
                log.debug("destroying %s: %s", w, e)
        self._made.clear()

    @staticmethod
    def settle(
        loop: asyncio.AbstractEventLoop,
        afut: asyncio.Future,
        value: Any = None,
        exc: BaseException | None = None,
        wake: Callable[[], None] | None = None,
    ) -> None:
        """From any thread: complete ``afut`` on ``loop`` and run ``wake`` in the same
        callback, so the waiting coroutine resumes on the loop's next iteration (each extra
        iteration is one more select() that gives the GIL away and must win it back)."""

        def settle() -> None:
            if not afut.done():
                if isinstance(exc, asyncio.CancelledError):
                    afut.cancel()
                elif exc is not None:
                    afut.set_exception(exc)
                else:
                    afut.set_result(value)
            if wake is not None:
                wake()

        try:
            loop.call_soon_threadsafe(settle)
        except RuntimeError:  # loop closed: nobody waits any more
            pass

    def relay(
        self,
        loop: asyncio.AbstractEventLoop,
        afut: asyncio.Future,
        wake: Callable[[], None] | None = None,
        mark: Callable[[], None] | None = None,
    ) -> Callable[[Any], None]:
        """An rclpy done-callback handing the outcome to ``afut`` on ``loop``."""

        def done(rfut: Any) -> None:
            if mark is not None:
                mark()
            if rfut.cancelled():
                self.settle(loop, afut, exc=asyncio.CancelledError(), wake=wake)
            elif rfut.exception() is not None:
                self.settle(loop, afut, exc=rfut.exception(), wake=wake)
            else:
                self.settle(loop, afut, rfut.result(), wake=wake)

        return done

    def future(self, rfut: Any, wake: Callable[[], None] | None = None) -> asyncio.Future:
        """An asyncio future (on the running loop) completed by the rclpy future."""
        loop = asyncio.get_running_loop()
        afut: asyncio.Future = loop.create_future()
        rfut.add_done_callback(self.relay(loop, afut, wake))
        return afut

    async def wait(self, rfut: Any) -> Any:
        """Await an rclpy future on the loop (never ``.result()`` in a callback)."""
        return await self.future(rfut)

    def call_soon(
        self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any
    ) -> None:
        """From a ROS callback: run ``fn(*args)`` on ``loop``."""
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:
            pass


def make_ros_port(parent: Node) -> RosPort:
    """The one place the tools' ROS port is built (swap the implementation here)."""
    return RosPort(parent)


async def wait_ready(call: Any, ready: Callable[[], bool]) -> bool:
    """Wait up to the tool's ``server_wait_s`` for a server to be discovered."""
    if ready():
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + call.tool.server_wait_s
    while loop.time() < deadline:
        await asyncio.sleep(SERVER_POLL_S)
        if ready():
            return True
    return False


def action_client(port: RosPort, cls: Any, name: str) -> LoopActionClient:
    """An action client goals can be sent to from the loop (``ros/compat.py`` item 2)."""
    client = LoopActionClient(port.node, cls, name)
    port._made.append(client)
    return client


# ------------------------------------------------------------------------------ types
def kind_dir(kind: str) -> str:
    return {"action": "action", "service": "srv", "topic": "msg"}[kind]


def load_interface(type_name: str, kind: str) -> Any:
    """``pkg/action/Name`` -> the generated class, with its type support checked."""
    parts = type_name.split("/")
    if len(parts) == 2:
        parts = [parts[0], kind_dir(kind), parts[1]]
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


def type_and_name(raw: dict[str, Any], kind: str, name_key: str) -> tuple[str, Any, str]:
    type_name = raw.get("type")
    if not isinstance(type_name, str):
        raise ValueError("'type' (e.g. pkg/action/Name) is required")
    cls = load_interface(type_name, kind)
    ros_name = raw.get(name_key)
    if not isinstance(ros_name, str) or not ros_name:
        raise ValueError(f"'{name_key}' is required")
    return type_name, cls, ros_name


def unknown_keys(raw: dict[str, Any], allowed: frozenset[str]) -> None:
    unknown = set(raw) - allowed
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} (allowed: {sorted(allowed)})")


def mapping(
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


def field_list(what: str, raw: Any, cls: Any) -> list[str] | None:
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


def check_template(what: str, template: str, cls: Any) -> None:
    """Every ``{field}`` of a spoken template names a top-level field of ``cls``."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from e
    for _, fname, _, _ in parsed:
        if fname:
            try:
                resolve_field(cls, fname.split(".")[0].split("[")[0])
            except KeyError as e:
                raise ValueError(f"{what}: {e.args[0]}") from e


def fmt_value(v: Any) -> Any:
    """Arrays as lists in spoken templates; messages stay objects ({pose.position.x})."""
    if hasattr(v, "get_fields_and_field_types") or isinstance(v, (int, float, str)):
        return v
    return to_jsonable(v)


def render(template: str, msg: Any) -> str:
    """A spoken template filled from a message's fields ('' if it cannot be)."""
    try:
        names = type(msg).get_fields_and_field_types()
        return template.format(**{k: fmt_value(getattr(msg, k)) for k in names})
    except (ValueError, KeyError, AttributeError, IndexError, TypeError) as e:
        log.warning("template %r: %s", template, e)
        return ""


def build(
    port: RosPort, cls: Any, spec: dict[str, ValueSpec], args: dict[str, Any], tables: dict
) -> Any:
    """A message of ``cls`` from the tool input (MappingError names the field)."""
    msg = cls()
    for fpath, vs in spec.items():
        value = vs.evaluate(args, tables, port.now_msg)
        try:
            set_path(msg, fpath, value)
        except (TypeError, ValueError, AssertionError, AttributeError) as e:
            raise MappingError(f"{fpath}: {value!r} does not fit ({e})") from e
    return msg
