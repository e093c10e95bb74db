"""Tool-call latency through the ROS tools layer (real rclpy, real action server).

Two figures, over sequential Fibonacci goals to a server in this process on an isolated
graph, with the provider on its own asyncio loop (as on the session's) and the executor
spinning in another thread:

- ``toolUse received -> goal accepted``: from ``RosToolProvider.run`` entry (schema check,
  goal mapping, send) to the accepted goal handle back on the loop (goal <= 10 ms);
- ``server result -> ToolResult returned``: from the server's execute callback producing
  the result to ``run`` returning the ToolResult on the loop (goal <= 5 ms).

Run: ``.venv/bin/python bench/tool_latency.py [N]``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, isolate, pct, setup_path

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
"""


def main() -> None:
    isolate()
    setup_path()
    home = tempfile.mkdtemp(prefix="sv-bench-")
    os.environ.setdefault("ROS_HOME", home)
    os.environ.setdefault("ROS_LOG_DIR", os.path.join(home, "log"))
    from sonic_voice.sonic.tools_seam import ToolUse
    from sonic_voice.tools import load_provider

    from test.harness.ros import RosGraph
    from test.harness.servers import fibonacci_server

    n = int(sys.argv[1]) if len(sys.argv) > 1 else 300
    cfg = Path(home) / "tools.yaml"
    cfg.write_text(textwrap.dedent(TOOLS))
    graph = RosGraph()
    try:
        server = fibonacci_server(graph.node("bench_server"), steps=0)
        result_at: list[float] = []
        make_result = server._result

        def timed_result(goal, done):
            r = make_result(goal, done)
            result_at.append(time.perf_counter())
            return r

        server._result = timed_result
        provider = load_provider(graph.node("bench_tools"), str(cfg), None)
        provider.keep_marks = True

        async def run_all() -> tuple[list[float], list[float]]:
            accept, back = [], []
            for i in range(n + 20):
                use = ToolUse(f"b{i}", "fib", {"order": 5})
                r = await provider.run(use, lambda t, d: None)
                done = time.perf_counter()
                assert r.status == "ok", r.content
                m = provider.marks.pop(use.tool_use_id)
                if i >= 20:  # warm-up: discovery, first allocations
                    accept.append((m["accepted"] - m["received"]) * 1000)
                    back.append((done - result_at[-1]) * 1000)
            return accept, back

        assert provider._clients["fib"].wait_for_server(10), "server not discovered"
        accept, back = asyncio.run(run_all())
        provider.shutdown()
    finally:
        graph.close()
    print(f"tool_latency: {n} sequential Fibonacci goals, same process, isolated graph")
    figure("tool_use_to_goal_accepted_p50", pct(accept, 50), "ms", "<= 10 ms")
    figure("tool_use_to_goal_accepted_p99", pct(accept, 99), "ms", "<= 10 ms")
    figure("server_result_to_tool_result_p50", pct(back, 50), "ms", "<= 5 ms")
    figure("server_result_to_tool_result_p99", pct(back, 99), "ms", "<= 5 ms")


if __name__ == "__main__":
    main()
