"""The lifecycle node base class of sonic_voice (docs/architecture.md, "Nodes").

A node says *what* each transition does; it never drives its own lifecycle (the runner,
the node executables' entry point and the launch files do, as nav2's lifecycle manager
does). Its parameters are declared once, from a typed dataclass::

    @dataclass
    class Params:
        gain: float = param(1.0, "Speaker gain.", range=(0.0, 8.0), live=True)
        device: str = param("", "Speaker name; '' = default.")

    class Speaker(VoiceNode):
        Params = Params
        def configure(self) -> None: ...     # raise ConfigError("what to fix")
        def activate(self) -> None: ...      # never blocks: loop work via self.bridge
        async def stop(self) -> None: ...    # the one teardown, on the loop, bounded

Each field becomes a ROS parameter with a ``ParameterDescriptor`` (description, range,
choices, read-only unless ``live``); a set-parameters callback rejects changes to the
others and to values outside ``choices``. ``self.params`` is the typed, current value.

Teardown lives in one place, :meth:`VoiceNode.stop` (async, on the process's loop):
deactivate, cleanup, shutdown and the process's signal handling all end up there, once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar

from rcl_interfaces.msg import (
    FloatingPointRange,
    IntegerRange,
    ParameterDescriptor,
    SetParametersResult,
)
from rclpy.exceptions import ParameterUninitializedException
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.parameter import Parameter

from sonic_voice.ros.bridge import Bridge
from sonic_voice.ros.compat import log_at


class ConfigError(ValueError):
    """A configuration that cannot work; the message says what to fix (one line)."""


def param(
    default: Any,
    description: str,
    *,
    range: tuple[float, float] | None = None,
    choices: tuple[str, ...] | None = None,
    live: bool = False,
) -> Any:
    """A dataclass field that is also a ROS parameter (see the module docstring)."""
    meta = {"description": description, "range": range, "choices": choices, "live": live}
    if isinstance(default, list):
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def descriptor_of(f: dataclasses.Field) -> ParameterDescriptor:
    m = f.metadata
    text = m.get("description", "")
    choices = m.get("choices")
    d = ParameterDescriptor(
        description=text,
        read_only=False,  # enforced by the set-callback, so overrides and params files apply
        additional_constraints="|".join(repr(c) if c == "" else c for c in choices)
        if choices
        else ("" if m.get("live") else "set at start-up only"),
    )
    rng = m.get("range")
    if rng is not None:
        if isinstance(f.default, bool):
            pass
        elif isinstance(f.default, int):
            d.integer_range = [IntegerRange(from_value=int(rng[0]), to_value=int(rng[1]), step=0)]
        else:
            d.floating_point_range = [
                FloatingPointRange(from_value=float(rng[0]), to_value=float(rng[1]), step=0.0)
            ]
    return d


def params_fields(cls: type) -> list[dataclasses.Field]:
    return [f for f in dataclasses.fields(cls) if "description" in f.metadata]


class VoiceNode(LifecycleNode):
    """Lifecycle node with typed parameters, a loop-side teardown and no self-activation."""

    Params: ClassVar[type]
    # When the process stops, nodes stop in groups by this number, lowest first: the
    # conversation (0) cancels its goals while the robot's servers (2) still answer.
    stop_order: ClassVar[int] = 1

    def __init__(self, node_name: str, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        self.bridge = Bridge.get()
        self._fields = {f.name: f for f in params_fields(self.Params)}
        self.declare_parameter(
            "autostart",
            True,
            ParameterDescriptor(
                description="Configure and activate when started alone (ros2 run); a launch "
                "file or the runner that drives the transitions sets it false or ignores it."
            ),
        )
        for f in self._fields.values():
            if f.default is dataclasses.MISSING:
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = f.default
            if default == []:  # an empty list has no ROS type of its own: string arrays here
                default = Parameter.Type.STRING_ARRAY
            self.declare_parameter(f.name, default, descriptor_of(f))
        self.params = self._read_params()
        self.add_on_set_parameters_callback(self._on_set_parameters)
        self.config_error = ""
        self.fatal_error: str | None = None
        self._stopping: concurrent.futures.Future | None = None
        self._stopped = False

    # ------------------------------------------------------------------ parameters
    def _read_params(self) -> Any:
        values = {}
        for name in self._fields:
            try:
                values[name] = self.get_parameter(name).value
            except ParameterUninitializedException:  # a string array declared empty
                values[name] = []
        for name, f in self._fields.items():
            choices = f.metadata.get("choices")
            if choices and values[name] not in choices:
                raise ConfigError(
                    f"parameter {name}={values[name]!r}: must be one of "
                    + ", ".join(repr(c) for c in choices)
                )
        return self.Params(**values)

    def _on_set_parameters(self, params: list[Any]) -> SetParametersResult:
        for p in params:
            f = self._fields.get(p.name)
            if f is None:
                continue
            if not f.metadata.get("live"):
                return SetParametersResult(
                    successful=False,
                    reason=f"{p.name} is read at start-up only; set it in the params file",
                )
            choices = f.metadata.get("choices")
            if choices and p.value not in choices:
                return SetParametersResult(
                    successful=False, reason=f"{p.name} must be one of {list(choices)}"
                )
        for p in params:
            if p.name in self._fields:
                self.params = dataclasses.replace(self.params, **{p.name: p.value})
                self.on_param_changed(p.name, p.value)
        return SetParametersResult(successful=True)

    def on_param_changed(self, name: str, value: Any) -> None:
        """A live parameter changed (``self.params`` already holds it)."""

    # ------------------------------------------------------------------ what nodes define
    def configure(self) -> None:
        """Check settings, make ROS entities; raise :class:`ConfigError` to fail."""

    def activate(self) -> None:
        """Start working; must not block (schedule loop work with ``self.bridge``)."""

    def deactivate(self) -> None:
        """Stop working without blocking (default: :meth:`stop` on the loop)."""
        self.bridge.submit(self.stop())

    async def stop(self) -> None:
        """The one teardown (on the loop; idempotent; bounded by the caller's budget)."""

    def on_config_failed(self) -> None:
        """Configuration failed (``self.config_error`` says why): e.g. publish it."""

    def release(self) -> None:
        """Free ROS entities (executor thread or after spinning; after :meth:`stop`)."""

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        try:
            self.params = self._read_params()
            self.configure()
        except ConfigError as e:
            self.config_error = str(e)
            self.get_logger().error(str(e))
            self.on_config_failed()
            return TransitionCallbackReturn.FAILURE
        self.config_error = ""
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.fatal_error = None
        self._stopped = False
        self._stopping = None
        self.activate()
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.deactivate()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.begin_stop()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.begin_stop()
        return TransitionCallbackReturn.SUCCESS

    def on_error(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.begin_stop()
        return TransitionCallbackReturn.SUCCESS

    # ------------------------------------------------------------------ teardown
    def begin_stop(self) -> concurrent.futures.Future:
        """Schedule :meth:`stop` once on the loop; the future says when it is done."""
        if self._stopping is None:
            self._stopping = asyncio.run_coroutine_threadsafe(self._stop_once(), self.bridge.loop)
        return self._stopping

    async def _stop_once(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        try:
            await self.stop()
        except Exception as e:  # noqa: BLE001 - teardown goes on; say what failed
            self.get_logger().warning(f"stopping: {e!r}")

    def shutdown_resources(self, timeout: float = 5.0) -> None:
        """Stop now and wait (for tests and scripts: blocks the calling thread, so never
        call it from a callback; the process runtime uses :meth:`begin_stop`)."""
        with contextlib.suppress(Exception):
            self.begin_stop().result(timeout)

    # ------------------------------------------------------------------ helpers
    def log(self, level: str, message: str) -> None:
        """Log at a severity chosen at run time (see ``compat.log_at``)."""
        log_at(self.get_logger(), level, message)

    def fail(self, message: str) -> None:
        """A fatal error after activation: say it once, remember it (state, diagnostics)."""
        self.fatal_error = message
        self.get_logger().error(message)


def bring_up(node: VoiceNode) -> bool:
    """Configure and activate ``node`` (the runner and the entry point are its manager)."""
    if node.trigger_configure() != TransitionCallbackReturn.SUCCESS:
        return False
    return node.trigger_activate() == TransitionCallbackReturn.SUCCESS


Factory = Callable[..., VoiceNode]
