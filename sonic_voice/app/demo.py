"""The offline demo: the whole stack on this machine, no AWS account needed.

Started by ``sonic-voice`` when no AWS configuration is found (or with ``--offline``):

- the Nova Sonic stand-in runs in-process (real HTTP/2 + TLS + SigV4 + event stream, so the
  session talks to it through the real SDK) and answers from a scenario
  (``config/scenarios/offline_demo.yaml``). It is scripted: it reacts to *sound* (the end
  of each utterance), not to the words, so the demo log shows the scenario's lines;
- a private PulseAudio server gives a virtual microphone and speaker (unless
  ``--real-devices``); the visitor's turns (the scenario's lines synthesized with
  espeak-ng, or the WAV files given with ``--wav``) are played into the microphone, so they
  go through ``audio_io`` like real speech;
- the simulated base serves ``nav2_msgs/action/NavigateToPose`` and the ``navigate_to``
  tool drives it for real over ROS 2.

**Its ROS graph is private** (:func:`private_graph`): the demo sends navigation goals, and
on a robot computer running Nav2 they must never reach the real base. The runner moves
itself into a network namespace of its own when the kernel allows it (then nothing else
can even see the graph); otherwise it picks a ROS domain id that it checks is empty. In
either case it refuses to start if another ``navigate_to_pose`` server answers there, and
in a shared domain it keeps watching (:class:`GraphWatch`): such a server that comes later
(a navigation stack started after the demo, or discovered late) stops the demo, its goals
cancelled, with exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sonic_voice.app.monitor import RunLog, log_base, make_monitor
from sonic_voice.app.stack import Stack, StartupError
from sonic_voice.paths import config_dir

log = logging.getLogger("sonic_voice")

DEMO_LIMIT_S = 180.0
DEMO_IDLE_TIMEOUT_S = 6.0  # the demo's conversation is released this long after its end
MIC_RATE = 16000
NAV_ACTION = "navigate_to_pose"
NAV_SETTLE_S = 1.0  # other nodes seen: how long their services get to show
# A slow walk (m/s), so the visitor has time to talk on the way (and to say "¡para!").
DEMO_BASE_SPEED = 0.2

# A few very common words per language: enough to say which language a demo line is in.
_WORDS = {
    "es": {"el", "la", "los", "las", "de", "que", "me", "te", "por", "favor", "hola", "sí",
           "claro", "hemos", "llegado", "puedes", "llevar", "a", "es", "una", "gracias",
           "para", "lejos", "vale", "aquí"},
    "en": {"the", "a", "to", "you", "is", "are", "i", "am", "can", "how", "help", "hello",
           "we", "here", "please", "me", "take"},
    "fr": {"le", "la", "les", "de", "je", "vous", "est", "bonjour", "merci", "nous", "à"},
    "de": {"der", "die", "das", "und", "ich", "sie", "ist", "hallo", "bitte", "wir", "zu"},
}  # fmt: skip


def guess_language(text: str) -> str:
    """The language of a demo line by its common words ('' when unsure)."""
    words = [w.strip("¿?¡!.,;:\"'").lower() for w in text.split()]
    scores = {lang: sum(w in vocab for w in words) for lang, vocab in _WORDS.items()}
    best = max(scores, key=lambda k: scores[k])
    return best if scores[best] > 0 else ""


# --------------------------------------------------------------------------- private graph
@dataclass
class Graph:
    """Where the demo's ROS graph lives."""

    how: str  # "network namespace" | "ROS domain <n>"
    domain_id: int | None = None


