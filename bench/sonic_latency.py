"""Robot-side latency of the Nova Sonic session node, both ways, against the stand-in.

Everything runs in this process (one clock, ``time.perf_counter_ns``): the Bedrock
stand-in on its own loop thread, an isolated ROS graph whose executor spins the
sonic_session node and a bench node, the session's own asyncio loop. Real parts
throughout: rclpy/DDS, the SDK over awscrt HTTP/2 + TLS with SigV4 event signing.

- **uplink**: a 32 ms ``audio/mic`` message published (stamped just before ``publish``)
  -> its frame's last byte read from the HTTP/2 connection by the stand-in (its
  ``on_audio_input`` hook). Frames carry a sequence number in two samples, so each is
  matched exactly. Paced in real time, as a microphone delivers them.
- **uplink in process** (``uplink_in_process_*``): the same, from a publisher that hands
  frames to the session's subscription in-process (``ros/hotpath.py``), as audio_io does
  when the runner puts every node in one process; the plain ``uplink_*`` goes through DDS,
  as from audio_io in a process of its own (``ros2 launch``). Both publish serialized
  bytes, as audio_io does.
- **downlink**: the stand-in writes one 40 ms ``audioOutput`` (``push_audio_output``;
  stamped by its ``on_audio_output`` hook right after the write) -> that PCM arrives on
  ``audio/out`` at a subscriber. Paced in real time.

Also printed, to locate where time goes: the uplink's hops (publish -> the subscription
callback on the executor thread, which hands the message to the process's loop with one
``call_soon_threadsafe`` (``sonic_voice.ros.bridge``) -> the node's handler on the loop ->
the SDK send -> the stand-in), and whether TCP_NODELAY is set on the client's socket to the
stand-in (awscrt leaves Nagle on; the transport forces it off).

Goals (issue 10): uplink p99 <= 2.5 ms quiet and <= 10 ms under the standard background
load (``--load``, bench/_common.py: one busy process per core); downlink p99 <= 25 ms.

Measured on the 2-core development machine, ``--load off``, back-to-back pairs before ->
after input events were signed and framed by sonic/sdk_hooks.py (SDK send -> request
body 0.47 -> 0.15-0.19 ms p50) and handed to the SDK within the handler (loop -> SDK send
0.21 -> 0.14 ms p50): quiet (load average 0.2-0.5, 4 pairs) uplink p50 1.98-2.08 ->
1.65-1.84 ms, p99 2.49-5.09 -> 2.31-3.45 ms; busy (1.0-1.6, 5 pairs) p50 2.02-2.16 ->
1.61-1.81 ms, p99 3.3-12.9 -> 3.5-5.2 ms. The p99 is set by thread hand-overs (publish ->
executor -> loop; awscrt's thread reading the frame; the stand-in's process).

The stand-in runs in a process of its own by default, as the service is far away in
reality: its decoding and signature checks then do not compete with the robot's threads
for the GIL. Its stamps are ``perf_counter_ns`` too (CLOCK_MONOTONIC, one clock for every
process on the machine), collected from it at the end. ``--stand-in-here`` runs it in
this process instead (a harsher figure: the stand-in's work lands on the robot's CPU).

Run: ``.venv/bin/python bench/sonic_latency.py [N] [--stand-in-here] [--load both|off|on]``
(N samples per direction and phase, default 400; both phases by default, ~1 min).
``--rt PRIO`` runs this process (the robot's side) at SCHED_RR, the stand-in and the load
at normal priority: what a robot that gives its audio path priority gets.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import socket
import stat
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (
    LOADED,
    QUIET,
    Figures,
    add_load_option,
    add_rt_option,
    isolate,
    normal_priority,
    pct,
    phase,
    phases,
    real_time,
    setup_path,
)

WARMUP = 20
IN_FRAME = 512  # 32 ms at 16 kHz: audio_io's block and the session's chunk
OUT_FRAME = 960  # 40 ms at 24 kHz: the stand-in's (and the service's) output chunk


def tag_frame(n: int, seq: int) -> bytes:
    """A quiet frame whose first two samples carry ``seq`` (never all zero)."""
    import numpy as np

    f = np.zeros(n, np.int16)
    f[0], f[1] = 1 + seq % 997, 1 + seq // 997
    return f.tobytes()


def read_tag(pcm: bytes) -> int | None:
    import numpy as np

    a = np.frombuffer(pcm[:4], "<i2")
    if len(a) < 2 or a[0] <= 0 or a[1] <= 0:
        return None  # e.g. the node's silence filler
    return int(a[1] - 1) * 997 + int(a[0] - 1)


class StandIn:
    """The Bedrock stand-in with stamps: frame arrivals (``on_audio_input``) and output
    writes (``on_audio_output``), keyed by the frames' sequence numbers."""

    def __init__(self) -> None:
        from sonic_voice.emulators.sonic import EmulatorThread

        self.emu = EmulatorThread(scenario={"turns": []}, realtime=False).start()
        self.arrived: dict[int, int] = {}
        self.written: dict[int, int] = {}
        self.emu.on_audio_input(lambda rec, pcm, t: self._stamp(self.arrived, pcm, t))
        self.emu.on_audio_output(lambda rec, pcm, t: self._stamp(self.written, pcm, t))
        self.endpoint_uri, self.ca_file = self.emu.endpoint_uri, self.emu.ca_file

    @staticmethod
    def _stamp(store: dict[int, int], pcm: bytes, t_ns: int) -> None:
        seq = read_tag(pcm)
        if seq is not None:
            store[seq] = t_ns

    def push(self, pcm: bytes) -> None:
        self.emu.push_audio_output(pcm)

    def end(self) -> None:
        self.emu.call(self.emu.emulator.end_audio_output)

    def stamps(self) -> tuple[dict[int, int], dict[int, int]]:
        return dict(self.arrived), dict(self.written)

    def stop(self) -> None:
        self.emu.stop()


