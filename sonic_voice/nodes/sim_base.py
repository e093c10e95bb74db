"""sim_base: a simulated mobile base that serves Nav2's ``NavigateToPose`` action.

It stands in for a robot's navigation stack in the offline demo and in tests, so the
tools layer sends the same goal type (``nav2_msgs/action/NavigateToPose``, action
``navigate_to_pose``) it sends to Nav2 on a robot, and sees the same feedback and result.
It is a kinematic unicycle: it turns toward the goal, drives there at ``linear_speed``,
then turns to the goal's heading (skipped when the goal orientation is the zero
quaternion, i.e. "any heading"). No obstacles, no map; ``map`` and ``odom`` coincide.

Lifecycle (driven from outside: ``ros2 run`` with ``autostart``, the runner, or a launch
file's ``LifecycleNode`` transitions):

- configure: read parameters, create the odometry publisher, the ``cmd_vel``
  subscription, the action server and the diagnostics;
- activate: start the simulation timer (``rate_hz``); goals are accepted;
- deactivate: stop the base; a running goal is aborted; new goals are rejected;
- cleanup / shutdown / SIGINT: a running goal is aborted and the base stopped.

Topics: publishes ``odom`` (``nav_msgs/Odometry``, every tick, ``odom_frame`` ->
``base_frame``) and ``/diagnostics``; subscribes ``cmd_vel`` (``geometry_msgs/Twist``;
drives the base while no goal runs, stops after ``cmd_vel_timeout_s`` without a message).

Action ``navigate_to_pose``: feedback every tick (``current_pose``,
``distance_remaining``, ``navigation_time``, ``estimated_time_remaining``); result on
arrival within ``goal_tolerance`` (and ``yaw_tolerance``); cancel stops the base at once.
A new goal preempts the running one (which is aborted), as in Nav2.

Failure injection for tests and demos: goals farther than ``max_goal_distance`` are
rejected; goals within ``fail_radius`` of an entry of ``fail_on`` (a location name from
``locations_file``, or ``"x,y"``) are aborted half way with ``error_msg`` "path blocked".
"""

from __future__ import annotations

import asyncio
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from builtin_interfaces.msg import Duration
from geometry_msgs.msg import PoseStamped, Quaternion, Twist
from nav_msgs.msg import Odometry
from rclpy.action import ActionServer, CancelResponse, GoalResponse
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup, ReentrantCallbackGroup
from rclpy.task import Future

from sonic_voice.nodes.diagnostics import ERROR, OK, WARN, Diagnostics, DiagStatus
from sonic_voice.ros.node import ConfigError, VoiceNode, param
from sonic_voice.ros.runtime import run_node
from sonic_voice.ros.topics import EVENT_QOS

# Nav2's result codes (nav2_msgs/action/NavigateToPose), used when the type lacks them.
_UNKNOWN = 9000
# Drive only while the heading error is below this; turn in place otherwise.
_HEADING_GATE = 0.35


def _nav_type() -> Any:
    try:
        from nav2_msgs.action import NavigateToPose
    except ImportError as e:
        raise RuntimeError(
            "nav2_msgs is not installed: on a robot `apt install ros-$ROS_DISTRO-nav2-msgs`; "
            "in the venv run `bash scripts/build_interfaces.sh` (builds the fixture)"
        ) from e
    return NavigateToPose


def wrap_angle(a: float) -> float:
    """An angle in (-pi, pi]."""
    return math.atan2(math.sin(a), math.cos(a))


def yaw_to_quaternion(yaw: float) -> Quaternion:
    return Quaternion(x=0.0, y=0.0, z=math.sin(yaw / 2), w=math.cos(yaw / 2))


def quaternion_to_yaw(q: Quaternion) -> float | None:
    """Yaw of ``q``; None for the zero quaternion (no heading asked for)."""
    norm = math.sqrt(q.x * q.x + q.y * q.y + q.z * q.z + q.w * q.w)
    if norm < 1e-9:
        return None
    x, y, z, w = q.x / norm, q.y / norm, q.z / norm, q.w / norm
    return math.atan2(2 * (w * z + x * y), 1 - 2 * (y * y + z * z))