def enter_network_namespace() -> bool:
    """Move this process into a new network namespace with only ``lo`` (127.0.0.1 and the
    127.0.0.2 aiortc needs). Must run before any thread starts. False when not allowed."""
    if not hasattr(os, "unshare"):
        return False
    try:
        if os.geteuid() == 0:
            os.unshare(os.CLONE_NEWNET)
        else:
            uid, gid = os.getuid(), os.getgid()
            os.unshare(os.CLONE_NEWUSER | os.CLONE_NEWNET)
            Path("/proc/self/setgroups").write_text("deny")
            Path("/proc/self/uid_map").write_text(f"{uid} {uid} 1")
            Path("/proc/self/gid_map").write_text(f"{gid} {gid} 1")
    except OSError:
        return False
    # Up goes lo by ioctl in this process, which holds the namespace's capabilities (a
    # program it started, e.g. `ip`, would not as a user: its uid maps to itself, not 0).
    # Past this point the process is in the new namespace whatever happens.
    import fcntl
    import socket
    import struct

    siocsifflags, iff_up, iff_loopback, iff_running = 0x8914, 0x1, 0x8, 0x40
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        ifr = struct.pack("16sH14x", b"lo", iff_up | iff_loopback | iff_running)
        fcntl.ioctl(sock, siocsifflags, ifr)
    # 127.0.0.2 for aiortc's host candidates (only the KVS path needs it; best effort).
    subprocess.run(
        ["ip", "addr", "add", "127.0.0.2/8", "dev", "lo"], check=False, capture_output=True
    )
    return True


def private_graph(allow_netns: bool) -> Graph:
    """A ROS graph nobody else reaches: a network namespace, else a domain checked later."""
    if allow_netns and os.environ.get("SONIC_VOICE_DEMO_NETNS", "1") != "0":
        if enter_network_namespace():
            return Graph("its own network namespace")
    given = os.environ.get("ROS_DOMAIN_ID")
    domain = int(given) if given and given.isdigit() else random.randint(120, 200)
    return Graph(f"ROS domain {domain}", domain)


def check_graph(node: Any, graph: Graph, wait_s: float, settle_s: float = NAV_SETTLE_S) -> None:
    """Refuse a graph where other nodes (domain mode) or a navigation server answer.

    A node is discovered before its services: once other nodes show, their services get
    ``settle_s`` to show too, so a navigation server is named as such (a full test run
    here once saw ``/real_robot`` before its ``navigate_to_pose``)."""
    deadline = time.monotonic() + wait_s
    me = node.get_fully_qualified_name()
    others_since: float | None = None
    while True:
        services = [n for n, _ in node.get_service_names_and_types()]
        nav = [s for s in services if s.endswith(f"{NAV_ACTION}/_action/send_goal")]
        if nav:
            raise StartupError(
                f"another {NAV_ACTION} server answers in the demo's graph ({graph.how}): "
                f"{nav[0].rsplit('/_action', 1)[0]}; the demo will not send goals that could "
                "move a real robot (stop it, or set ROS_DOMAIN_ID to an unused domain)"
            )
        others = [
            f"{ns.rstrip('/')}/{n}"
            for n, ns in node.get_node_names_and_namespaces()
            if f"{ns.rstrip('/')}/{n}" != me
        ]
        if not others or graph.domain_id is None:
            others_since = None
        elif others_since is None:
            others_since = time.monotonic()
        if others_since is not None and time.monotonic() >= min(deadline, others_since + settle_s):
            raise StartupError(
                f"the demo's graph ({graph.how}) is not empty: {', '.join(sorted(others)[:3])}; "
                "set ROS_DOMAIN_ID to an unused domain"
            )
        if time.monotonic() >= deadline:
            return
        time.sleep(0.1)


