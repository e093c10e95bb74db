"""Tool-call latency through the ROS tools layer (real rclpy, real action server).

The setup is a robot's: the far end, a ``test_msgs/action/Fibonacci`` server, runs in
another process (as Nav2 does; it keeps finished goals 1 s, so its status messages list
~10 goals at the default pace) and publishes 20 ms microphone blocks on ``audio/mic`` at
50 Hz. This process is the session's: a node spun by a SingleThreadedExecutor (as the
runtime does) whose ``audio/mic`` subscription hands every block to the process's one
asyncio loop through the bridge (``sonic_voice.ros.bridge``, as ``sonic_session`` does),
and the provider built on that node by ``load_provider``, its calls awaited on that loop.
Calls are sequential, one every ``--period`` seconds (a conversation does not fire a
hundred goals a second), with 20 warm-up calls left out.

Both phases by default (``--load both|off|on``, bench/_common.py): quiet, then under the
standard background load (one busy process per core). Goals: dispatch and result p99
<= 25 ms loaded (issue 10); quiet <= 10 ms and <= 5 ms.

Figures, t0 -> t1 (``time.perf_counter_ns``: CLOCK_MONOTONIC, comparable across processes):

- ``tool_use_to_goal_accepted``: t0 just before the loop calls ``provider.run(toolUse)``;
  t1 when ``run`` holds the server's acceptance on the loop (the provider's ``accepted``
  mark). Goal <= 10 ms.
- ``tool_use_to_server_accepted`` (for reading the above): t1 is the server's goal
  callback answering ACCEPT, in the server's process.
- ``server_result_to_tool_result``: t0 when the server's execute callback hands its result
  to rclpy (which then answers the get-result request), in the server's process; t1 when
  ``run`` has returned the ToolResult to its caller on the loop. Goal <= 5 ms. With
  ``--goal-ms 0`` (default) the result exists before the client's get-result request
  arrives, so this includes that request's round trip (the worst case); with a goal that
  runs, the request is already waiting at the server. It includes the far end's own
  rclpy ActionServer sending the answer (a done-callback task later: ~2 ms here, µs for a
  C++ server such as Nav2's), so also:
- ``result_sent_to_tool_result``: t0 when the far end's rclpy has sent the result response
  (stamped in its ``_send_result_response``), t1 as above: the tools layer's share.
- ``cpu_per_call``: this process's CPU time from t0 to the ToolResult, per call: the
  work the path costs, less sensitive than wall time to other load on the machine
  (it includes whatever audio this process handled meanwhile).

Stopping (issue 15), ``--stops N`` rounds (default 100; 0 skips) after the calls above. Each
round starts a goal the far end holds until cancelled (a ``hold`` action tool, as a
NavigateToPose on its way), waits until it is accepted, then stops it:

- ``stop_tool_to_cancel_ack``: t0 just before the loop calls ``provider.run`` with the
  ``stop`` tool's toolUse (the ``cancel`` kind); t1 when the server's answer to the goal's
  cancel request is back at the client (the action binding's ``cancel_ack`` mark, ROS
  thread). Goal p99 <= 20 ms. (``..._server_sees_cancel``: t1 is the far end's cancel
  callback.)
- ``safety_stop_to_cancel_ack``: t0 when the far end (another process, as an e-stop node
  would be) publishes ``std_msgs/Empty`` on ``safety_stop``; this process's subscription
  callback calls ``provider.stop_motion`` on the executor thread, as ``sonic_session``'s
  safety stop does (the cancel request leaves from there); t1 as above. Goal p99 <= 10 ms.
- ``..._to_cancel_sent``: t1 when the cancel request left this process (the binding's
  ``cancel_sent`` mark): this process's share; the rest is the far end's rclpy action
  server (~2-3 ms per answer here; µs for a C++ server such as Nav2's) and the way back.

Options: ``--same-process`` puts the server in this process on the graph's executor (it
then competes for this process's GIL; the harder, less realistic case), ``--no-audio``,
``--period S``, ``--goal-ms MS``, ``--session-executor multi`` (the session-like node on a
MultiThreadedExecutor, as the nodes ran before: rclpy 9.1.2's MultiThreadedExecutor
busy-loops on every audio block, ros2/rclpy#1452, and takes the GIL with it; run_node and
the all-in-one runner now use a SingleThreadedExecutor, the default here), ``--stages``
(per-stage p50/p99 offsets from t0 along the path, from the provider's marks and the
server's stamps, and the CPU each thread of this process spent per call).

Run: ``.venv/bin/python bench/tool_latency.py [N] [options]`` (N calls per phase, default
300: ~1 min for both phases).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import multiprocessing
import os
import sys
import tempfile
import textwrap
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
    figure,
    isolate,
    pct,
    phase,
    phases,
    real_time,
    setup_path,
)

TOOLS = """
tools:
  - name: fib
    description: Fibonacci numbers.
    input: {properties: {order: {type: integer, minimum: 1}}, required: [order]}
    action:
      type: test_msgs/action/Fibonacci
      server: fibonacci
      goal: {order: {input: order}}
      result: [sequence]
  - name: hold
    description: A goal the far end holds until it is cancelled.
    input: {properties: {}}
    action: {type: test_msgs/action/Fibonacci, server: hold, goal: {order: 1}}
  - name: stop
    description: Stop.
    input: {properties: {}}
    cancel: {}
