"""``sonic-voice``: the whole stack in one process (also ``ros2 run sonic_voice bringup``).

The way to run where ``ros2 launch`` is not installed (the venv path) and the README's main
job. It starts the same nodes as ``launch/sonic_voice.launch.py`` with the same parameter
files (``sonic_voice.app.stack``).

- **online** (AWS credentials found in the standard chain, or ``--online``): the nodes talk
  to Amazon Bedrock (and to Kinesis Video Streams when ``--kvs-channel`` is given);
- **offline** (no AWS configuration, or ``--offline``): the offline demo
  (``sonic_voice.app.demo``) on local stand-ins, in a private ROS graph.

Exit status: 0 when the run ended as expected (offline: the demo conversation completed),
1 when it did not, 2 on anything the user must fix (one line says what: a params file, a
tools file, a WAV, credentials, model access), 130 when a signal stopped the demo.
SIGINT and SIGTERM stop everything within about 2 s: goals cancelled first, then streams
closed, then the stand-ins, the private audio server and its temporary files.

Keep this module's imports light: the offline demo may move the process into a network
namespace of its own, which must happen before any thread starts (numpy's included).
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import signal
import sys
import threading
import wave
from pathlib import Path
from typing import Any

log = logging.getLogger("sonic_voice")

EXIT_OK, EXIT_FAILED, EXIT_CONFIG, EXIT_SIGNAL = 0, 1, 2, 130

EXAMPLES = """\
examples:
  sonic-voice                         offline demo when no AWS credentials are configured
  sonic-voice --offline --wav me.wav  the demo with your own recording as the visitor
  sonic-voice --offline --kvs-channel demo --stay
                                      the demo, then a browser on this machine can join
  sonic-voice --region us-east-1 --kvs-channel my-robot
                                      Amazon Bedrock + remote viewers on channel my-robot
  sonic-voice --params-file robot.yaml --tools-file tools.yaml
                                      your parameters and tools (docs/adding-a-tool.md)
