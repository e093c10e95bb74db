"""CPU of the whole robot stack in a conversation with one remote viewer (issue 10: <= 20 %
of one core), and while it listens with nobody there.

The robot is the stack the runner builds online (``sonic_voice.app.cli.run_online``:
``sonic_voice.app.stack.Stack`` with the monitor, audio_io, kvs_webrtc and sonic_session
with the tools of config/tools.yaml; one process, one bridge, config/<node>.yaml defaults),
in a process of its own (``cpu_stack.py --robot``), pointed by parameter overrides at
stand-ins that run in processes of their own, so their work is not counted. (Not the
runner itself: the stand-ins' settings would reach it through a params file, and its type
check, which reads params files with rclpy's reader, takes the string ``"[]"`` of
``ice_servers`` for an empty list and refuses it.)

- the Nova Sonic stand-in (``python -m sonic_voice.emulators.sonic``, real HTTP/2 + TLS +
  SigV4 + event stream) with a looping scenario: each utterance it hears is answered with
  3 s of audio;
- the KVS signaling stand-in (``python -m sonic_voice.emulators.kvs``);
- a private PulseAudio server (virtual microphone and speaker; ``sonic_voice.audio.virtual``)
  for audio_io, which captures and plays as on a robot;
- the visitor speaks 2 s, waits for the robot's answer, and speaks again, for the whole
  window, on a fixed schedule: one utterance every 6.5 s (``--period``; the answer's final
  transcript comes 5.5 s after the utterance starts, its tail plays 0.5 s more, 0.5 s is
  slack), later only when the answer comes later (counted as "late"). So a busy machine
  does the same work in the window as a quiet one (when the next utterance followed each
  answer, a busy machine fitted fewer exchanges and read 1-2 points lower for it). It
  speaks into the robot's microphone (one long-lived ``pacat``; ``input_source: local``)
  while the viewer, aiortc in this process (``test/harness/viewer.py``, the browser's
  part), is connected, hears the answers and sends its microphone track (silence); or,
  with ``--visitor viewer``, the viewer speaks (``input_source: auto``). Both cost the
  robot the same within a few % (44 % and 42 % in two runs here); the default is the mic
  because the viewer's speech is sometimes lost on the robot's side (the adaptive jitter
  buffer stuck calling every packet late, seen here under load).

Measured: utime + stime of the runner's process (every thread) from /proc/<pid>/stat over
a steady window, as % of one core. PulseAudio's share is printed beside it and NOT counted
in the stack's figure: on a robot it is the system's sound server (with a real card instead
of null sinks), and its work is mostly the device clock; ``cpu_stack_plus_pulseaudio_*``
gives the sum. A run whose viewer does not hear the robot answer at least twice in the
window fails instead of printing figures.

Run: ``.venv/bin/python bench/cpu_stack.py [--window 30] [--period 6.5] [--idle-window 10]
[--threads]`` (~1.5 min). ``--threads`` also prints the stack's CPU by thread name (Python
threads get their name as OS name in the child; ``main`` is also the native threads started
from the main thread, e.g. PortAudio's callbacks; ``threaded-ml`` is libpulse's).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import ROOT, cpu_seconds, figure, isolate, setup_path

CHANNEL = "bench"
GOAL = "<= 20 %"
SCENARIO = """
name: cpu_bench
loop: true
vad: {threshold_dbfs: -35, min_speech_ms: 60, end_silence_ms: 600}
audio: {chunk_ms: 40, lead_ms: 200}
turns:
  - on: any
    user: Where is the reception, please?
    say: The reception is to your left, next to the entrance.
    audio: {tone: {freq: 330, duration_s: 3.0, amp: 0.3}}
"""


def start(cmd: list[str], env: dict[str, str], log: Path, pipe: bool = True) -> subprocess.Popen:
    """A process with stderr (and stdout unless ``pipe``: then read by :func:`read_until`,
    for stand-ins that print where they listen and little else) in ``log``."""
    with open(log, "wb") as f:
        return subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE if pipe else f,
            stderr=f,
            cwd=str(ROOT),
            text=True,
        )


def read_until(proc: subprocess.Popen, pred: Any, what: str, timeout: float = 60) -> str:
    """The first stdout line of ``proc`` for which ``pred(line)`` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise SystemExit(f"{what} exited before it was ready (rc {proc.poll()})")
        if pred(line):
            return line.strip()
    raise SystemExit(f"{what} not ready in {timeout:.0f} s")