"""
WARMUP = 20
STOP_WARMUP = 5
MIC_BLOCK = 640  # 20 ms of PCM16 mono at 16 kHz
# Quiet: the tools layer's own goals; loaded: issue 10 (p99 <= 25 ms under the standard load).
GOALS = {
    "dispatch": {QUIET: "<= 10 ms", LOADED: "<= 25 ms"},
    "result": {QUIET: "<= 5 ms", LOADED: "<= 25 ms"},
    "result_share": {QUIET: "<= 5 ms, tools layer's share", LOADED: ""},
}
RESULT_KEEP_S = 1  # the server keeps finished goals (and lists them in every status) this long


class FarEnd:
    """The Fibonacci server's side: stamps its goal callback and its result, in order."""

    def __init__(self, node: Any, audio: bool, goal_s: float = 0.0) -> None:
        from rclpy.action import ActionServer, CancelResponse, GoalResponse
        from std_msgs.msg import UInt8MultiArray
        from test_msgs.action import Fibonacci

        from sonic_voice.ros.topics import AUDIO_QOS, MIC_TOPIC

        self.accepted_ns: list[int] = []
        self.result_ns: list[int] = []
        self._fib = Fibonacci
        self._goal_s = goal_s

        def on_goal(goal: Any) -> Any:
            self.accepted_ns.append(time.perf_counter_ns())
            return GoalResponse.ACCEPT

        self.server = ActionServer(
            node,
            Fibonacci,
            "fibonacci",
            execute_callback=self._execute,
            goal_callback=on_goal,
            cancel_callback=lambda gh: CancelResponse.ACCEPT,
            result_timeout=RESULT_KEEP_S,
        )
        self.result_sent_ns: list[int] = []
        send = self.server._send_result_response  # rclpy sends the answer here (a task later)

        def send_and_stamp(header: Any, future: Any) -> None:
            send(header, future)
            self.result_sent_ns.append(time.perf_counter_ns())

        self.server._send_result_response = send_and_stamp
        self.cancel_ns: list[int] = []
        self.estop_ns: list[int] = []
        self._held: list[Any] = []
        self.hold = ActionServer(
            node,
            Fibonacci,
            "hold",
            execute_callback=self._hold,
            goal_callback=lambda goal: GoalResponse.ACCEPT,
            cancel_callback=self._on_cancel,
            result_timeout=RESULT_KEEP_S,
        )
        from std_msgs.msg import Empty

        self._empty = Empty()
        self.estop = node.create_publisher(Empty, "safety_stop", 10)
        if audio:
            pub = node.create_publisher(UInt8MultiArray, MIC_TOPIC, AUDIO_QOS)
            block = UInt8MultiArray(data=bytes(MIC_BLOCK))
            node.create_timer(0.02, lambda: pub.publish(block))

    def _on_cancel(self, goal_handle: Any) -> Any:
        from rclpy.action import CancelResponse

        self.cancel_ns.append(time.perf_counter_ns())
        for fut in self._held:
            if not fut.done():
                fut.set_result(None)
        return CancelResponse.ACCEPT

    async def _hold(self, goal_handle: Any) -> Any:
        """Until cancelled (awaits an rclpy future the cancel callback completes, so the
        executor stays free to take the cancel request)."""
        from rclpy.task import Future

        fut = Future()
        self._held = [fut]
        await fut  # resumed after the server marked the goal canceling
        if goal_handle.is_cancel_requested:
            goal_handle.canceled()
        else:
            goal_handle.abort()
        return self._fib.Result()

    def publish_estop(self) -> None:
        self.estop_ns.append(time.perf_counter_ns())
        self.estop.publish(self._empty)

    def _execute(self, goal_handle: Any) -> Any:
        if self._goal_s:
            time.sleep(self._goal_s)  # the robot at work (sequential goals: nothing waits)
        s = [0, 1]
        while len(s) < goal_handle.request.order + 1:
            s.append(s[-1] + s[-2])
        goal_handle.succeed()
        result = self._fib.Result(sequence=s)
        self.result_ns.append(time.perf_counter_ns())
        return result