def _duration(seconds: float) -> Duration:
    seconds = max(0.0, seconds)
    sec = int(seconds)
    return Duration(sec=sec, nanosec=int((seconds - sec) * 1e9))


def load_location_points(path: str) -> dict[str, tuple[float, float]]:
    """Named places from a locations YAML: ``{name: {x, y, ...}}`` under an optional
    ``locations:`` key (config/locations.yaml), or a list of ``{name, x, y}``; ``aliases``
    name the same place; ``pose``/``position`` nesting is followed. Keys are lower case.
    Only the position matters to the failure rule."""
    doc = yaml.safe_load(Path(path).read_text()) or {}
    if isinstance(doc, dict) and "locations" in doc:
        doc = doc["locations"]
    items: list[tuple[str, Any]]
    if isinstance(doc, dict):
        items = list(doc.items())
    elif isinstance(doc, list):
        items = [(str(e.get("name", "")), e) for e in doc if isinstance(e, dict)]
    else:
        raise ValueError(f"{path}: expected a mapping or a list of locations")
    out: dict[str, tuple[float, float]] = {}
    for name, spec in items:
        if not isinstance(spec, dict):
            continue
        aliases = spec.get("aliases") or []
        for key in ("pose", "position"):
            if isinstance(spec.get(key), dict):
                spec = spec[key]
                if isinstance(spec.get("position"), dict):
                    spec = spec["position"]
        if "x" in spec and "y" in spec:
            for n in (name, *aliases):
                out[str(n).lower()] = (float(spec["x"]), float(spec["y"]))
    return out


@dataclass
class _Run:
    """One accepted goal while it runs."""

    handle: Any
    x: float
    y: float
    yaw: float | None
    start: float
    start_distance: float
    fail: bool
    outcome: Future = field(default_factory=Future)
    phase: str = "drive"  # drive -> turn -> done
    error_code: int = 0
    error_msg: str = ""

    def finish(self, outcome: str, error_code: int = 0, error_msg: str = "") -> None:
        if not self.outcome.done():
            self.error_code, self.error_msg = error_code, error_msg
            self.outcome.set_result(outcome)


@dataclass
class BaseParams:
    action_name: str = param("navigate_to_pose", "NavigateToPose action server name.")
    odom_topic: str = param("odom", "nav_msgs/Odometry output topic.")
    cmd_vel_topic: str = param("cmd_vel", "geometry_msgs/Twist input topic.")
    global_frame: str = param("map", "Frame of goals and feedback poses (= odom here).")
    odom_frame: str = param("odom", "Odometry frame (header.frame_id of odom).")
    base_frame: str = param("base_link", "Robot frame (child_frame_id of odom).")
    linear_speed: float = param(0.5, "Driving speed toward a goal, m/s.", range=(0.01, 5.0))
    angular_speed: float = param(1.0, "Turning speed, rad/s.", range=(0.05, 10.0))
    rate_hz: float = param(20.0, "Simulation, odometry and feedback rate.", range=(1.0, 200.0))
    start_x: float = param(0.0, "Start position x, m.", range=(-1e4, 1e4))
    start_y: float = param(0.0, "Start position y, m.", range=(-1e4, 1e4))
    start_yaw: float = param(0.0, "Start heading, rad.", range=(-math.pi, math.pi))
    goal_tolerance: float = param(
        0.05, "Arrived when this close to the goal, m.", range=(0.001, 5.0)
    )
    yaw_tolerance: float = param(
        0.05, "Heading tolerance at the goal, rad.", range=(0.001, math.pi)
    )
    cmd_vel_timeout_s: float = param(
        0.5, "Stop when cmd_vel is older than this.", range=(0.05, 10.0)
    )
    max_goal_distance: float = param(
        0.0, "Reject goals farther than this from the base, m; 0 = no limit.", range=(0.0, 1e4)
    )
    fail_on: list = param(  # noqa: RUF009 - a field factory, like dataclasses.field
        [],
        "Goals near these places abort half way ('path blocked'): location names from "
        "locations_file or 'x,y'. Unset = no failures.",
    )
    fail_radius: float = param(
        0.3, "How near a goal must be to a fail_on place, m.", range=(0.0, 100.0)
    )
    locations_file: str = param("", "Locations YAML resolving fail_on names; '' = none.")


