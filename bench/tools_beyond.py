"""Tools beyond ROS: knowledge retrieval, MCP call overhead, agent dispatch.

- ``knowledge_retrieve_{1k,100k}_p50/p99``: one ``KnowledgeIndex.search`` (stem the
  question in es+en, FTS5 BM25 top 3, trim to 1200 characters) over a synthetic bilingual
  corpus of 1 000 / 100 000 passages (about 25 words each, Zipf-distributed vocabulary);
  t0 before the call, t1 when it returns. ``knowledge_tool_call_100k_*``: the same through
  ``provider.run`` (input check, worker thread, result), as the session calls it.
- ``knowledge_retrieve_*_cpu_p99``: the same calls' CPU time on this thread (on a loaded
  machine the wall-clock tail is mostly waiting for a core).
- ``knowledge_build_*_s``: index build from the folder of files (split, stem, insert,
  optimize); ``knowledge_build_*_rss_mb``: the process's peak-RSS growth while building;
  ``knowledge_index_*_mb``: the index file on disk (the cache entry).
- ``mcp_stdio_overhead_p50/p99``: ``provider.run`` of ``mcp-server-time``'s
  ``get_current_time`` over stdio minus a bare ``ClientSession.call_tool`` on a second
  connection to a second instance of the same server (the SDK + transport + the server's
  own time), calls interleaved; the tools layer's share (thread hops, input check,
  result). ``mcp_stdio_overhead_cpu_*``: the same difference in this process's CPU time
  (what the tools layer costs when no core is missing).
- ``agent_dispatch_p50/p99``: ``provider.run`` of an agent tool until its ConverseStream
  request reaches the Converse stand-in (Strands Agent + BedrockModel + boto3 client set-up
  and the signed request); ``agent_round_trip_*``: the whole call for a one-step answer.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, isolate, pct, setup_path

EN = ("cafeteria opens closes floor lift reception parking meeting room library gym toilet "
      "lobby ticket desk printer wifi password locker shower bike visitor badge lunch menu "
      "coffee garden terrace museum exhibition hall auditorium stairs entrance exit"
      ).split()  # fmt: skip
ES = ("cafetería abre cierra planta ascensor recepción aparcamiento reunión sala biblioteca "
      "gimnasio aseo vestíbulo entrada billete mostrador impresora contraseña taquilla ducha "
      "bicicleta visitante tarjeta comida menú café jardín terraza museo exposición salida "
      "escaleras auditorio").split()  # fmt: skip
FILLER = [f"w{i}" for i in range(5000)]  # the long tail of a real vocabulary


def corpus(folder: Path, n: int, seed: int = 1) -> None:
    """``n`` passages in 100 Markdown files, half English, half Spanish."""
    rnd = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    per = max(1, n // 100)
    for f in range(100):
        parts = []
        for i in range(per):
            words = EN if (f + i) % 2 else ES
            text = " ".join(
                rnd.choice(words)
                if rnd.random() < 0.4
                else FILLER[int(rnd.paretovariate(1.2)) % 5000]
                for _ in range(25)
            )
            parts.append(f"## Entry {f}-{i}\n\n{text} {8 + i % 10}:00.\n")
        (folder / f"doc{f:03d}.md").write_text("\n".join(parts))


def queries(k: int, seed: int = 2) -> list[str]:
    rnd = random.Random(seed)
    out = []
    for i in range(k):
        words = EN if i % 2 else ES
        out.append(" ".join(rnd.choice(words) for _ in range(rnd.randint(3, 6))) + "?")
    return out


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_knowledge(n: int, label: str, nq: int, provider_too: bool) -> None:
    from sonic_voice.tools.knowledge_index import KnowledgeIndex

    with tempfile.TemporaryDirectory() as tmp:
        docs = Path(tmp) / "docs"
        corpus(docs, n)
        rss0 = peak_rss_mb()
        t0 = time.perf_counter()
        index, built = KnowledgeIndex.from_folder(docs, ["es", "en"], Path(tmp) / "cache")
        build_s = time.perf_counter() - t0
        assert built and index.count() == n, index.count()
        t0 = time.perf_counter()
        KnowledgeIndex.from_folder(docs, ["es", "en"], Path(tmp) / "cache")
        cached_ms = (time.perf_counter() - t0) * 1000
        qs = queries(nq)
        for q in qs[:20]:
            index.search(q, 3, 1200)
        lat, cpu = [], []
        for q in qs:
            t, c = time.perf_counter(), time.thread_time()
            found = index.search(q, 3, 1200)
            lat.append((time.perf_counter() - t) * 1000)
            cpu.append((time.thread_time() - c) * 1000)
            assert found
        figure(f"knowledge_retrieve_{label}_p50", pct(lat, 50), "ms")
        figure(f"knowledge_retrieve_{label}_p99", pct(lat, 99), "ms",
               "<= 20 ms" if label == "100k" else "")  # fmt: skip
        figure(f"knowledge_retrieve_{label}_cpu_p99", pct(cpu, 99), "ms")
        figure(f"knowledge_build_{label}_s", build_s, "s")
        figure(f"knowledge_build_{label}_rss_mb", peak_rss_mb() - rss0, "MB")
        figure(f"knowledge_index_{label}_mb", index.size_bytes() / 1e6, "MB")
        figure(f"knowledge_cached_open_{label}", cached_ms, "ms")
        if provider_too:
            bench_knowledge_tool(docs, Path(tmp) / "cache", qs, label)
        index.close()


def bench_knowledge_tool(docs: Path, cache: Path, qs: list[str], label: str) -> None:
    from sonic_voice.sonic.tools_seam import ToolUse
    from sonic_voice.tools import load_tools

    cfg = docs.parent / "tools.yaml"
    cfg.write_text(f"tools:\n  - name: faq\n    description: FAQ.\n"
                   f"    knowledge: {{documents: {docs}, cache_dir: {cache}}}\n")  # fmt: skip
    p = load_tools(str(cfg))

    async def run() -> list[float]:
        out = []
        for i, q in enumerate(qs):
            t = time.perf_counter()
            r = await p.run(ToolUse(str(i), "faq", {"query": q}), lambda _t, _d: None)
            out.append((time.perf_counter() - t) * 1000)
            assert r.status == "ok", r.content
        return out

    try:
        lat = asyncio.run(run())
    finally:
        p.shutdown()
    figure(f"knowledge_tool_call_{label}_p50", pct(lat, 50), "ms")
    figure(f"knowledge_tool_call_{label}_p99", pct(lat, 99), "ms")


def bench_mcp(n: int) -> None:
    from mcp import ClientSession, StdioServerParameters
    from mcp.client.stdio import stdio_client

    from sonic_voice.sonic.tools_seam import ToolUse
    from sonic_voice.tools import load_tools

    args = ["-m", "mcp_server_time", "--local-timezone", "UTC"]
    with tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "tools.yaml"
        cfg.write_text(f"tools:\n  - name: t\n    mcp: {{command: {sys.executable}, "
                       f"args: {args}, allow: [get_current_time]}}\n")  # fmt: skip
        p = load_tools(str(cfg))
        cpu_ours: list[float] = []
        cpu_bare: list[float] = []

        async def run() -> tuple[list[float], list[float]]:
            ours, bare = [], []
            cpu_ours.clear()
            cpu_bare.clear()
            params = StdioServerParameters(command=sys.executable, args=args)
            async with stdio_client(params) as (r, w), ClientSession(r, w) as s:
                await s.initialize()
                for i in range(n + 20):
                    t, c = time.perf_counter(), time.process_time()
                    await s.call_tool("get_current_time", {"timezone": "UTC"})
                    b = (time.perf_counter() - t) * 1000
                    cb = (time.process_time() - c) * 1000
                    t, c = time.perf_counter(), time.process_time()
                    res = await p.run(ToolUse(str(i), "t_get_current_time", {"timezone": "UTC"}),
                                      lambda _t, _d: None)  # fmt: skip
                    o = (time.perf_counter() - t) * 1000
                    co = (time.process_time() - c) * 1000
                    assert res.status == "ok", res.content
                    if i >= 20:
                        ours.append(o)
                        bare.append(b)
                        cpu_ours.append(co)
                        cpu_bare.append(cb)
            return ours, bare

        try:
            ours, bare = asyncio.run(run())
        finally:
            p.shutdown()
    over = [o - b for o, b in zip(ours, bare, strict=True)]
    figure("mcp_stdio_bare_call_p50", pct(bare, 50), "ms")
    figure("mcp_stdio_bare_call_p99", pct(bare, 99), "ms")
    figure("mcp_stdio_tool_call_p50", pct(ours, 50), "ms")
    figure("mcp_stdio_tool_call_p99", pct(ours, 99), "ms")
    figure("mcp_stdio_overhead_p50", pct(over, 50), "ms", "<= 5 ms")
    figure("mcp_stdio_overhead_p99", pct(over, 99), "ms", "<= 5 ms")
    cpu_over = [o - b for o, b in zip(cpu_ours, cpu_bare, strict=True)]
    figure("mcp_stdio_overhead_cpu_p50", pct(cpu_over, 50), "ms")
    figure("mcp_stdio_overhead_cpu_p99", pct(cpu_over, 99), "ms")


def bench_agent(n: int) -> None:
    from sonic_voice.emulators.agents import AgentsEmulatorThread
    from sonic_voice.sonic.tools_seam import ToolUse
    from sonic_voice.tools import load_tools

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "AKIDBENCH")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench-secret")
    script = [{"text": "Done."}] * (n + 5)
    with AgentsEmulatorThread(script=script) as emu, tempfile.TemporaryDirectory() as tmp:
        cfg = Path(tmp) / "tools.yaml"
        agent = f"{{system_prompt: S., model_id: m, endpoint_url: '{emu.endpoint_url}'}}"
        cfg.write_text(f"tools:\n  - name: a\n    description: A.\n    agent: {agent}\n")
        p = load_tools(str(cfg))
        reqs = emu.emulator.converse_requests

        async def run() -> tuple[list[float], list[float]]:
            dispatch, total = [], []
            for i in range(n + 5):
                t = time.monotonic()
                r = await p.run(ToolUse(str(i), "a", {"task": "x"}), lambda _t, _d: None)
                end = time.monotonic()
                assert r.status == "ok" and r.content["answer"] == "Done.", r.content
                if i >= 5:
                    dispatch.append((reqs[-1]["t"] - t) * 1000)
                    total.append((end - t) * 1000)
            return dispatch, total

        try:
            dispatch, total = asyncio.run(run())
        finally:
            p.shutdown()
    figure("agent_dispatch_p50", pct(dispatch, 50), "ms")
    figure("agent_dispatch_p99", pct(dispatch, 99), "ms")
    figure("agent_round_trip_p50", pct(total, 50), "ms")
    figure("agent_round_trip_p99", pct(total, 99), "ms")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--mcp-calls", type=int, default=300)
    ap.add_argument("--agent-calls", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="10 k instead of 100 k passages")
    args = ap.parse_args()
    isolate()
    setup_path()
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores; knowledge: bm25s + "
          "PyStemmer (es, en)", flush=True)  # fmt: skip
    bench_knowledge(1000, "1k", args.queries, provider_too=False)
    big = 10_000 if args.quick else 100_000
    bench_knowledge(big, "10k" if args.quick else "100k", args.queries, provider_too=True)
    bench_mcp(args.mcp_calls)
    bench_agent(args.agent_calls)


if __name__ == "__main__":
    main()