def _stand_in_process(conn: Any) -> None:
    """Child process: a StandIn driven over a pipe (push, end, stamps, stop)."""
    normal_priority()  # the service is far away: never the robot's real-time share
    stand_in = StandIn()
    conn.send((stand_in.endpoint_uri, stand_in.ca_file))
    while True:
        cmd, arg = conn.recv()
        if cmd == "push":
            stand_in.push(arg)
        elif cmd == "end":
            stand_in.end()
        elif cmd == "stamps":
            conn.send(stand_in.stamps())
        elif cmd == "stop":
            stand_in.stop()
            conn.send(None)
            return


class RemoteStandIn:
    """The same, in a child process (spawned: no rclpy or threads inherited)."""

    def __init__(self) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_stand_in_process, args=(child,), daemon=True)
        self.proc.start()
        if not self.conn.poll(60):
            raise SystemExit("the stand-in process did not start")
        self.endpoint_uri, self.ca_file = self.conn.recv()

    def push(self, pcm: bytes) -> None:
        self.conn.send(("push", pcm))

    def end(self) -> None:
        self.conn.send(("end", None))

    def stamps(self) -> tuple[dict[int, int], dict[int, int]]:
        self.conn.send(("stamps", None))
        return self.conn.recv()

    def stop(self) -> None:
        self.conn.send(("stop", None))
        self.conn.poll(30)
        self.proc.join(10)