def thread_seconds(pid: int) -> dict[str, float]:
    """utime + stime so far of each thread of ``pid``, summed by thread name (threads of one
    name, e.g. an executor's workers, are one line)."""
    out: dict[str, float] = {}
    tck = os.sysconf("SC_CLK_TCK")
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return out
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                head, tail = f.read().rsplit(")", 1)
        except OSError:
            continue  # ended meanwhile
        name = head.split("(", 1)[1]
        fields = tail.split()
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tck
    return out


class Usage:
    """CPU seconds of some processes between :meth:`start` and :meth:`stop`, and of the
    threads of one of them (``threads_of``) by thread name."""

    def __init__(self, pids: dict[str, int], threads_of: str = "") -> None:
        self.pids = pids
        self.threads_of = threads_of
        self.t0 = 0.0
        self.c0: dict[str, float] = {}
        self.th0: dict[str, float] = {}
        self.share: dict[str, float] = {}
        self.threads: dict[str, float] = {}

    def start(self) -> None:
        self.c0 = {k: cpu_seconds(p) for k, p in self.pids.items()}
        if self.threads_of:
            self.th0 = thread_seconds(self.pids[self.threads_of])
        self.t0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.t0
        self.share = {k: (cpu_seconds(p) - self.c0[k]) / wall * 100 for k, p in self.pids.items()}
        if self.threads_of:
            now = thread_seconds(self.pids[self.threads_of])
            self.threads = {
                k: (v - self.th0.get(k, 0.0)) / wall * 100 for k, v in now.items()
            }  # threads that ended inside the window are not counted here
        return self.share


def print_threads(label: str, threads: dict[str, float]) -> None:
    """The stack's threads by CPU, largest first (those under 0.1 % summed)."""
    rows = sorted(threads.items(), key=lambda kv: -kv[1])
    small = sum(v for _, v in rows if v < 0.1)
    text = ", ".join(f"{k} {v:.1f}" for k, v in rows if v >= 0.1)
    print(f"cpu_stack threads, {label} (% of one core): {text}, others {small:.1f}")


def name_os_threads() -> None:
    """Give each Python thread started from now on its Python name as its OS name (first 15
    bytes; /proc/<pid>/task/<tid>/comm), so the per-thread figures say which is which
    (Python 3.12 does not; threads of C libraries keep the names they set)."""
    import ctypes
    import threading

    libc = ctypes.CDLL(None, use_errno=True)
    inner = threading.Thread._bootstrap_inner  # type: ignore[attr-defined]

    def named(self: threading.Thread) -> None:
        libc.prctl(15, self.name.encode()[:15], 0, 0, 0)  # PR_SET_NAME
        inner(self)

    threading.Thread._bootstrap_inner = named  # type: ignore[attr-defined]
    libc.prctl(15, b"main", 0, 0, 0)