class GraphWatch:
    """After :func:`check_graph`, in a shared domain: keep looking, for the whole demo, for
    a ``navigate_to_pose`` server that is not the demo's own (a navigation stack started
    after the check, or discovered late), every ``period_s``. The first one sets ``stop``
    (the demo ends and its goals are cancelled, as on Ctrl-C) and is kept in
    :attr:`stranger`. Other newcomers (``ros2 topic echo``, rqt) are only logged: they
    cannot take the demo's goals."""

    def __init__(
        self,
        node: Any,
        graph: Graph,
        ours: set[str],
        stop: threading.Event,
        period_s: float = 0.25,
    ) -> None:
        self.node, self.graph, self.ours, self.stop = node, graph, ours, stop
        self.period_s = period_s
        self.stranger = ""
        self._noted: set[str] = set()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-graph-watch", daemon=True)
        self._thread.start()

    def _serves_navigation(self, name: str, namespace: str) -> bool:
        services = self.node.get_service_names_and_types_by_node(name, namespace)
        return any(s.endswith(f"{NAV_ACTION}/_action/send_goal") for s, _ in services)

    def _run(self) -> None:
        while not self._done.wait(self.period_s):
            try:
                for n, ns in self.node.get_node_names_and_namespaces():
                    full = f"{ns.rstrip('/')}/{n}"
                    if full in self.ours:
                        continue
                    if self._serves_navigation(n, ns):
                        self.stranger = full
                        log.error("%s", self.message())
                        self.stop.set()
                        return
                    if full not in self._noted:
                        self._noted.add(full)
                        log.info("  another node in the demo's graph: %s", full)
            except Exception:  # noqa: BLE001 - the node is going away with the demo
                return

    def message(self) -> str:
        return (
            f"another {NAV_ACTION} server joined the demo's graph ({self.graph.how}): "
            f"{self.stranger}; the demo stopped and cancelled its goals, which could move a "
            "real robot there (set ROS_DOMAIN_ID to an unused domain)"
        )

    def close(self) -> None:
        self._done.set()
        self._thread.join(1.0)


# --------------------------------------------------------------------------- visitor
def read_wav_16k(path: Path) -> Any:
    """A checked 16-bit PCM WAV file (any rate, mono or stereo) as 16 kHz mono int16."""
    import numpy as np

    from sonic_voice.emulators.sonic.audio import load_wav

    return np.frombuffer(load_wav(path, MIC_RATE), "<i2")


def synthesize(text: str, voice: str) -> Any:
    """The visitor's line in ``voice`` (an espeak-ng language), 16 kHz mono int16."""
    import asyncio

    import numpy as np

    from sonic_voice.emulators.sonic import audio as synth

    if not synth.espeak_available():
        raise StartupError(
            "espeak-ng is not installed (sudo apt-get install espeak-ng), so the visitor "
            "cannot speak: give recordings with --wav FILE"
        )
    return np.frombuffer(asyncio.run(synth.synthesize(text, voice, 160, MIC_RATE)), "<i2")