def nodelay_on_client_sockets(port: int) -> list[int]:
    """TCP_NODELAY of this process's sockets connected to ``port`` (the client side)."""
    out = []
    for name in os.listdir("/proc/self/fd"):
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=os.dup(fd))
        except (OSError, ValueError):
            continue
        try:
            if s.family == socket.AF_INET and s.type == socket.SOCK_STREAM:
                if s.getpeername()[1] == port:
                    out.append(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
        except OSError:
            pass
        finally:
            s.close()
    return out


def ms(pairs: list[tuple[int, int]]) -> list[float]:
    return [(b - a) / 1e6 for a, b in pairs]


def measure_uplink(
    emu: Any,
    mic: Any,
    stages: dict[str, dict[int, int]],
    send_log: list,
    first: int,
    n: int,
    name: str = "uplink",
) -> dict[str, list[float]]:
    """``n`` tagged mic frames from sequence number ``first``, paced in real time; the
    warm-up frames are sent and left out. Published serialized, as audio_io does
    (ros/topics.py ``pcm_cdr``)."""
    from sonic_voice.ros.topics import uint8_multiarray_cdr

    total = n + WARMUP
    seqs = range(first, first + total)
    sent: dict[int, int] = {}
    period = IN_FRAME / 16000
    t0 = time.perf_counter()
    for k, i in enumerate(seqs):
        data = uint8_multiarray_cdr(tag_frame(IN_FRAME, i))
        sent[i] = time.perf_counter_ns()
        mic.publish(data)
        delay = t0 + (k + 1) * period - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    time.sleep(1.0)  # the last frames reach the stand-in
    arrived, _ = emu.stamps()
    missing = [i for i in seqs if i not in arrived]
    if missing:
        raise SystemExit(f"uplink: {len(missing)} frames never arrived")
    for t, event in send_log:
        body = json.loads(event)["event"]
        if "audioInput" in body:
            seq = read_tag(base64.b64decode(body["audioInput"]["content"])[:4])
            if seq is not None:
                stages["send"][seq] = t
    send_log.clear()
    keep = seqs[WARMUP:]
    return {
        f"{name}_hop_publish_to_subscription_callback": ms(
            [(sent[i], stages["cb"][i]) for i in keep]
        ),
        f"{name}_hop_callback_to_loop": ms([(stages["cb"][i], stages["loop"][i]) for i in keep]),
        f"{name}_hop_loop_to_sdk_send": ms([(stages["loop"][i], stages["send"][i]) for i in keep]),
        f"{name}_hop_sdk_send_to_stand_in": ms([(stages["send"][i], arrived[i]) for i in keep]),
        # The robot's side alone: until the frame is handed to the SDK (then awscrt's
        # thread writes it and the stand-in, standing for a service far away, reads it).
        f"{name}_mic_to_sdk_send": ms([(sent[i], stages["send"][i]) for i in keep]),
        f"{name}_mic_to_stand_in": ms([(sent[i], arrived[i]) for i in keep]),
    }


def measure_downlink(
    emu: Any, got_out: dict[int, int], first: int, n: int
) -> dict[str, list[float]]:
    """``n`` tagged 40 ms audioOutput chunks from the stand-in, paced in real time."""
    from test.harness.ros import wait_for

    total = n + WARMUP
    seqs = range(first, first + total)
    period = OUT_FRAME / 24000
    t0 = time.perf_counter()
    for k, i in enumerate(seqs):
        emu.push(tag_frame(OUT_FRAME, i))
        delay = t0 + (k + 1) * period - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    if not wait_for(lambda: all(i in got_out for i in seqs), 20):
        raise SystemExit(f"downlink: {sum(i not in got_out for i in seqs)} chunks never arrived")
    emu.end()
    _, written = emu.stamps()
    return {"downlink_stand_in_to_audio_out": ms([(written[i], got_out[i]) for i in seqs[WARMUP:]])}


GOALS = {
    "uplink_mic_to_stand_in": {QUIET: "<= 2.5 ms", LOADED: "<= 10 ms"},
    "uplink_in_process_mic_to_stand_in": {QUIET: "<= 2.5 ms", LOADED: "<= 10 ms"},
    "downlink_stand_in_to_audio_out": {QUIET: "<= 25 ms", LOADED: "<= 25 ms"},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("n", nargs="?", type=int, default=400, help="frames per direction and phase")
    ap.add_argument(
        "--stand-in-here", action="store_true", help="the stand-in in this process (harsher)"
    )
    add_load_option(ap)
    add_rt_option(ap)
    args = ap.parse_args()
    isolate()
    setup_path()
    real_time(args.rt)
    home = tempfile.mkdtemp(prefix="sv-bench-")
    os.environ.setdefault("ROS_HOME", home)
    os.environ.setdefault("ROS_LOG_DIR", os.path.join(home, "log"))
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(var, None)
    os.environ["AWS_CONFIG_FILE"] = os.path.join(home, "aws-config-none")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(home, "aws-credentials-none")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"

    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node
    from rclpy.parameter import Parameter
    from std_msgs.msg import UInt8MultiArray

    from sonic_voice.emulators.sonic import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY
    from sonic_voice.nodes.sonic_session import SonicSessionNode
    from sonic_voice.ros.hotpath import HotPath
    from sonic_voice.ros.topics import AUDIO_QOS, MIC_TOPIC, OUT_TOPIC

    from test.harness.ros import RosGraph, wait_for

    os.environ["AWS_ACCESS_KEY_ID"] = DEFAULT_ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = DEFAULT_SECRET_KEY
    here = args.stand_in_here
    if "CLOCK_MONOTONIC" not in time.get_clock_info("perf_counter").implementation:
        here = True  # stamps from two processes are comparable only on one system clock
    n = args.n

    emu = StandIn() if here else RemoteStandIn()
    graph = RosGraph(executor="single")  # as the runtime spins the nodes
    figs = Figures()
    try:
        node = SonicSessionNode(
            context=graph.context,
            parameter_overrides=[
                Parameter("endpoint_uri", value=emu.endpoint_uri),
                Parameter("ca_bundle", value=emu.ca_file),
                Parameter("always_on", value=True),
            ],
        )
        graph.add(node, bring_up=True)  # configure + activate, as the runner does
        bench = graph.node("sonic_bench")
        mic = bench.create_publisher(UInt8MultiArray, MIC_TOPIC, AUDIO_QOS)
        # audio_io in the same process (the runner): its publisher hands frames over
        # in-process (ros/hotpath.py); the plain one above goes through DDS, as from
        # audio_io in a process of its own (ros2 launch).
        mic_here = HotPath.of(graph.context).publisher(
            bench.create_publisher(UInt8MultiArray, MIC_TOPIC, AUDIO_QOS)
        )
        lock = threading.Lock()
        got_out: dict[int, int] = {}

        def on_out(msg: UInt8MultiArray) -> None:
            t = time.perf_counter_ns()
            seq = read_tag(bytes(msg.data[:4]))
            if seq is not None:
                with lock:
                    got_out[seq] = t

        # The listener on audio/out has an executor of its own, as a consumer in another
        # process would: its wake-up is not charged to the node.
        listener = Node("sonic_bench_out", context=graph.context)
        listener.create_subscription(UInt8MultiArray, OUT_TOPIC, on_out, AUDIO_QOS)
        listen = SingleThreadedExecutor(context=graph.context)
        listen.add_node(listener)
        threading.Thread(target=listen.spin, name="bench-out", daemon=True).start()
        if not wait_for(lambda: node._state == "listening" and mic.get_subscription_count(), 30):
            raise SystemExit(f"the session did not come up: {node._state} {node.last_error}")
        nodelay = nodelay_on_client_sockets(int(emu.endpoint_uri.rsplit(":", 1)[1]))

        # Stage stamps along the node's path (docs/architecture.md, "one audio frame"):
        # the executor thread's subscription callback (the bridge's hand-over), the loop's
        # handler, the SDK's send. Wrappers replace the callables the node calls.
        stages: dict[str, dict[int, int]] = {"cb": {}, "loop": {}, "send": {}}
        send_log: list[tuple[int, bytes]] = []  # (stamp, event JSON), decoded afterwards
        mic_name = MIC_TOPIC.lstrip("/")
        sub = next(s for s in node.subscriptions if s.topic_name.lstrip("/") == mic_name)
        hand_over = sub.callback

        def stamp_cb(msg: Any) -> None:
            seq = read_tag(bytes(msg.data[:4]))
            if seq is not None:
                stages["cb"][seq] = time.perf_counter_ns()
            hand_over(msg)

        sub.callback = stamp_cb
        on_audio = node._on_audio

        def stamp_loop(msg: Any, source: str) -> None:
            seq = read_tag(bytes(msg.data[:4]))
            if seq is not None:
                stages["loop"][seq] = time.perf_counter_ns()
            on_audio(msg, source)

        node._on_audio = stamp_loop
        stream = node.session._leg.stream
        send = stream.send

        async def stamp_send(event: bytes) -> None:
            send_log.append((time.perf_counter_ns(), event))
            await send(event)

        stream.send = stamp_send

        first = 0
        for name in phases(args.load):
            with phase(name) as info:
                up = measure_uplink(emu, mic, stages, send_log, first, n)
                first += n + WARMUP
                up |= measure_uplink(emu, mic_here, stages, send_log, first, n, "uplink_in_process")
                first += n + WARMUP
                down = measure_downlink(emu, got_out, first, n)
                first += n + WARMUP
            figs.phases.append(info)
            for key, values in {**up, **down}.items():
                goal = GOALS.get(key, {}).get(name, "")
                figs.add(name, f"{key}_p50", pct(values, 50), "ms")
                figs.add(name, f"{key}_p99", pct(values, 99), "ms", goal)
    finally:
        if "listen" in locals():
            listen.shutdown(timeout_sec=2)
        graph.close()
        emu.stop()

    where = "in this process" if here else "in its own process"
    print(f"sonic_latency: {n} frames each way and phase (+{WARMUP} warm-up), real-time pacing;")
    print(f"  ROS graph, node and publisher/listener in one process, stand-in {where}")
    print(f"tcp_nodelay_client_sockets: {nodelay} (1 = Nagle off)")
    if args.rt:
        print(f"robot side at SCHED_RR {args.rt}; stand-in and load at normal priority")
    figs.print()


if __name__ == "__main__":
    main()
