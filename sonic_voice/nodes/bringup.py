"""``sonic-voice``: the whole stack in one process (``ros2 run sonic_voice bringup``).

The way to run where ``ros2 launch`` is not installed (the venv path) and the README's main
job. It starts the same nodes as ``launch/sonic_voice.launch.py`` with the same parameter
files, in one process on one multi-threaded executor.

- **online** (AWS credentials found in the standard chain, or ``--online``): the nodes talk
  to Amazon Bedrock (and to Kinesis Video Streams when ``--kvs-channel`` is given);
- **offline** (no AWS configuration, or ``--offline``): the Nova Sonic stand-in starts
  in-process with a demo scenario, the simulated base serves navigation, and the
  visitor's speech is played into a virtual microphone (a private PulseAudio server) —
  the whole conversation runs on this machine and ends in a summary.

A readable live log shows who said what, tool calls and their progress, and where the
robot is. Exit status: 0 when the run ended as expected (offline: the demo conversation
completed and the base arrived), 1 otherwise, 2 on a configuration error.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("sonic_voice")

NODE_FILES = {
    "audio_io": "audio_io.yaml",
    "sonic_session": "sonic_session.yaml",
    "kvs_webrtc": "kvs_webrtc.yaml",
    "sim_base": "sim_base.yaml",
}


def share_dir() -> Path:
    """The package's share directory (config/, launch/, web/), installed or from source."""
    with contextlib.suppress(Exception):
        from ament_index_python.packages import get_package_share_directory

        return Path(get_package_share_directory("sonic_voice"))
    src = Path(__file__).resolve().parents[2]
    if (src / "config").is_dir():
        return src
    return Path(sys.prefix) / "share" / "sonic_voice"