class SimBaseNode(VoiceNode):
    """A kinematic base: ``NavigateToPose`` goals and ``cmd_vel`` in, ``odom`` out."""

    Params = BaseParams
    stop_order = 2  # stops last: sees the cancels

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("sim_base", **kwargs)
        self._lock = threading.RLock()
        self.x = self.y = self.yaw = 0.0
        self.v = self.w = 0.0
        self.odometer = 0.0  # metres driven since start
        self._cmd = (0.0, 0.0)
        self._cmd_time = -math.inf
        self._run: _Run | None = None
        self._runs: dict[bytes, _Run] = {}
        self._active = False
        self._shutting_down = False
        self._accepting = 0  # goals accepted whose accepted-callback has not run yet
        self._last_tick: float | None = None
        self._fail_points: list[tuple[str, float, float]] = []
        self._odom_pub = None
        self._cmd_sub = None
        self._server: ActionServer | None = None
        self._timer = None
        self.nav_type: Any = None
        self.counts = {"succeeded": 0, "canceled": 0, "aborted": 0, "rejected": 0}
        self.odom_published = 0
        self.diag = Diagnostics(self, hardware_id="sim_base")
        self.diag.add("base", self._diag_base)

    def _p(self, name: str) -> Any:
        return getattr(self.params, name)

    def _fail_rule(self) -> list[tuple[str, float, float]]:
        raw = self._p("fail_on")
        entries = [e.strip() for e in (raw or []) if e and e.strip()]
        if not entries:
            return []
        places = (
            load_location_points(self._p("locations_file")) if self._p("locations_file") else {}
        )
        points = []
        for e in entries:
            if e.lower() in places:
                points.append((e, *places[e.lower()]))
                continue
            try:
                x, y = (float(v) for v in e.split(","))
            except ValueError:
                known = ", ".join(sorted(places)) or "none (locations_file not set)"
                raise ValueError(
                    f"fail_on entry {e!r} is neither 'x,y' nor a known location ({known})"
                ) from None
            points.append((e, x, y))
        return points

    # -- lifecycle --------------------------------------------------------------------
    def configure(self) -> None:
        """Check parameters, create the publisher, subscription and action server."""
        try:
            self.nav_type = _nav_type()
            self._fail_points = self._fail_rule()
        except (RuntimeError, ValueError, OSError, yaml.YAMLError) as e:
            raise ConfigError(f"configuration failed: {e}") from None
        with self._lock:
            self.x, self.y = float(self._p("start_x")), float(self._p("start_y"))
            self.yaw = wrap_angle(float(self._p("start_yaw")))
            self.v = self.w = 0.0
        if self._server is not None:  # configured before: keep the entities
            return
        self._odom_pub = self.create_lifecycle_publisher(Odometry, self._p("odom_topic"), 10)
        self._cmd_sub = self.create_subscription(
            Twist,
            self._p("cmd_vel_topic"),
            self._on_cmd_vel,
            EVENT_QOS,
            callback_group=MutuallyExclusiveCallbackGroup(),
        )
        # Reentrant: a running execute callback must not hold up cancel or new goals.
        self._server = ActionServer(
            self,
            self.nav_type,
            self._p("action_name"),
            execute_callback=self._execute,
            goal_callback=self._on_goal,
            handle_accepted_callback=self._on_accepted,
            cancel_callback=self._on_cancel,
            callback_group=ReentrantCallbackGroup(),
        )
        self.get_logger().info(
            f"simulated base at ({self.x:.2f}, {self.y:.2f}, {self.yaw:.2f} rad), action "
            f"{self._server_name()}, {self._p('linear_speed')} m/s"
        )

    def activate(self) -> None:
        """Start the simulation clock; goals are accepted from now on."""
        self._shutting_down = False
        self._last_tick = None
        if self._timer is None:
            self._timer = self.create_timer(
                1.0 / float(self._p("rate_hz")),
                self._tick,
                callback_group=MutuallyExclusiveCallbackGroup(),
            )
        self._active = True

    def deactivate(self) -> None:
        """Stop the base and abort a running goal (at once: no loop work needed)."""
        self._stop("aborted", _UNKNOWN, "base deactivated")

    async def stop(self) -> None:
        """A running goal is aborted and the base stopped; its result goes out while the
        executor still spins (at most 0.5 s). A goal accepted just now (the signal came
        while its goal callback ran) is aborted too once it starts."""
        self._shutting_down = True
        for _ in range(50):
            run = self._run
            if run is not None and run.handle.is_cancel_requested:
                # Cancelled by its client (the conversation stops first) and not yet seen
                # by a tick: it ends cancelled, as the client asked, not aborted.
                self._stop("canceled", 0, "")
            elif run is not None or self._active:
                self._stop("aborted", _UNKNOWN, "base shutting down")
            if not self._runs and not self._accepting:
                return
            await asyncio.sleep(0.01)

    def release(self) -> None:
        """Destroy the timer first (no tick after the context goes), then the rest."""
        if self._timer is not None:
            self.destroy_timer(self._timer)
            self._timer = None
        self.diag.close()
        if self._server is not None:
            self._server.destroy()
            self._server = None

    def _stop(self, outcome: str, code: int, message: str) -> None:
        with self._lock:
            self._active = False
            self.v = self.w = 0.0
            run, self._run = self._run, None
        if run is not None:
            run.finish(outcome, code, message)

    def _server_name(self) -> str:
        name = self._p("action_name")
        ns = self.get_namespace().rstrip("/")
        return name if name.startswith("/") else f"{ns}/{name}"

    # -- action server ----------------------------------------------------------------
    def _on_goal(self, goal: Any) -> GoalResponse:
        """Accept a goal in a known frame, within reach, while active."""
        frame = goal.pose.header.frame_id
        known = ("", self._p("global_frame"), self._p("odom_frame"))
        reason = ""
        if not self._active:
            reason = "the base is not active"
        elif frame not in known:
            reason = f"goal frame {frame!r} is not one of {[f for f in known if f]}"
        else:
            p = goal.pose.pose.position
            if not all(math.isfinite(v) for v in (p.x, p.y)):
                reason = "goal position is not finite"
            else:
                limit = float(self._p("max_goal_distance"))
                with self._lock:
                    dist = math.hypot(p.x - self.x, p.y - self.y)
                if limit > 0 and dist > limit:
                    reason = f"goal is {dist:.2f} m away, beyond max_goal_distance {limit:.2f} m"
        if reason:
            self.counts["rejected"] += 1
            self.get_logger().warning(f"goal rejected: {reason}")
            return GoalResponse.REJECT
        self._accepting += 1
        return GoalResponse.ACCEPT

    def _on_accepted(self, handle: Any) -> None:
        """Make the goal the running one (preempting the previous) and start executing."""
        pose = handle.request.pose.pose
        gx, gy = pose.position.x, pose.position.y
        fail = any(
            math.hypot(gx - fx, gy - fy) <= float(self._p("fail_radius"))
            for _, fx, fy in self._fail_points
        )
        with self._lock:
            run = _Run(
                handle=handle,
                x=gx,
                y=gy,
                yaw=quaternion_to_yaw(pose.orientation),
                start=time.monotonic(),
                start_distance=math.hypot(gx - self.x, gy - self.y),
                fail=fail,
            )
            old, self._run = self._run, run
            self._runs[bytes(handle.goal_id.uuid)] = run
        if old is not None:
            old.finish("aborted", _UNKNOWN, "preempted by a new goal")
        self.get_logger().info(
            f"goal accepted: ({gx:.2f}, {gy:.2f}), {run.start_distance:.2f} m away"
            + (" [will fail: fail_on]" if fail else "")
        )
        self._accepting = max(0, self._accepting - 1)
        handle.execute()
        if self._shutting_down:  # accepted while the node stops: abort it at once
            self._stop("aborted", _UNKNOWN, "base shutting down")

    def _on_cancel(self, _handle: Any) -> CancelResponse:
        # Accept always; the simulation tick stops the base and ends the goal.
        return CancelResponse.ACCEPT

    async def _execute(self, handle: Any) -> Any:
        """Wait for the simulation to end this goal, then report the outcome."""
        run = self._runs[bytes(handle.goal_id.uuid)]
        outcome = await run.outcome
        self._runs.pop(bytes(handle.goal_id.uuid), None)
        result = self.nav_type.Result()
        if hasattr(result, "error_code"):
            result.error_code = run.error_code
            result.error_msg = run.error_msg
        if outcome == "succeeded":
            handle.succeed()
        elif outcome == "canceled" and handle.is_cancel_requested:
            handle.canceled()
        else:
            handle.abort()
        self.counts[outcome if outcome in self.counts else "aborted"] += 1
        self.get_logger().info(
            f"goal {outcome} at ({self.x:.2f}, {self.y:.2f})"
            + (f": {run.error_msg}" if run.error_msg else "")
        )
        return result

    # -- cmd_vel ----------------------------------------------------------------------
    def _on_cmd_vel(self, msg: Twist) -> None:
        with self._lock:
            self._cmd = (float(msg.linear.x), float(msg.angular.z))
            self._cmd_time = time.monotonic()

    # -- simulation -------------------------------------------------------------------
    def _tick(self) -> None:
        """Advance the base by the time elapsed, publish odometry and feedback."""
        now = time.monotonic()
        period = 1.0 / float(self._p("rate_hz"))
        dt = period if self._last_tick is None else min(now - self._last_tick, 5 * period)
        self._last_tick = now
        vmax, wmax = float(self._p("linear_speed")), float(self._p("angular_speed"))
        ended: tuple[_Run, str] | None = None
        with self._lock:
            run = self._run
            if run is not None and run.handle.is_cancel_requested:
                self._run, ended = None, (run, "canceled")
                self.v = self.w = 0.0
            elif run is not None:
                outcome = self._control(run, dt, vmax, wmax)
                if outcome is not None:
                    self._run, ended = None, (run, outcome)
            elif now - self._cmd_time <= float(self._p("cmd_vel_timeout_s")):
                self.v = max(-vmax, min(vmax, self._cmd[0]))
                self.w = max(-wmax, min(wmax, self._cmd[1]))
            else:
                self.v = self.w = 0.0
            # Unicycle, midpoint heading.
            mid = self.yaw + self.w * dt / 2
            self.x += self.v * math.cos(mid) * dt
            self.y += self.v * math.sin(mid) * dt
            self.odometer += abs(self.v) * dt
            self.yaw = wrap_angle(self.yaw + self.w * dt)
            x, y, yaw, v, w = self.x, self.y, self.yaw, self.v, self.w
        self._publish_odom(x, y, yaw, v, w)
        if ended is not None:
            r, outcome = ended
            if outcome == "aborted":
                r.finish(outcome, _UNKNOWN, "path blocked (simulated failure: fail_on)")
            else:
                r.finish(outcome)
            with self._lock:
                self.v = self.w = 0.0
        elif run is not None:
            self._publish_feedback(run, x, y, yaw, vmax, wmax)

    def _control(self, run: _Run, dt: float, vmax: float, wmax: float) -> str | None:
        """Set (v, w) toward the goal; the outcome when the goal ends, else None."""
        dx, dy = run.x - self.x, run.y - self.y
        dist = math.hypot(dx, dy)
        if run.fail and dist <= run.start_distance / 2:
            self.v = self.w = 0.0
            return "aborted"
        if run.phase == "drive" and dist <= float(self._p("goal_tolerance")):
            run.phase = "turn"
        if run.phase == "drive":
            err = wrap_angle(math.atan2(dy, dx) - self.yaw)
            self.w = max(-wmax, min(wmax, err / dt))
            self.v = min(vmax, dist / dt) if abs(err) < _HEADING_GATE else 0.0
            return None
        self.v = 0.0
        if run.yaw is None:
            self.w = 0.0
            return "succeeded"
        err = wrap_angle(run.yaw - self.yaw)
        if abs(err) <= float(self._p("yaw_tolerance")):
            self.w = 0.0
            return "succeeded"
        self.w = max(-wmax, min(wmax, err / dt))
        return None

    def _publish_odom(self, x: float, y: float, yaw: float, v: float, w: float) -> None:
        pub = self._odom_pub
        if pub is None:
            return
        msg = Odometry()
        msg.header.stamp = self.get_clock().now().to_msg()
        msg.header.frame_id = self._p("odom_frame")
        msg.child_frame_id = self._p("base_frame")
        msg.pose.pose.position.x = x
        msg.pose.pose.position.y = y
        msg.pose.pose.orientation = yaw_to_quaternion(yaw)
        msg.twist.twist.linear.x = v
        msg.twist.twist.angular.z = w
        pub.publish(msg)
        self.odom_published += 1

    def _publish_feedback(
        self, run: _Run, x: float, y: float, yaw: float, vmax: float, wmax: float
    ) -> None:
        dist = math.hypot(run.x - x, run.y - y)
        heading = 0.0
        if dist > float(self._p("goal_tolerance")):
            heading = abs(wrap_angle(math.atan2(run.y - y, run.x - x) - yaw))
        elif run.yaw is not None:
            heading = abs(wrap_angle(run.yaw - yaw))
        fb = self.nav_type.Feedback()
        pose = PoseStamped()
        pose.header.stamp = self.get_clock().now().to_msg()
        pose.header.frame_id = self._p("global_frame")
        pose.pose.position.x = x
        pose.pose.position.y = y
        pose.pose.orientation = yaw_to_quaternion(yaw)
        fb.current_pose = pose
        fb.distance_remaining = float(dist)
        fb.navigation_time = _duration(time.monotonic() - run.start)
        fb.estimated_time_remaining = _duration(dist / vmax + heading / wmax)
        fb.number_of_recoveries = 0
        try:
            run.handle.publish_feedback(fb)
        except Exception as e:  # noqa: BLE001 - the goal ended meanwhile (client gone)
            self.get_logger().debug(f"feedback not sent: {e!r}")

    # -- diagnostics ------------------------------------------------------------------
    def _diag_base(self) -> DiagStatus:
        with self._lock:
            run, x, y, yaw, v = self._run, self.x, self.y, self.yaw, self.v
        values = {
            "x": x,
            "y": y,
            "yaw": yaw,
            "speed": v,
            **{f"goals_{k}": n for k, n in self.counts.items()},
        }
        if not self._active:
            return DiagStatus(WARN if self._server else ERROR, "inactive", values)
        if run is not None:
            values.update(goal_x=run.x, goal_y=run.y)
            return DiagStatus(OK, f"driving to ({run.x:.2f}, {run.y:.2f})", values)
        return DiagStatus(OK, "idle", values)


def main(args: list[str] | None = None) -> None:
    """``ros2 run sonic_voice sim_base``: :func:`sonic_voice.ros.runtime.run_node` stops it
    between callbacks on SIGINT/SIGTERM (rclpy's own handler, which shut the context down
    inside a callback, once crashed it with SIGSEGV), aborting a running goal first."""
    run_node(SimBaseNode, args)


if __name__ == "__main__":
    main()