def thread_cpu() -> dict[str, float]:
    """CPU seconds used so far by each live thread of this process, by Python thread name."""

    tick = os.sysconf("SC_CLK_TCK")
    names = {t.native_id: t.name for t in threading.enumerate()}
    out: dict[str, float] = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = names.get(int(tid), "other (rmw, pool)")
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / tick
    return out


async def stop_rounds(
    provider: Any, n: int, estop: Any, period: float
) -> list[tuple[str, int | None, dict[str, float]]]:
    """Rounds of (hold goal accepted -> stop tool) and (hold goal accepted -> safety stop):
    ``(kind, t0 or None for the far end's stamp, marks of the held goal)``."""
    from sonic_voice.sonic.tools_seam import ToolUse

    out = []
    for i in range(STOP_WARMUP + n):
        for kind in ("tool", "safety"):
            uid = f"hold-{kind}-{i}"
            task = asyncio.ensure_future(provider.run(ToolUse(uid, "hold", {}), lambda t, d: None))
            await asyncio.sleep(0)  # the call is registered when the task first runs
            await asyncio.wait_for(provider._active[uid].accepted.wait(), 10)
            await asyncio.sleep(period / 2)  # the goal runs a while, as a trip does
            t0 = None
            if kind == "tool":
                t0 = time.perf_counter_ns()
                r = await provider.run(ToolUse(f"stop-{i}", "stop", {}), lambda t, d: None)
                assert r.content.get("cancelled_calls") == 1, r.content
                provider.marks.pop(f"stop-{i}", None)
            else:
                estop()
            res = await asyncio.wait_for(task, 10)
            assert res.status == "cancelled", res.content
            marks = provider.marks.pop(uid)
            if i >= STOP_WARMUP:
                out.append((kind, t0, marks))
            await asyncio.sleep(period / 2)
    return out