# --------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sonic-voice",
        description="Run sonic_voice (audio_io, sonic_session, kvs_webrtc, sim base) in one "
        "process. With no AWS configuration it runs the offline demo on local stand-ins.",
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_true", help="Force the offline demo.")
    mode.add_argument(
        "--online", action="store_true", help="Force Amazon Bedrock (fail if no credentials)."
    )
    p.add_argument("--config-dir", type=Path, help="Directory of the per-node params YAML.")
    p.add_argument(
        "--params-file",
        action="append",
        default=[],
        type=Path,
        help="Extra params YAML applied after the defaults (repeatable).",
    )
    p.add_argument("--tools-file", help="Tool declarations YAML (default: config/tools.yaml).")
    p.add_argument("--locations-file", help="Named locations YAML.")
    p.add_argument("--region", help="AWS region of Bedrock and KVS.")
    p.add_argument("--profile", help="AWS profile name.")
    p.add_argument("--model", help="Bedrock model id.")
    p.add_argument("--voice", help="Nova Sonic voice id.")
    p.add_argument("--language", help="Default locale until the person speaks, e.g. en-US.")
    p.add_argument("--kvs-channel", help="KVS signaling channel name: enables remote viewers.")
    p.add_argument(
        "--no-local-audio", action="store_true", help="No microphone/speaker (viewers only)."
    )
    p.add_argument(
        "--sim-base", action="store_true", help="Also run the simulated base (always offline)."
    )
    p.add_argument("--scenario", type=Path, help="Offline: the stand-in's scenario YAML.")
    p.add_argument(
        "--wav",
        type=Path,
        action="append",
        default=[],
        help="Offline: the visitor's speech, one WAV per turn (default: synthesized).",
    )
    p.add_argument(
        "--real-devices",
        action="store_true",
        help="Offline: use this machine's sound devices instead of virtual ones.",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=0.0,
        help="Stop after this many seconds (0 = never; "
        "offline: the demo ends by itself, bounded by 180 s).",
    )
    p.add_argument(
        "--stay",
        action="store_true",
        help="Offline: keep running after the scripted conversation (e.g. for a browser "
        "viewer with --kvs-channel) until Ctrl-C.",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


# --------------------------------------------------------------------------- parameters
def node_params(args: argparse.Namespace, name: str) -> dict[str, Any]:
    """Defaults file of ``name`` + extra files + command-line overrides."""
    from sonic_voice.nodes.params import read_params

    cfg = args.config_dir or share_dir() / "config"
    values: dict[str, Any] = {}
    default = cfg / NODE_FILES[name]
    if default.exists():
        values.update(read_params(default, name))
    for extra in args.params_file:
        values.update(read_params(extra, name))
    if name == "sonic_session":
        for key, arg in (
            ("region", args.region),
            ("aws_profile", args.profile),
            ("model_id", args.model),
            ("voice_id", args.voice),
            ("language", args.language),
            ("tools_file", args.tools_file),
            ("locations_file", args.locations_file),
        ):
            if arg:
                values[key] = arg
        for key in ("tools_file", "locations_file"):
            if values.get(key) and not Path(values[key]).is_absolute():
                base = cfg if (cfg / values[key]).exists() else Path.cwd()
                values[key] = str((base / values[key]).resolve())
    if name == "kvs_webrtc":
        for key, arg in (("channel_name", args.kvs_channel), ("region", args.region)):
            if arg:
                values[key] = arg
    if name == "sim_base" and args.locations_file:
        values.setdefault("locations_file", args.locations_file)
    return values


# --------------------------------------------------------------------------- live log
@dataclass
class RunLog:
    """What the monitor saw; the summary and the offline verdict come from here."""

    started: float = field(default_factory=time.monotonic)
    transcripts: list[dict[str, Any]] = field(default_factory=list)
    tool_events: list[dict[str, Any]] = field(default_factory=list)
    states: list[str] = field(default_factory=list)
    pose: tuple[float, float] | None = None
    distance: float = 0.0
    base_events: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def t(self) -> str:
        return f"{time.monotonic() - self.started:6.1f}s"

    def finals(self, role: str) -> list[dict[str, Any]]:
        return [
            e
            for e in self.transcripts
            if e.get("role") == role and e.get("stage", "FINAL") == "FINAL" and e.get("text")
        ]


def make_monitor(run: RunLog, context: Any = None) -> Any:
    """A node that turns the package's topics into the readable live log."""
    from nav_msgs.msg import Odometry
    from rclpy.node import Node
    from std_msgs.msg import Int32, String

    from sonic_voice.nodes.common import EVENT_QOS, LATCHED_QOS

    class Monitor(Node):
        def __init__(self) -> None:
            super().__init__("sonic_voice_monitor", context=context)
            self.create_subscription(String, "transcript", self._transcript, EVENT_QOS)
            self.create_subscription(String, "tool_events", self._tool, EVENT_QOS)
            self.create_subscription(String, "state", self._state, LATCHED_QOS)
            self.create_subscription(Int32, "kvs/viewers", self._viewers, LATCHED_QOS)
            self.create_subscription(Odometry, "odom", self._odom, 10)
            self._last_pose_log = 0.0

        def _transcript(self, msg: String) -> None:
            e = _loads(msg.data)
            with run.lock:
                run.transcripts.append(e)
            if e.get("stage", "FINAL") == "FINAL" and e.get("text"):
                who = {"USER": "visitor", "ASSISTANT": "robot"}.get(e.get("role", ""), "?")
                lang = f" [{e['language']}]" if e.get("language") else ""
                log.info("%s  %-7s%s: %s", run.t(), who, lang, e["text"])

        def _tool(self, msg: String) -> None:
            e = _loads(msg.data)
            with run.lock:
                run.tool_events.append(e)
            kind = e.get("event", "")
            name = e.get("tool") or e.get("name", "?")
            if kind == "start":
                args = json.dumps(e.get("input", {}), ensure_ascii=False)
                log.info("%s  tool   : %s %s", run.t(), name, args)
            elif kind == "progress":
                log.info("%s  tool   : %s ... %s", run.t(), name, e.get("text") or e.get("data"))
            elif kind == "result":
                result = json.dumps(e.get("result", {}), ensure_ascii=False)
                log.info("%s  tool   : %s -> %s %s", run.t(), name, e.get("status"), result[:160])

        def _state(self, msg: String) -> None:
            e = _loads(msg.data)
            state = e.get("state", msg.data)
            with run.lock:
                run.states.append(state)
            log.debug("%s  state  : %s", run.t(), state)

        def _viewers(self, msg: Int32) -> None:
            log.info("%s  viewers: %d", run.t(), msg.data)

        def _odom(self, msg: Odometry) -> None:
            p = msg.pose.pose.position
            with run.lock:
                if run.pose is not None:
                    run.distance += math.hypot(p.x - run.pose[0], p.y - run.pose[1])
                run.pose = (p.x, p.y)
            now = time.monotonic()
            moving = abs(msg.twist.twist.linear.x) > 1e-3 or abs(msg.twist.twist.angular.z) > 1e-3
            if moving and now - self._last_pose_log > 1.0:
                self._last_pose_log = now
                log.info("%s  base   : at (%.2f, %.2f) moving", run.t(), p.x, p.y)

    return Monitor()


def _loads(data: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        return {"text": data}
    return doc if isinstance(doc, dict) else {"value": doc}


# --------------------------------------------------------------------------- the stack
class Stack:
    """The nodes in one process, each on its own SingleThreadedExecutor thread (one node
    never waits behind another's callbacks; see ``run_node`` for why not multi-threaded)."""

    def __init__(self) -> None:
        import rclpy

        self.context = rclpy.Context()
        rclpy.init(context=self.context, signal_handler_options=rclpy.SignalHandlerOptions.NO)
        self.nodes: list[Any] = []
        self._spinners: list[tuple[Any, threading.Thread]] = []

    def add(self, node: Any) -> Any:
        from rclpy.executors import SingleThreadedExecutor

        executor = SingleThreadedExecutor(context=self.context)
        executor.add_node(node)
        thread = threading.Thread(
            target=self._spin, args=(executor,), name=f"ros-{node.get_name()}", daemon=True
        )
        self.nodes.append(node)
        self._spinners.append((executor, thread))
        return node

    def start(self) -> None:
        for _, thread in self._spinners:
            if not thread.is_alive():
                thread.start()

    @staticmethod
    def _spin(executor: Any) -> None:
        from rclpy.executors import ExternalShutdownException

        with contextlib.suppress(ExternalShutdownException):
            executor.spin()

    def close(self) -> None:
        import rclpy

        for node in reversed(self.nodes):
            if hasattr(node, "shutdown_resources"):
                with contextlib.suppress(Exception):
                    node.shutdown_resources()
        for executor, _ in self._spinners:
            executor.shutdown()
        for _, thread in self._spinners:
            if thread.is_alive():
                thread.join(10)
        for node in reversed(self.nodes):
            with contextlib.suppress(Exception):
                node.destroy_node()
        rclpy.try_shutdown(context=self.context)


def _node(factory: Any, stack: Stack, params: dict[str, Any], **kwargs: Any) -> Any:
    from sonic_voice.nodes.params import overrides

    return stack.add(
        factory(context=stack.context, parameter_overrides=overrides(params), **kwargs)
    )


@contextlib.contextmanager
def _stack() -> Iterator[Stack]:
    stack = Stack()
    try:
        yield stack
    finally:
        stack.close()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, args.log_level.upper()),
        format="%(message)s",
        stream=sys.stdout,
    )
    for noisy in ("botocore", "boto3", "aiortc", "aioice", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))
    from sonic_voice.sonic.transport import have_credentials

    offline = args.offline or (not args.online and not have_credentials(args.profile))
    if args.online and not have_credentials(args.profile):
        log.error(
            "no AWS credentials found (environment, ~/.aws profiles, SSO or credential_process)"
            "; drop --online to run the offline demo"
        )
        return 2
    try:
        if offline:
            from sonic_voice.nodes.demo import run_offline

            # The demo sends navigation goals and cmd_vel: keep its ROS graph on this
            # machine, so it can never drive a real robot on the same network and domain.
            os.environ.setdefault("ROS_AUTOMATIC_DISCOVERY_RANGE", "LOCALHOST")

            return run_offline(args)
        return run_online(args)
    except KeyboardInterrupt:
        return 130