"""


class UserError(Exception):
    """Something the user must fix; ``str()`` is the one line that says what."""


# --------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sonic-voice",
        description="Run sonic_voice (audio_io, sonic_session, kvs_webrtc, sim base) in one "
        "process. With no AWS configuration it runs the offline demo on local stand-ins.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--offline", action="store_true", help="Force the offline demo.")
    mode.add_argument(
        "--online", action="store_true", help="Force Amazon Bedrock (fail if no credentials)."
    )
    p.add_argument(
        "--params-file",
        action="append",
        default=[],
        type=Path,
        help="ROS params YAML applied after config/<node>.yaml, as --params-file in "
        "ros2 run (repeatable).",
    )
    p.add_argument("--tools-file", help="Tool declarations YAML (default: config/tools.yaml).")
    p.add_argument("--locations-file", help="Named locations YAML.")
    p.add_argument("--region", help="AWS region of Bedrock and KVS (online).")
    p.add_argument("--profile", help="AWS profile name (online).")
    p.add_argument("--model", help="Bedrock model id.")
    p.add_argument("--voice", help="Nova Sonic voice id.")
    p.add_argument("--language", help="Default locale until the person speaks, e.g. en-US.")
    p.add_argument("--kvs-channel", help="KVS signaling channel name: enables remote viewers.")
    p.add_argument(
        "--no-local-audio", action="store_true", help="No microphone/speaker (viewers only)."
    )
    p.add_argument("--sim-base", action="store_true", help="Online: also run the simulated base.")
    p.add_argument("--scenario", type=Path, help="Offline: the stand-in's scenario YAML.")
    p.add_argument(
        "--wav",
        type=Path,
        action="append",
        default=[],
        help="Offline: the visitor's speech, one 16-bit PCM WAV per turn (default: "
        "synthesized with espeak-ng).",
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
        help="Stop after this many seconds (0 = never; offline: the demo ends by itself, "
        "bounded by 180 s).",
    )
    p.add_argument(
        "--stay",
        action="store_true",
        help="Offline: keep running after the scripted conversation (e.g. for a browser "
        "viewer with --kvs-channel) until Ctrl-C.",
    )
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return p


# --------------------------------------------------------------------------- checks
def check_yaml_file(what: str, path: Path | str) -> Path:
    """An existing, readable, well-formed YAML file, or :class:`UserError` naming it."""
    import yaml

    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise UserError(f"{what} {path}: no such file") from None
    except OSError as e:
        raise UserError(f"{what} {path}: {e.strerror or e}") from None
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{what} {path}:{where}: {problem}") from None
    if what == "params file" and not isinstance(doc, dict):
        raise UserError(f"{what} {path}: expected node names with ros__parameters")
    return path


def check_wav(path: Path) -> None:
    """A WAV the demo can play: 16-bit PCM, not empty (float and other formats refused)."""
    try:
        with wave.open(str(path), "rb") as w:
            width, frames = w.getsampwidth(), w.getnframes()
    except FileNotFoundError:
        raise UserError(f"--wav {path}: no such file") from None
    except wave.Error as e:
        hint = " (a float WAV? convert: sox IN -b 16 -e signed OUT.wav)" if "3" in str(e) else ""
        raise UserError(f"--wav {path}: not a 16-bit PCM WAV file: {e}{hint}") from None
    except (OSError, EOFError) as e:
        raise UserError(f"--wav {path}: cannot read it: {e}") from None
    if width != 2:
        raise UserError(
            f"--wav {path}: {8 * width}-bit samples; give 16-bit PCM "
            "(sox IN -b 16 -e signed OUT.wav)"
        )
    if frames == 0:
        raise UserError(f"--wav {path}: holds no audio")


def check_tools(tools_file: str, locations_file: str | None) -> None:
    from sonic_voice.paths import resolve_config_path
    from sonic_voice.tools import ToolConfigError, load_tool_config

    path = resolve_config_path(tools_file)
    if not path.exists():
        raise UserError(f"tools file {tools_file}: no such file")
    try:
        load_tool_config(
            str(path), str(resolve_config_path(locations_file)) if locations_file else None
        )
    except (ToolConfigError, OSError) as e:
        raise UserError(str(e)) from None


def check_args(args: argparse.Namespace) -> None:
    """Everything checkable before anything starts: one line and exit 2 when wrong."""
    for f in args.params_file:
        check_yaml_file("params file", f)
    if args.scenario is not None:
        check_yaml_file("scenario", args.scenario)
    for w in args.wav:
        check_wav(w)
    if args.tools_file:
        check_tools(args.tools_file, args.locations_file)
    if args.voice:
        from sonic_voice.sonic import events as ev

        voices = ev.V2_VOICES | ev.V1_VOICES
        if args.voice not in voices:
            raise UserError(
                f"--voice {args.voice}: not a Nova Sonic voice ({', '.join(sorted(voices))})"
            )


# --------------------------------------------------------------------------- signals
class Signals:
    """SIGINT/SIGTERM: raise KeyboardInterrupt while starting (the ``with`` blocks clean
    up), and once the nodes run, set ``event`` for the orderly, bounded shutdown."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.name = ""
        self.raising = True
        self._relay: Any = None

    def install(self) -> None:
        from sonic_voice.ros.runtime import SignalRelay

        # The event is set from the relay's thread, never in the handler (see SignalRelay:
        # the main thread may hold the event's lock when the signal lands).
        self._relay = SignalRelay(lambda _signum: self.event.set())
        signal.signal(signal.SIGINT, self._on)
        signal.signal(signal.SIGTERM, self._on)

    def _on(self, signum: int, _frame: Any) -> None:
        self.name = signal.Signals(signum).name
        self._relay.handler(signum)
        if self.raising:
            raise KeyboardInterrupt