def robot(overrides: dict[str, dict[str, Any]]) -> int:
    """Child process: the stack as ``run_online`` builds it, until SIGINT."""
    import logging

    name_os_threads()

    from sonic_voice.app.monitor import RunLog, make_monitor
    from sonic_voice.app.stack import Stack
    from sonic_voice.ros.bridge import Bridge

    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    for noisy in ("botocore", "boto3", "aiortc", "aioice", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    stack = Stack([])
    stack.runtime.handle_signals()
    try:
        stack.add(make_monitor(RunLog(), stack.context))
        stack.node("audio_io", overrides.get("audio_io"))
        stack.node("kvs_webrtc", overrides["kvs_webrtc"])
        node = stack.node("sonic_session", overrides["sonic_session"])
        node.get_logger().set_level(30)  # transcripts: the monitor prints them (as the runner)
        kvs = stack.nodes["kvs_webrtc"]
        stack.start()
        tick = time.monotonic()
        while not stack.runtime.wait(0.2):
            if time.monotonic() - tick > 5:  # for the log: what flows
                tick = time.monotonic()
                print(
                    f"bench: viewers {node._viewers}, source {node._active_source()}, frames "
                    f"into the session {node.mic_frames}, audio/remote blocks "
                    f"{kvs.remote_blocks}, audio/out chunks {node.out_chunks}",
                    flush=True,
                )
            if stack.fatal_errors():
                print(f"fatal: {stack.fatal_errors()}", flush=True)
                return 1
        return 0
    finally:
        stack.close()
        Bridge.close_process_bridge()


class MicFeed:
    """The visitor at the robot's microphone: one ``pacat`` into the virtual microphone for
    the whole run, fed 20 ms at a time in real time (speech when queued, else silence). One
    stream that never ends: a ``pacat`` per line busy-loops once its input ends (~2 CPU-s
    per line, measured on this project's 2-core machine), which would disturb the
    measurement."""

    RATE = 16000
    BLOCK = 320  # 20 ms

    def __init__(self, audio: Any) -> None:
        import threading

        import numpy as np

        self._np = np
        self.proc = subprocess.Popen(
            ["pacat", "--playback", "-d", "micfeed", "--raw", "--format=s16le",
             f"--rate={self.RATE}", "--channels=1", "--latency-msec=60"],
            env=audio.client_env(),
            stdin=subprocess.PIPE,
        )  # fmt: skip
        self._queue = np.zeros(0, np.int16)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mic-feed", daemon=True)
        self._thread.start()

    def say(self, samples: Any) -> None:
        with self._lock:
            self._queue = self._np.concatenate([self._queue, samples.astype(self._np.int16)])

    def _run(self) -> None:
        silence = bytes(2 * self.BLOCK)
        t = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                block, self._queue = self._queue[: self.BLOCK], self._queue[self.BLOCK :]
            data = block.tobytes() + silence[2 * len(block) :]
            try:
                self.proc.stdin.write(data)
                self.proc.stdin.flush()
            except (BrokenPipeError, ValueError):
                return
            t += self.BLOCK / self.RATE
            time.sleep(max(0.0, t - time.monotonic()))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.proc.kill()
        self.proc.wait()


def answers(viewer: Any) -> int:
    return sum(
        m.get("type") == "transcript" and m.get("role") == "ASSISTANT" and m.get("stage") == "FINAL"
        for m in viewer.messages
    )


async def converse(
    say: Any, viewer: Any, speech: Any, until: float, wait_s: float = 15.0, period: float = 0.0
) -> tuple[int, int, list[float]]:
    """The visitor's side: speak (``say``), wait until the viewer has the answer's
    transcript, again, until ``until`` (at least once). With ``period``, each utterance
    starts ``period`` s after the one before (a fixed schedule: the same work in the window
    on a fast and a slow machine), or 0.5 s after the answer when that comes later; else
    0.5 s after the answer. Returns (answers heard, utterances started late, seconds from
    each utterance's start to its answer's final transcript at the viewer)."""
    heard = late = 0
    answer_s: list[float] = []
    start = time.monotonic()
    while True:
        before = answers(viewer)
        said = time.monotonic()
        say(speech)
        deadline = said + wait_s
        while answers(viewer) == before and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(0.05)  # data-channel messages: no event per kind
        if answers(viewer) > before:
            heard += 1
            answer_s.append(time.monotonic() - said)
        ready = time.monotonic() + 0.5  # the answer's tail plays out
        if period > 0:
            start += period
            if ready > start:
                late += 1
                start = ready
            ready = start
        if ready >= until:
            return heard, late, answer_s
        await asyncio.sleep(ready - time.monotonic())


def state_watch(domain_id: int) -> tuple[Any, list[str]]:
    """The robot's latched ``state`` topic, watched from this process (its cost is the
    runner's publishing one small message per state change)."""
    from sonic_voice import contracts as c
    from sonic_voice.ros.topics import subscription

    from test.harness.ros import RosGraph

    graph = RosGraph(domain_id=domain_id, executor="single")
    states: list[str] = []
    node = graph.node("cpu_bench_watch")
    subscription(node, c.STATE, lambda msg: states.append(json.loads(msg.data)["state"]))
    return graph, states


async def run(args: argparse.Namespace) -> dict[str, float]:
    from sonic_voice.audio.virtual import VirtualAudio
    from sonic_voice.emulators.sonic import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY

    from test.harness.ros import wait_for
    from test.harness.signals import speech_like
    from test.harness.viewer import Viewer

    tmp = Path(tempfile.mkdtemp(prefix="sv-cpu-"))
    domain = random.randint(1, 100)
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "ROS_DOMAIN_ID": str(domain),
        "ROS_HOME": str(tmp / "ros"),
        "ROS_LOG_DIR": str(tmp / "ros" / "log"),
        "AWS_CONFIG_FILE": str(tmp / "aws-config-none"),
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp / "aws-credentials-none"),
        "AWS_EC2_METADATA_DISABLED": "true",
        "AWS_ACCESS_KEY_ID": DEFAULT_ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": DEFAULT_SECRET_KEY,
    }
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        env.pop(var, None)
    (tmp / "scenario.yaml").write_text(SCENARIO)
    procs: list[subprocess.Popen] = []
    audio = VirtualAudio()
    graph = viewer = feed = None
    ok = False
    try:
        sonic = start(
            [sys.executable, "-m", "sonic_voice.emulators.sonic",
             "--scenario", str(tmp / "scenario.yaml"), "--session-limit-s", "0", "-v"],
            env, tmp / "sonic.log",
        )  # fmt: skip
        procs.append(sonic)
        endpoint = read_until(
            sonic, lambda s: s.startswith("endpoint_uri:"), "the Bedrock stand-in"
        )
        ca_file = read_until(sonic, lambda s: s.startswith("ca_file:"), "the Bedrock stand-in")
        kvs = start(
            [sys.executable, "-m", "sonic_voice.emulators.kvs", "--channel", CHANNEL],
            env, tmp / "kvs.log",
        )  # fmt: skip
        procs.append(kvs)
        kvs_info = json.loads(read_until(kvs, lambda s: s.startswith("{"), "the KVS stand-in"))
        cfg = ROOT / "config"
        overrides = {
            "sonic_session": {
                "endpoint_uri": endpoint.split(": ", 1)[1],
                "ca_bundle": ca_file.split(": ", 1)[1],
                "region": "us-east-1",
                "tools_file": str(cfg / "tools.yaml"),
                "locations_file": str(cfg / "locations.yaml"),
                # A conversation the whole time (the conversation lifecycle would otherwise
                # start idle, with no stream: docs/conversation-lifecycle.md).
                "always_on": True,
                # The visitor at the microphone is heard while the viewer is connected.
                **({"input_source": "local"} if args.visitor == "mic" else {}),
            },
            "kvs_webrtc": {
                "channel_name": CHANNEL,
                "endpoint_url": kvs_info["endpoint_url"],
                "region": kvs_info["region"],
                "ice_servers": "[]",  # host candidates only: all on this machine
                **({"opus_pause_in_silence": True} if args.pause_in_silence else {}),
            },
        }
        robot = start(
            [sys.executable, __file__, "--robot", json.dumps(overrides)],
            {**env, **audio.env},
            tmp / "robot.log",
            pipe=False,
        )
        procs.append(robot)
        graph, states = state_watch(domain)
        if not wait_for(lambda: "listening" in states, 60):
            raise SystemExit(f"the robot did not start listening: states {states}")
        usage = Usage({"stack": robot.pid, "pulseaudio": audio.proc.pid}, "stack")
        await asyncio.sleep(3.0)  # start-up work done
        usage.start()
        await asyncio.sleep(args.idle_window)
        idle = usage.stop()
        idle_threads = usage.threads

        viewer = await Viewer(kvs_info["endpoint_url"], CHANNEL, "cpu-bench-viewer").join()
        if args.visitor == "viewer":
            say = viewer.say
        else:
            feed = MicFeed(audio)
            say = feed.say
        speech = speech_like(2.0, 16000, seed=3)
        await asyncio.sleep(1.0)  # the viewer's audio is flowing before it speaks
        for _ in range(4):  # one exchange before measuring (on a busy machine the stand-in
            if (await converse(say, viewer, speech, 0.0, 10.0))[0]:  # may miss an utterance)
                break
        else:
            kinds = sorted({str(m.get("type")) for m in viewer.messages})
            raise SystemExit(
                f"the robot did not answer the viewer (data-channel messages: {kinds}; "
                f"state: {states[-1:]}; logs in {tmp})"
            )
        usage.start()
        heard, late, answer_s = await converse(
            say, viewer, speech, time.monotonic() + args.window, period=args.period
        )
        talk = usage.stop()
        if args.threads:
            print_threads("idle listening", idle_threads)
            print_threads("conversation", usage.threads)
        if heard < 2:
            raise SystemExit(f"only {heard} answer(s) heard by the viewer in the window")
        print(
            "cpu_stack: the runner's stack (audio_io, sonic_session + tools, kvs_webrtc, "
            f"monitor) in one process; stand-ins, PulseAudio and the viewer in others. Idle window "
            f"{args.idle_window:g} s; conversation window {args.window:g} s with one viewer, "
            f"{heard} exchange(s) (2 s of speech from the {args.visitor}, a 3 s answer; "
            + (
                f"one every {args.period:g} s, {late} started late: the answer came after the slot"
                if args.period > 0
                else "each 0.5 s after the answer"
            )
            + f"; answer's final transcript {min(answer_s):.2f}-{max(answer_s):.2f} s after "
            "the utterance began). Load "
            f"average {os.getloadavg()[0]:.2f} (on a busy machine CPU time grows with cache "
            "misses and context switches, and varies run to run: rerun at a quiet moment)."
        )
        ok = True
        return {
            "idle": idle["stack"],
            "idle_pulse": idle["pulseaudio"],
            "talk": talk["stack"],
            "talk_pulse": talk["pulseaudio"],
        }
    finally:
        if feed is not None:
            feed.close()
        if viewer is not None:
            await viewer.close()
        for p in reversed(procs):  # the robot first, while the stand-ins still answer
            if p.poll() is None:
                p.send_signal(signal.SIGINT)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:  # a stand-in's last words (its streams' records)
                (tmp / f"stand-in-{p.pid}.out").write_text(p.stdout.read())
        if graph is not None:
            graph.close()
        audio.close()
        if len(procs) == 3 and procs[-1].returncode not in (0, None):
            print(f"robot exited {procs[-1].returncode}; log in {tmp}/robot.log", file=sys.stderr)
        elif ok:
            if args.threads:  # what flowed (a run whose viewer audio stalled costs less)
                with contextlib.suppress(OSError):
                    lines = (tmp / "robot.log").read_text(errors="replace").splitlines()
                    print(next((x for x in reversed(lines) if x.startswith("bench:")), ""))
            shutil.rmtree(tmp, ignore_errors=True)  # kept (logs) when the run failed


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--window", type=float, default=30.0, help="conversation window, s")
    ap.add_argument(
        "--period",
        type=float,
        default=6.5,
        help="the visitor speaks every PERIOD s (default %(default)s: the pace of a quiet "
        "2-core machine, where the answer comes 5.5 s after the utterance starts, plus 0.5 "
        "s of tail and 0.5 s of slack), or 0.5 s "
        "after the answer when it comes later; 0: always 0.5 s after the answer (the work "
        "in the window then depends on the machine's speed)",
    )
    ap.add_argument("--idle-window", type=float, default=10.0, help="idle window, s")
    ap.add_argument(
        "--visitor",
        choices=["mic", "viewer"],
        default="mic",
        help="who speaks: a visitor at the robot's microphone while the viewer listens "
        "(default), or the viewer (fails while kvs/jitter.py can stay stuck calling every "
        "packet late: the viewer's speech then reaches the model as silence)",
    )
    ap.add_argument(
        "--pause-in-silence",
        action="store_true",
        help="kvs_webrtc's opus_pause_in_silence: nothing is sent to the viewer while the "
        "robot is silent",
    )
    ap.add_argument(
        "--threads", action="store_true", help="also print the stack's CPU by thread name"
    )
    ap.add_argument("--robot", help=argparse.SUPPRESS)  # the child: its overrides as JSON
    args = ap.parse_args()
    if args.robot:
        setup_path()
        sys.exit(robot(json.loads(args.robot)))
    isolate()
    setup_path()
    r = asyncio.run(run(args))
    figure("cpu_stack_idle_listening", r["idle"], "%")
    figure("cpu_pulseaudio_idle_listening", r["idle_pulse"], "%", "not counted above")
    figure("cpu_stack_conversation_one_viewer", r["talk"], "%", GOAL)
    figure("cpu_pulseaudio_conversation_one_viewer", r["talk_pulse"], "%", "not counted above")
    figure("cpu_stack_plus_pulseaudio_conversation_one_viewer", r["talk"] + r["talk_pulse"], "%")


if __name__ == "__main__":
    main()