def visitor_lines(scenario_path: Path, wavs: list[Path]) -> list[tuple[str, Any]]:
    """(text, audio) for each speech turn of the scenario, in order."""
    import numpy as np

    from sonic_voice.emulators.sonic.scenario import Scenario

    lines = []
    turns = [t for t in Scenario.load(scenario_path).turns if t.on in ("speech", "any")]
    for i, turn in enumerate(turns):
        if i < len(wavs):
            text, audio = f"(your recording {wavs[i].name})", read_wav_16k(wavs[i])
        else:
            text, audio = turn.user or "", synthesize(turn.user or "", turn.voice)
        pad = np.zeros(MIC_RATE // 4, np.int16)
        lines.append((text, np.concatenate([pad, audio, pad])))
    return lines


def scenario_path(args: argparse.Namespace) -> Path:
    """The stand-in's scenario: ``--scenario`` or the shipped offline demo."""
    return Path(args.scenario or config_dir() / "scenarios" / "offline_demo.yaml")


# --------------------------------------------------------------------------- stand-ins
class Offline:
    """The pieces the offline demo starts besides the nodes (all stopped on exit)."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stack = contextlib.ExitStack()
        self.audio: Any = None
        self.emu: Any = None
        self.kvs: Any = None
        self.viewer_url = ""
        self.page_url = ""

    def __enter__(self) -> Offline:
        try:
            self._start()
        except BaseException:
            self.stack.close()
            raise
        return self

    def _start(self) -> None:
        from sonic_voice.emulators.sonic.server import (
            DEFAULT_ACCESS_KEY,
            DEFAULT_SECRET_KEY,
            EmulatorThread,
        )

        # The stand-in's throwaway keys, for this process only: the session signs with them
        # through botocore's environment provider, exactly as it would with real keys.
        os.environ["AWS_ACCESS_KEY_ID"] = DEFAULT_ACCESS_KEY
        os.environ["AWS_SECRET_ACCESS_KEY"] = DEFAULT_SECRET_KEY
        os.environ.pop("AWS_SESSION_TOKEN", None)
        os.environ.pop("AWS_PROFILE", None)
        self.emu = self.stack.enter_context(
            EmulatorThread(scenario=str(scenario_path(self.args)), realtime=True)
        )
        if self.args.kvs_channel:
            # Remote visitors too: the KVS stand-in (control plane + signaling) and the
            # viewer page, so a browser on this machine can join the conversation.
            from sonic_voice.emulators.kvs import KvsEmulatorThread
            from sonic_voice.web import serve_in_thread

            self.kvs = self.stack.enter_context(
                KvsEmulatorThread(channels=(self.args.kvs_channel,))
            )
            server, url = serve_in_thread()
            self.stack.callback(server.shutdown)
            self.page_url = url
            em = self.kvs.emulator
            self.viewer_url = (
                f"{url}?endpoint={em.endpoint_url}&channel={self.args.kvs_channel}"
                f"&region={em.region}"
            )

    def start_audio(self) -> None:
        """The private PulseAudio server (virtual microphone and speaker), unless real
        devices are asked for or there is no local audio."""
        if not self.args.real_devices and not self.args.no_local_audio:
            from sonic_voice.audio.virtual import VirtualAudio

            self.audio = self.stack.enter_context(contextlib.closing(VirtualAudio()))
            self.audio.export()
            self.audio.warm_up()

    def __exit__(self, *exc: object) -> None:
        self.stack.close()


# --------------------------------------------------------------------------- the demo
def run_offline(args: argparse.Namespace, graph: Graph, stop: Any) -> int:
    """The offline demo conversation, end to end. Returns the exit status."""
    scenario = scenario_path(args)
    run = RunLog()
    log.info("sonic_voice offline demo: no AWS configuration, using the local stand-ins")
    log.info("  ROS graph: %s (the demo's goals cannot reach another robot)", graph.how)
    log.info("  the Bedrock stand-in is scripted: it answers each utterance's sound, not words")
    if args.no_local_audio:
        log.info("  no local audio: the scripted visitor stays silent (join with a browser)")
    cfg = config_dir()
    with Offline(args) as off:
        stack = Stack(args.params_file, domain_id=graph.domain_id)
        stack.runtime.stop_requested = stop
        ok = False
        watch: GraphWatch | None = None
        try:
            monitor = stack.add(make_monitor(run, stack.context))
            # Discovery usually takes 0.25 s and sometimes 3 s: in a shared domain, look that
            # long before trusting that nobody else serves navigation there.
            check_graph(monitor, graph, 3.0 if graph.domain_id is not None else 0.3)
            log.info("  Bedrock stand-in at %s", off.emu.endpoint_uri)
            session_params: dict[str, Any] = dict(
                endpoint_uri=off.emu.endpoint_uri,
                ca_bundle=off.emu.ca_file,
                region=off.emu.emulator.region,
                aws_profile="",
                tools_file=args.tools_file or str(cfg / "tools.yaml"),
                locations_file=args.locations_file or str(cfg / "locations.yaml"),
                # A viewer joining (--kvs-channel) is greeted; a visitor who speaks first
                # is answered (docs/conversation-lifecycle.md).
                greeting="A visitor has just walked up to you. Greet them.",
                # The demo starts idle (no Bedrock stream), engages when the visitor speaks
                # and shows the release: a short idle timeout.
                always_on=False,
                idle_timeout_s=DEMO_IDLE_TIMEOUT_S,
            )
            # The session's settings are checked first: a mistake there is said at once,
            # before the audio server and the visitor's voice are prepared.
            session = stack.node("sonic_session", _given(args, session_params))
            session.get_logger().set_level(30)  # transcripts: the monitor prints them
            stack.configure("sonic_session")
            lines = [] if args.no_local_audio else visitor_lines(scenario, args.wav)
            log.info("  scenario %s: %d visitor line(s)", scenario, len(lines))
            off.start_audio()
            if not args.no_local_audio:
                # One process holds every node here (one GIL): a little more device latency
                # keeps the virtual devices from underrunning on a busy machine.
                stack.node("audio_io", {"latency": "0.05", "output_block_ms": 20.0})
            base = stack.node(
                "sim_base",
                {
                    "locations_file": session_params["locations_file"],
                    "linear_speed": DEMO_BASE_SPEED,
                },
            )
            kvs = None
            if off.kvs is not None:
                kvs = stack.node(
                    "kvs_webrtc",
                    {
                        "channel_name": args.kvs_channel,
                        "endpoint_url": off.kvs.emulator.endpoint_url,
                        "region": off.kvs.emulator.region,
                        "ice_servers": "[]",  # host candidates only: all on this machine
                        "invite_page_url": off.page_url,
                    },
                )
                log.info(
                    "  KVS stand-in at %s; a browser can join at", off.kvs.emulator.endpoint_url
                )
                log.info("  %s (any access key and secret)", off.viewer_url)
            stack.start()
            if graph.domain_id is not None:  # a network namespace: nobody can join
                # From here on the demo has all its nodes (a node shows in the graph before
                # the stack lists it); whoever joined since check_graph is still seen.
                ours = {n.get_fully_qualified_name() for n in stack.runtime.nodes}
                watch = GraphWatch(monitor, graph, ours, stack.runtime.stop_requested)
            if kvs is not None:
                print_invite(kvs)
            ok = _converse(run, off, stack, base, lines, args, session)
            if ok and args.stay:
                log.info("%s  scripted conversation done; still running (Ctrl-C)", run.t())
                while not stack.runtime.wait(0.5) and not session.fatal_error:
                    pass
            if not ok and not stack.runtime.stop_requested.is_set():
                _stand_in_report(off)
            _summary(run, base, ok, session)
        finally:
            if watch is not None:
                watch.close()
            took = stack.close()
            log.debug("nodes stopped in %.2f s", took)
    if watch is not None and watch.stranger:
        raise StartupError(watch.message())
    if stack.runtime.stop_requested.is_set() and not ok:
        return 130
    return 0 if ok else 1


def print_invite(kvs: Any) -> None:
    """A guest's join link and its QR code (no AWS keys needed; docs/web-viewer.md)."""
    from sonic_voice.kvs.invite import qr_text

    try:
        invite = kvs.mint_invite()
    except Exception as e:  # noqa: BLE001 - the rest of the run does not need it
        log.warning("  no guest invite: %s", e)
        return
    log.info("  guests join with this link (valid %d s, no keys):", kvs.params.invite_expires_s)
    log.info("  %s", invite.url)
    log.info("%s", qr_text(invite.url))


_tick: Any = None  # the demo's once-a-second housekeeping while it waits


def _given(args: argparse.Namespace, values: dict[str, Any]) -> dict[str, Any]:
    for key, arg in (
        ("model_id", args.model),
        ("voice_id", args.voice),
        ("language", args.language),
    ):
        if arg:
            values[key] = arg
    return values


def _wait(pred: Any, limit: float, stack: Stack, step: float = 0.05) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if _tick is not None:
            _tick()
        if pred():
            return True
        if stack.fatal_errors():
            return False
        if stack.runtime.wait(step):  # a signal: stop now
            return False
    return False


def _settled(run: RunLog, quiet_s: float = 0.8) -> Any:
    """True once the robot is back to listening (or to an errand, e.g. driving) and has
    been for ``quiet_s``."""
    since: list[float] = []

    def pred() -> bool:
        if run.last_state() not in ("listening", "acting"):
            since.clear()
            return False
        if not since:
            since.append(time.monotonic())
        return time.monotonic() - since[0] >= quiet_s

    return pred


def _converse(
    run: RunLog,
    off: Offline,
    stack: Stack,
    base: Any,
    lines: list,
    args: argparse.Namespace,
    session: Any = None,
) -> bool:
    global _tick
    limit = args.duration or DEMO_LIMIT_S
    end = time.monotonic() + limit
    pos: list[float] = []
    next_log = [0.0]

    def tick() -> None:  # a "base" line a second while it moves
        if time.monotonic() >= next_log[0]:
            next_log[0] = time.monotonic() + 1.0
            log_base(run, base, pos)

    _tick = tick

    def left() -> float:
        return max(0.0, end - time.monotonic())

    # The robot waits, idle, with no Bedrock stream; the visitor's first words engage it.
    if not _wait(lambda: run.last_state() == "idle", left(), stack):
        return _fail(run, stack, "the robot never became ready")
    log.info("%s  (robot idle: no Bedrock stream until someone speaks to it)", run.t())
    for i, (text, audio) in enumerate(lines):
        answered = len(run.finals("ASSISTANT"))
        before = _tool_ids(run, "start")
        log.info("%s  (visitor speaks into the microphone: %s)", run.t(), text)
        if not _play(off, audio, stack):
            return _fail(run, stack, "the visitor's audio could not be played")
        if not _wait(lambda n=answered: len(run.finals("ASSISTANT")) > n, left(), stack):
            return _fail(run, stack, f"no answer to visitor line {i + 1}")
        # Tools this line started end before the next line, except an errand still on its
        # way (navigation): the conversation goes on while it runs.
        while not _wait(_tools_done(run, before), 1.0, stack):
            if left() <= 0 or stack.runtime.stop_requested.is_set() or stack.fatal_errors():
                return _fail(run, stack, "a tool call did not finish")
        if not _wait(_settled(run), left(), stack):
            return _fail(run, stack, "the robot did not finish speaking")
    while not _wait(_tools_done(run, set(), errands_go_on=False), 1.0, stack):  # all ended
        if left() <= 0 or stack.runtime.stop_requested.is_set() or stack.fatal_errors():
            return _fail(run, stack, "a tool call did not finish")
    log_base(run, base, pos)
    if lines and session is not None and not session.params.always_on:
        # Nobody speaks any more: the conversation is released after idle_timeout_s.
        released = _wait(lambda: run.last_state() == "idle", left(), stack)
        if released:
            log.info(
                "%s  (conversation released after %.0f s without speech: stream closed)",
                run.t(),
                session.params.idle_timeout_s,
            )
    with run.lock:  # a call the visitor stopped ("cancelled") is not a failure
        failed = [
            e
            for e in run.tool_events
            if e.get("event") == "result" and e.get("status") not in ("ok", "cancelled")
        ]
    if failed:
        return _fail(run, stack, f"tool call(s) failed: {[_short(e) for e in failed]}")
    return True


def _play(off: Offline, audio: Any, stack: Stack) -> bool:
    """Play one visitor line into the microphone; False when it could not finish (stalled
    audio server, a signal) rather than an exception."""
    if off.audio is None:
        import sounddevice as sd

        sd.play(audio, MIC_RATE, blocking=True)
        return True
    proc = off.audio.play_into_mic(audio, MIC_RATE)
    deadline = time.monotonic() + len(audio) / MIC_RATE + 15
    while proc.poll() is None:
        if time.monotonic() > deadline or stack.runtime.wait(0.05):
            proc.kill()
            proc.wait()
            return False
    return proc.returncode == 0


def _tool_ids(run: RunLog, event: str) -> set[str]:
    with run.lock:
        return {e.get("tool_use_id", "") for e in run.tool_events if e.get("event") == event}


ERRANDS = ("navigate_to",)  # the demo's tools that may go on while the visitor talks


def _tools_done(run: RunLog, before: set[str], errands_go_on: bool = True) -> Any:
    """Every tool started since ``before`` has ended, except errands still on their way
    (when ``errands_go_on``)."""

    def pred() -> bool:
        with run.lock:
            started = {e.get("tool_use_id", ""): e.get("tool") for e in run.tool_events
                       if e.get("event") == "start"}  # fmt: skip
            ended = {e.get("tool_use_id", "") for e in run.tool_events
                     if e.get("event") == "result"}  # fmt: skip
        return not [
            i for i, tool in started.items()
            if i not in ended and i not in before and not (errands_go_on and tool in ERRANDS)
        ]  # fmt: skip

    return pred


def _fail(run: RunLog, stack: Stack, why: str) -> bool:
    if stack.runtime.stop_requested.is_set():
        log.info("%s  stopped (%s)", run.t(), stack.runtime.signal_name or "signal")
        return False
    fatal = "; ".join(stack.fatal_errors().values())
    log.error("%s  demo failed: %s%s", run.t(), why, f" ({fatal})" if fatal else "")
    return False


def _stand_in_report(off: Offline) -> None:
    import numpy as np

    for r in off.emu.records:
        pcm = np.frombuffer(bytes(r.pcm), "<i2").astype(np.float32)
        blocks = pcm[: len(pcm) // 1600 * 1600].reshape(-1, 1600)
        level = 20 * np.log10(np.sqrt((blocks**2).mean(axis=1)) / 32768 + 1e-9)
        log.error(
            "  stand-in stream %d: %d audio frames, %d utterance(s) heard, loudest "
            "0.1 s of input %.1f dBFS",
            r.index, r.audio_frames, r.utterances, level.max() if len(level) else -200,
        )  # fmt: skip


def _summary(run: RunLog, base: Any, ok: bool, session: Any = None) -> None:
    users, robot = run.finals("USER"), run.finals("ASSISTANT")
    with run.lock:
        results = [e for e in run.tool_events if e.get("event") == "result"]
    log.info("-" * 72)
    log.info("summary (%.1f s)", time.monotonic() - run.started)
    for e in users:
        if not e.get("interactive"):
            log.info("  visitor [%s]: %s", guess_language(e["text"]) or "?", e["text"])
    for e in robot:
        log.info("  robot   [%s]: %s", guess_language(e["text"]) or "?", e["text"])
    for e in results:
        log.info("  tool %s -> %s %s", e.get("tool"), e.get("status"), _short(e.get("result", {})))
    log.info(
        "  base at (%.2f, %.2f), drove %.2f m",
        getattr(base, "x", 0.0),
        getattr(base, "y", 0.0),
        getattr(base, "odometer", 0.0),
    )
    if session is not None:
        log.info("  %s", cost_line(session))
    log.info("demo %s", "completed" if ok else "FAILED")


def cost_line(session: Any) -> str:
    """Streamed seconds, tokens and the estimated cost of the run (the session's ledger,
    prices from its price_* parameters)."""
    total = session.ledger.overall()
    return (
        f"cost: {total['conversations']} conversation(s), {total['streamed_s']:.1f} s "
        f"streamed, {total['input_tokens']} input + {total['output_tokens']} output tokens "
        f"(speech {total['speech_input']}/{total['speech_output']}), "
        f"estimated ${total['cost_usd']:.4f} at the configured prices"
    )


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) < 160 else text[:157] + "..."