# --------------------------------------------------------------------------- main
class _Formatter(logging.Formatter):
    """The live log's lines as they are; others say where they come from."""

    PREFIXES = (("sonic_voice.emulators", "stand-in"), ("sonic_voice.", ""))

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.name == "sonic_voice":
            return text
        for prefix, label in self.PREFIXES:
            if record.name.startswith(prefix):
                return f"  [{label or record.name.split('.')[1]}] {text}"
        return f"  [{record.name}] {text}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Formatter("%(message)s"))
    logging.basicConfig(level=getattr(logging, args.log_level.upper()), handlers=[handler])
    for noisy in ("botocore", "boto3", "aiortc", "aioice", "urllib3"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))
    signals = Signals()
    signals.install()
    # `kill -USR1 <pid>` prints every thread's stack: what a stuck run is doing.
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    try:
        check_args(args)
        from sonic_voice.sonic.transport import have_credentials

        creds = have_credentials(args.profile)
        if args.online and not creds:
            raise UserError(
                "no AWS credentials found (environment, ~/.aws profiles, SSO or "
                "credential_process); drop --online to run the offline demo"
            )
        if args.offline or not creds:
            unused = [o for o, v in (("--region", args.region), ("--profile", args.profile)) if v]
            if unused:
                log.info(
                    "offline: %s not used (the stand-ins answer locally)", " and ".join(unused)
                )
            return _offline(args, signals)
        return run_online(args, signals)
    except UserError as e:
        print(f"sonic-voice: {e}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        log.info("stopped (%s)", signals.name or "SIGINT")
        return EXIT_SIGNAL


def _offline(args: argparse.Namespace, signals: Signals) -> int:
    from sonic_voice.app import demo
    from sonic_voice.app.stack import StartupError

    if args.online:
        raise UserError("--offline and --online together")
    # A browser on this machine must reach the stand-ins with --kvs-channel: then the graph
    # is made private by its domain instead of a network namespace.
    graph = demo.private_graph(allow_netns=not args.kvs_channel and not args.real_devices)
    try:
        signals.raising = True
        return demo.run_offline(args, graph, _StopAfterStart(signals))
    except StartupError as e:
        raise UserError(str(e)) from None


class _StopAfterStart(threading.Event):
    """The runtime's stop event: set by a signal; once set, signals no longer raise."""

    def __init__(self, signals: Signals) -> None:
        super().__init__()
        self.signals = signals
        signals.event = self

    def wait(self, timeout: float | None = None) -> bool:
        self.signals.raising = False
        return super().wait(timeout)


def run_online(args: argparse.Namespace, signals: Signals) -> int:
    """Real Bedrock (and KVS when a channel is given) until a signal or ``--duration``."""
    import time

    from sonic_voice.app.monitor import RunLog, make_monitor
    from sonic_voice.app.stack import Stack, StartupError

    run = RunLog()
    log.info("sonic_voice: online (region %s)", args.region or "from the params files")
    stack = Stack(args.params_file)
    stop = _StopAfterStart(signals)
    stack.runtime.stop_requested = stop
    kvs_node = None
    try:
        stack.add(make_monitor(run, stack.context))
        if not args.no_local_audio:
            stack.node("audio_io")
        if args.kvs_channel:
            kvs = {"channel_name": args.kvs_channel}
            if args.region:
                kvs["region"] = args.region
            kvs_node = stack.node("kvs_webrtc", kvs)
        if args.sim_base:
            stack.node("sim_base")
        session = {
            key: value
            for key, value in (
                ("region", args.region),
                ("aws_profile", args.profile),
                ("model_id", args.model),
                ("voice_id", args.voice),
                ("language", args.language),
                ("tools_file", args.tools_file),
                ("locations_file", args.locations_file),
            )
            if value
        }
        node = stack.node("sonic_session", session)
        node.get_logger().set_level(30)  # transcripts: the monitor prints them
        stack.start()
        if args.kvs_channel and kvs_node.params.invite_page_url:
            from sonic_voice.app.demo import print_invite

            print_invite(kvs_node)
        deadline = time.monotonic() + args.duration if args.duration else float("inf")
        while time.monotonic() < deadline:
            fatal = stack.fatal_errors()
            if fatal:
                log.error("stopped: %s", "; ".join(f"{n}: {e}" for n, e in fatal.items()))
                return EXIT_CONFIG
            if stop.wait(0.2):
                log.info("stopped (%s)", signals.name)
                return EXIT_OK
        return EXIT_OK
    except StartupError as e:
        raise UserError(str(e)) from None
    finally:
        stack.close()


def cli() -> None:
    """Console-script entry point."""
    code = main()
    from sonic_voice.ros.bridge import Bridge

    Bridge.close_process_bridge()
    sys.exit(code)


if __name__ == "__main__":
    cli()