def run_online(args: argparse.Namespace) -> int:
    """Real Bedrock (and KVS when a channel is given) until Ctrl-C or ``--duration``."""
    from sonic_voice.nodes.sonic_session import SonicSessionNode

    run = RunLog()
    log.info("sonic_voice: online (region %s)", args.region or "from params")
    with _stack() as stack:
        if not args.no_local_audio:
            from sonic_voice.nodes.audio_io import AudioIONode

            _node(AudioIONode, stack, node_params(args, "audio_io"))
        if args.kvs_channel:
            from sonic_voice.nodes.kvs_webrtc import KvsWebrtcNode

            _node(KvsWebrtcNode, stack, node_params(args, "kvs_webrtc"))
        if args.sim_base:
            from sonic_voice.nodes.sim_base import SimBaseNode

            _node(SimBaseNode, stack, node_params(args, "sim_base"))
        session = _node(SonicSessionNode, stack, node_params(args, "sonic_session"))
        stack.add(make_monitor(run, stack.context))
        stack.start()
        deadline = time.monotonic() + args.duration if args.duration else math.inf
        while time.monotonic() < deadline:
            if getattr(session, "fatal_error", ""):
                log.error("stopped: %s", session.fatal_error)
                return 1
            time.sleep(0.2)
    return 0


def cli() -> None:
    """Console-script entry point."""
    sys.exit(main())


if __name__ == "__main__":
    cli()