def far_end_process(domain_id: int, audio: bool, goal_s: float, conn: Any) -> None:
    """Child process: the far end on its own context and executor until told to stop."""
    from _common import normal_priority

    normal_priority()  # the robot's other software (Nav2): never the bench's --rt share

    import rclpy
    from rclpy.context import Context
    from rclpy.executors import SingleThreadedExecutor
    from rclpy.node import Node

    ctx = Context()
    rclpy.init(context=ctx, domain_id=domain_id)
    node = Node("bench_far_end", context=ctx)
    far = FarEnd(node, audio, goal_s)
    ex = SingleThreadedExecutor(context=ctx)
    ex.add_node(node)
    t = threading.Thread(target=ex.spin, daemon=True)
    t.start()
    conn.send("ready")
    while conn.recv() == "estop":
        far.publish_estop()
    ex.shutdown(timeout_sec=5)
    t.join(10)
    conn.send((far.accepted_ns, far.result_ns, far.result_sent_ns, far.cancel_ns, far.estop_ns))
    node.destroy_node()
    ctx.try_shutdown()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("n", nargs="?", type=int, default=300, help="timed calls")
    ap.add_argument("--period", type=float, default=0.1, help="seconds between call starts")
    ap.add_argument("--same-process", action="store_true", help="the server in this process")
    ap.add_argument("--no-audio", action="store_true", help="no microphone traffic")
    ap.add_argument("--stages", action="store_true", help="per-stage offsets from t0")
    ap.add_argument(
        "--stops", type=int, default=100, help="rounds of stop tool / safety stop (0: none)"
    )
    ap.add_argument(
        "--goal-ms",
        type=float,
        default=0.0,
        help="how long each goal runs (0: the result exists before the client asks for it)",
    )
    ap.add_argument(
        "--session-executor",
        choices=["multi", "single"],
        default="single",
        help="what spins the session-like node: a SingleThreadedExecutor, as run_node and "
        "the runner do, or a MultiThreadedExecutor (the old way, for comparison)",
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
    assert time.get_clock_info("perf_counter").implementation == "clock_gettime(CLOCK_MONOTONIC)"
    from std_msgs.msg import UInt8MultiArray

    from sonic_voice.ros.bridge import Bridge
    from sonic_voice.ros.topics import AUDIO_QOS, MIC_TOPIC, msg_pcm
    from sonic_voice.sonic.tools_seam import ToolUse
    from sonic_voice.tools import load_provider

    from test.harness.ros import RosGraph

    audio = not args.no_audio
    cfg = Path(home) / "tools.yaml"
    cfg.write_text(textwrap.dedent(TOOLS))
    graph = RosGraph(threads=os.cpu_count() or 2, executor=args.session_executor)
    child = conn = far = None
    figs = Figures()
    try:
        if args.same_process:
            far = FarEnd(graph.node("bench_far_end"), audio, args.goal_ms / 1000)
        else:
            mp = multiprocessing.get_context("spawn")
            conn, child_conn = mp.Pipe()
            child = mp.Process(
                target=far_end_process,
                args=(graph.domain_id, audio, args.goal_ms / 1000, child_conn),
            )
            child.start()
            assert conn.poll(30) and conn.recv() == "ready", "far end did not start"

        session = graph.node("bench_session")
        bridge = Bridge.get()  # the process's one loop, as in every sonic_voice process
        pushed = [0]

        def push_audio(msg: Any) -> None:  # loop: what the session does with a block, roughly
            pcm = msg_pcm(msg)
            json.dumps({"event": {"audioInput": {"content": base64.b64encode(pcm).decode()}}})
            pushed[0] += 1

        # As SonicSessionNode: the executor thread hands each block to the loop (one
        # call_soon_threadsafe, sonic_voice.ros.bridge).
        bridge.subscribe(session, UInt8MultiArray, MIC_TOPIC, AUDIO_QOS, push_audio)
        provider = load_provider(session, str(cfg), None)
        provider.keep_marks = True
        assert provider._clients["fib"].wait_for_server(30), "server not discovered"
        assert provider._clients["hold"].wait_for_server(30), "server not discovered"
        from std_msgs.msg import Empty

        def on_estop(_msg: Any) -> None:  # executor thread, as sonic_session's safety stop
            provider.stop_motion("by the safety stop")

        session.create_subscription(Empty, "safety_stop", on_estop, 10)
        if child is not None:
            estop = lambda: conn.send("estop")  # noqa: E731
        else:
            estop = far.publish_estop
        stops: list[Any] = []

        async def run_calls(first: int, count: int) -> list[dict[str, float]]:
            rows = []
            for i in range(first, first + count):
                use = ToolUse(f"b{i}", "fib", {"order": 5})
                cpu0 = time.process_time()
                t0 = time.perf_counter_ns()
                r = await provider.run(use, lambda t, d: None)
                t1 = time.perf_counter_ns()
                cpu = time.process_time() - cpu0
                assert r.status == "ok", r.content
                m = provider.marks.pop(use.tool_use_id)
                row = {k: v * 1e9 for k, v in m.items()}
                row.update(t0=t0, t1=t1, cpu=cpu, i=i)
                rows.append(row)
                await asyncio.sleep(max(0.0, args.period - (time.perf_counter_ns() - t0) / 1e9))
            return rows

        def run_phase(first: int) -> tuple[list[dict[str, float]], dict[str, float]]:
            bridge.submit(run_calls(first, WARMUP)).result(WARMUP * (args.period + 30))
            before = thread_cpu()
            rows = bridge.submit(run_calls(first + WARMUP, args.n)).result(
                args.n * (args.period + 30)
            )
            after = thread_cpu()
            per_thread = {k: (v - before.get(k, 0.0)) / args.n * 1000 for k, v in after.items()}
            return rows, per_thread

        results: dict[str, tuple[list[dict[str, float]], dict[str, float]]] = {}
        first = 0
        for name in phases(args.load):
            with phase(name) as info:
                rows, per_thread = run_phase(first)
            figs.phases.append(info)
            results[name] = (rows, per_thread)
            first += WARMUP + args.n
        if args.stops:  # stop tool and safety stop -> cancel acknowledged (issue 15)
            stops.extend(
                bridge.submit(stop_rounds(provider, args.stops, estop, args.period)).result(
                    args.stops * (args.period + 30) + 60
                )
            )
        provider.shutdown()
        if child is not None:
            conn.send("stop")
            accepted_ns, result_ns, result_sent_ns, cancel_ns, estop_ns = conn.recv()
            child.join(10)
        else:
            accepted_ns, result_ns, result_sent_ns, cancel_ns, estop_ns = (
                far.accepted_ns,
                far.result_ns,
                far.result_sent_ns,
                far.cancel_ns,
                far.estop_ns,
            )
    finally:
        if child is not None and child.is_alive():
            child.kill()
        graph.close()
    calls = len(phases(args.load)) * (WARMUP + args.n)
    assert len(accepted_ns) == len(result_ns) == len(result_sent_ns) == calls
    for rows, _ in results.values():
        for row in rows:
            i = int(row["i"])
            row["server_accepted"] = accepted_ns[i]
            row["server_result"] = result_ns[i]
            row["server_result_sent"] = result_sent_ns[i]

    where = "this process" if args.same_process else "another process"
    print(
        f"tool_latency: {args.n} sequential Fibonacci goals per phase ({args.goal_ms:g} ms "
        f"each, +{WARMUP} warm-up), one per {args.period:g} s, server in {where}, mic audio "
        f"{'50 Hz' if audio else 'off'} ({pushed[0]} blocks reached the loop), session node on "
        f"a {args.session_executor}-threaded executor, isolated graph"
    )
    for name, (rows, per_thread) in results.items():

        def ms(a: str, b: str, rows: list[dict[str, float]] = rows) -> list[float]:
            return [(row[b] - row[a]) / 1e6 for row in rows]

        if args.stages:
            print(f"  [{name}]")
            order = ["received", "goal_sent", "server_accepted", "goal_response", "accepted",
                     "server_result", "server_result_sent", "result_response", "result",
                     "t1"]  # fmt: skip
            for k in [k for k in order if k in rows[0]]:
                v = ms("t0", k)
                print(f"  stage t0 -> {k:18s} p50 {pct(v, 50):7.2f} ms  p99 {pct(v, 99):7.2f} ms")
            for thread, used in sorted(per_thread.items(), key=lambda kv: -kv[1]):
                print(f"  cpu per call, thread {thread:34s} {used:6.2f} ms")
        for key, a, b, goal in (
            ("tool_use_to_goal_accepted", "t0", "accepted", GOALS["dispatch"]),
            ("tool_use_to_server_accepted", "t0", "server_accepted", None),
            ("server_result_to_tool_result", "server_result", "t1", GOALS["result"]),
            ("result_sent_to_tool_result", "server_result_sent", "t1", GOALS["result_share"]),
        ):
            v = ms(a, b)
            figs.add(name, f"{key}_p50", pct(v, 50), "ms", goal[name] if goal else "")
            figs.add(name, f"{key}_p99", pct(v, 99), "ms", goal[name] if goal else "")
        figs.add(name, "cpu_per_call_p50", pct([row["cpu"] * 1000 for row in rows], 50), "ms")
    figs.print()
    if args.stops:
        stop_figures(stops, cancel_ns, estop_ns)


def stop_figures(
    stops: list[tuple[str, int | None, dict[str, float]]],
    cancel_ns: list[int],
    estop_ns: list[int],
) -> None:
    """Stop tool and safety stop -> the goal's cancel acknowledged (issue 15)."""
    skip = 2 * STOP_WARMUP  # cancels and e-stops of the warm-up rounds
    cancels, estops = cancel_ns[skip:], estop_ns[STOP_WARMUP:]
    assert len(cancels) == len(stops) and len(estops) == len(stops) // 2
    tool_ack, tool_srv, safe_ack, safe_srv = [], [], [], []
    sent: dict[str, list[float]] = {"tool": [], "safety": []}
    e = iter(estops)
    for (kind, t0, marks), srv in zip(stops, cancels, strict=True):
        t0 = t0 if t0 is not None else next(e)
        ack = marks["cancel_ack"] * 1e9
        sent[kind].append((marks["cancel_sent"] * 1e9 - t0) / 1e6)
        (tool_ack if kind == "tool" else safe_ack).append((ack - t0) / 1e6)
        (tool_srv if kind == "tool" else safe_srv).append((srv - t0) / 1e6)
    print(f"stops: {len(tool_ack)} stop-tool and {len(safe_ack)} safety-stop rounds")
    for name, v, goal in (
        ("stop_tool_to_cancel_ack", tool_ack, "<= 20 ms p99"),
        ("stop_tool_to_server_sees_cancel", tool_srv, ""),
        ("stop_tool_to_cancel_sent", sent["tool"], ""),
        ("safety_stop_to_cancel_ack", safe_ack, "<= 10 ms p99"),
        ("safety_stop_to_server_sees_cancel", safe_srv, ""),
        ("safety_stop_to_cancel_sent", sent["safety"], ""),
    ):
        figure(f"{name}_p50", pct(v, 50), "ms", goal)
        figure(f"{name}_p99", pct(v, 99), "ms", goal)


if __name__ == "__main__":
    main()
