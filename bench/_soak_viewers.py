"""Viewer churn soak of the KVS master: many aiortc viewers join and vanish; afterwards the
master's process must hold no more memory, file descriptors, asyncio tasks or threads than
before, and still answer a new viewer.

Each join is a real aiortc viewer (test/harness/viewer.py, in a child process so that only
the master is measured) through the KVS stand-in (own thread and loop in the measured
process) to a real ``KvsMaster`` (the measured loop): presigned WebSocket, SDP offer/answer
(every other viewer trickles its candidates), ICE, DTLS, SCTP data channel, Opus both ways
(the viewer talks, the robot talks to everyone). Then it leaves:

- politely (``Viewer.close``: DTLS close_notify, the master frees the peer at once), or
- by vanishing: its UDP sockets are closed under it with nothing said, as when a browser
  tab's machine drops off the network; the master notices only through ICE consent
  freshness (aioice: ~30 s) and must free the peer then.

Measured after a warm-up (the first joins allocate what stays: codecs, boto3 loaders, the
thread pool) and again after every peer is gone: RSS, open fds, asyncio tasks, threads.

Library: ``run(joins, ...) -> dict[str, float]`` (``bench/soak.py`` calls it; the CI test is
test/test_kvs_soak.py). Alone: ``python bench/_soak_viewers.py --joins 200``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Callable
from typing import Any

import _common

_common.setup_path()

from sonic_voice.emulators.kvs import KvsEmulatorThread  # noqa: E402
from sonic_voice.kvs import aiortc_hooks  # noqa: E402
from sonic_voice.kvs.master import KvsMaster  # noqa: E402
from sonic_voice.kvs.settings import KvsSettings  # noqa: E402

from test.harness.signals import speech_like  # noqa: E402
from test.harness.viewer import TEST_SECRET, Viewer  # noqa: E402

CHANNEL = "soak"
_HERE = os.path.abspath(__file__)
# Bounds the CI test asserts (for 50 joins; see the module docstring of test_kvs_soak.py).
BOUNDS = {"rss_growth_mb": 30.0, "fds_growth": 2, "tasks_growth": 0, "threads_growth": 2}


# -- process figures ---------------------------------------------------------------------------
def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def snapshot() -> dict[str, float]:
    """RSS (MB), open fds, asyncio tasks on this loop (but the caller's), OS threads."""
    gc.collect()
    current = asyncio.current_task()
    return {
        "rss_mb": _status("VmRSS") / 1024,
        "fds": len(os.listdir("/proc/self/fd")),
        "tasks": sum(1 for t in asyncio.all_tasks() if t is not current and not t.done()),
        "threads": _status("Threads"),
    }


# -- leaving -----------------------------------------------------------------------------------
def _ice_transports(v: Viewer) -> list[Any]:
    found = []
    for t in v.pc.getTransceivers():
        found.append(t.receiver.transport.transport)
    if v.pc.sctp is not None:
        found.append(v.pc.sctp.transport.transport)
    return list({id(x): x for x in found}.values())


async def vanish(v: Viewer) -> None:
    """Drop off the network: from now on the viewer's UDP sockets swallow what it sends and
    ignore what arrives (aioice's private ``_connection._protocols``: bench harness only),
    so nothing more reaches the master, not even DTLS close_notify; then free the viewer's
    objects in this process."""

    def swallow(*_args: Any, **_kw: Any) -> None:
        return None

    for ice in _ice_transports(v):
        for protocol in list(getattr(ice._connection, "_protocols", [])):
            if protocol.transport is not None:
                protocol.transport.sendto = swallow
            protocol.datagram_received = swallow
    await v.close()  # its goodbyes go nowhere


# -- the viewers' side (a child process) ----------------------------------------------------------
async def churn(
    endpoint_url: str,
    joins: int,
    *,
    first: int = 0,
    concurrency: int = 4,
    vanish_every: int = 4,
    stay_s: float = 1.0,
) -> dict[str, Any]:
    """``joins`` viewers, ``concurrency`` at a time; every ``vanish_every``-th vanishes (0:
    none), the rest leave politely. Returns counts and failures."""
    logging.getLogger("aioice").setLevel(logging.WARNING)
    _share_control_planes()
    speech = speech_like(1.0, 16000, seed=21)
    out: dict[str, Any] = {"joined": 0, "vanished": 0, "polite": 0, "failures": []}
    sem = asyncio.Semaphore(concurrency)
    # Vanish only in the first 60 % of joins, so their ~30 s reaping overlaps the rest.
    vanish_before = first + int(joins * 0.6)

    async def one(i: int) -> None:
        async with sem:
            v = Viewer(endpoint_url, CHANNEL, f"soak-{i}", trickle=i % 2 == 0)
            step = "join"
            try:
                # Generous: the soak is about leaks (join latency: bench/kvs_latency.py); on a
                # 2-core host shared with other test runs (load 17) joins took over 20 s.
                await asyncio.wait_for(v.join(timeout=40), 45)
                out["joined"] += 1
                if v.pc.sctp is not None:  # the viewers are aiortc too (aiortc #1040)
                    aiortc_hooks.quiet_sctp_sends(v.pc.sctp)
                v.say(speech)
                await asyncio.sleep(stay_s)
                if vanish_every and i < vanish_before and i % vanish_every == vanish_every - 1:
                    step = "vanish"
                    await asyncio.wait_for(vanish(v), 10)
                    out["vanished"] += 1
                else:
                    step = "close"
                    await asyncio.wait_for(v.close(), 10)
                    out["polite"] += 1
            except Exception as e:  # noqa: BLE001 - counted and reported
                out["failures"].append(f"soak-{i} {step}: {type(e).__name__}: {e}")
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(v.close(), 5)

    await asyncio.gather(*(one(i) for i in range(first, first + joins)))
    return out


def _share_control_planes() -> None:
    """One boto3 control plane per role for all the child's viewers (each Viewer would
    build its own boto3 session and clients, ~0.2 CPU-s a join, which is the viewers'
    cost, not the master's)."""
    import test.harness.viewer as viewer_module

    real = viewer_module.ControlPlane
    shared: dict[str, Any] = {}

    def factory(settings: KvsSettings, role: str = "MASTER") -> Any:
        if role not in shared:
            shared[role] = real(settings, role)
        return shared[role]

    viewer_module.ControlPlane = factory  # type: ignore[assignment]


async def _spawn_churn(endpoint_url: str, joins: int, limit_s: float, **kw: Any) -> dict[str, Any]:
    """Run :func:`churn` in a child process, so the measured process holds only the master
    (and the stand-in): the viewers' own codecs and sockets do not blur its figures."""
    import json
    import sys

    args = [sys.executable, _HERE, "--child", "--endpoint-url", endpoint_url]
    args += ["--joins", str(joins)]
    for k, v in kw.items():
        args += [f"--{k.replace('_', '-')}", str(v)]
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, cwd=str(_common.ROOT)
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), limit_s)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise TimeoutError(f"viewer churn of {joins} joins took over {limit_s:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"viewer churn exited {proc.returncode}")
    return json.loads(out.decode().strip().splitlines()[-1])


async def _sample_rss(log: Callable[[str], None], t0: float, every_s: float = 15.0) -> None:
    """A line every ``every_s`` while viewers churn: does RSS climb or level off?"""
    while True:
        await asyncio.sleep(every_s)
        log(f"soak: t={time.monotonic() - t0:.0f} s rss {_status('VmRSS') / 1024:.1f} MB")


# -- the master's side (the measured process) ---------------------------------------------------
async def run_async(
    joins: int = 50,
    *,
    concurrency: int = 4,
    vanish_every: int = 4,
    stay_s: float = 1.0,
    warmup: int = 10,
    reap_timeout_s: float = 75.0,
    log: Callable[[str], None] = print,
) -> dict[str, float]:
    """The soak; returns the figures (see :func:`run`)."""
    logging.getLogger("aioice").setLevel(logging.WARNING)
    loop = asyncio.get_running_loop()
    loop_errors: list[str] = []

    def on_error(_loop: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        exc = ctx.get("exception")
        loop_errors.append(f"{ctx.get('message')}: {type(exc).__name__ if exc else ''} {exc}")
        log(f"soak: loop error: {loop_errors[-1]}")

    old_handler = loop.get_exception_handler()
    loop.set_exception_handler(on_error)
    emu = KvsEmulatorThread(channels=[CHANNEL], verify_secret=TEST_SECRET, record_limit=200)
    emu.start()
    settings = KvsSettings(
        CHANNEL,
        endpoint_url=emu.endpoint_url,
        access_key_id="AKIDSOAK",
        secret_access_key=TEST_SECRET,
        ice_servers_override=[],
        max_viewers=100,  # vanished viewers hold a slot until consent freshness ends them
        ice_timeout_s=20.0,
    )
    master = KvsMaster(settings)
    await master.start()
    assert await master.wait_connected(10), "the master did not connect to the stand-in"
    speech = speech_like(0.5, 24000, seed=22)
    t_start = time.monotonic()

    async def robot_talks() -> None:
        while True:
            if all(p.out.queued_seconds < 0.3 for p in master.peers.values()):
                master.play(speech)
            await asyncio.sleep(0.25)

    async def drained() -> bool:
        deadline = time.monotonic() + reap_timeout_s
        while master.peers or master.peer_tasks():
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.25)
        await asyncio.sleep(0.5)  # let closing callbacks run
        return True

    talker = asyncio.create_task(robot_talks(), name="soak-robot-talks")
    per_join_s = 3.0 + stay_s
    try:
        # Warm-up: polite joins only, so nothing lingers into the baseline.
        if warmup:
            await _spawn_churn(
                emu.endpoint_url,
                warmup,
                60 + warmup * per_join_s,
                first=-warmup,
                vanish_every=0,
                concurrency=concurrency,
            )
        assert await drained(), "warm-up peers not freed"
        # Let the default thread pool (boto3 calls) grow to its size now, not during the soak.
        pool = min(32, (os.cpu_count() or 1) + 4)
        await asyncio.gather(*(asyncio.to_thread(time.sleep, 0.05) for _ in range(pool)))
        talker.cancel()
        await asyncio.gather(talker, return_exceptions=True)
        before = snapshot()
        talker = asyncio.create_task(robot_talks(), name="soak-robot-talks")
        t0 = time.monotonic()
        sampler = asyncio.create_task(_sample_rss(log, t0), name="soak-rss")
        counts = await _spawn_churn(
            emu.endpoint_url,
            joins,
            60 + joins * per_join_s,
            concurrency=concurrency,
            vanish_every=vanish_every,
            stay_s=stay_s,
        )
        churn_s = time.monotonic() - t0
        sampler.cancel()
        await asyncio.gather(sampler, return_exceptions=True)
        log(f"soak: {joins} joins in {churn_s:.1f} s; waiting for vanished viewers to be reaped")
        reaped = await drained()
        reap_s = time.monotonic() - t0 - churn_s
        talker.cancel()
        await asyncio.gather(talker, return_exceptions=True)
        after = snapshot()
        # The master still answers a newcomer.
        t1 = time.monotonic()
        v = await Viewer(emu.endpoint_url, CHANNEL, "after-soak").join(timeout=20)
        new_viewer_s = time.monotonic() - t1
        ok = await master.wait_viewers(1, 10)
        await v.close()
        await master.wait_viewers(0, 10)
    finally:
        talker.cancel()
        await master.stop()
        emu.stop()
        gc.collect()  # unretrieved task exceptions surface when their tasks are collected
        await asyncio.sleep(0)
        loop.set_exception_handler(old_handler)
    for line in counts["failures"]:
        log(f"soak: join failed: {line}")
    figures: dict[str, float] = {
        "joins": float(joins),
        "joined": float(counts["joined"]),
        "vanished": float(counts["vanished"]),
        "polite": float(counts["polite"]),
        "failed_joins": float(len(counts["failures"])),
        "churn_s": churn_s,
        "reap_s": reap_s,
        "all_reaped": float(reaped),
        "new_viewer_ok": float(ok),
        "new_viewer_join_s": new_viewer_s,
        "wall_s": time.monotonic() - t_start,
        "loop_errors": float(len(loop_errors)),  # e.g. "Task exception was never retrieved"
    }
    for key in ("rss_mb", "fds", "tasks", "threads"):
        name = key.removesuffix("_mb")
        unit = "_mb" if key == "rss_mb" else ""
        figures[f"{name}_before{unit}"] = before[key]
        figures[f"{name}_after{unit}"] = after[key]
        figures[f"{name}_growth{unit}"] = after[key] - before[key]
    return figures


def run(joins: int = 50, **kw: Any) -> dict[str, float]:
    """Run the soak on a fresh event loop (in a thread when the caller's thread already runs
    one); returns figures: ``joins``, ``joined``, ``vanished``, ``polite``,
    ``failed_joins``, ``churn_s``, ``reap_s``, ``all_reaped`` (1/0), ``new_viewer_ok``
    (1/0), ``new_viewer_join_s``, ``wall_s``, ``loop_errors`` (unhandled exceptions the
    event loop reported in the master's process), and for ``rss`` (``_mb``), ``fds``, ``tasks``,
    ``threads``: ``*_before``, ``*_after``, ``*_growth``."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_async(joins, **kw))
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["figures"] = asyncio.run(run_async(joins, **kw))
        except BaseException as e:  # noqa: BLE001 - handed back to the caller
            box["error"] = e

    th = threading.Thread(target=target, name="soak-viewers")
    th.start()
    th.join()
    if "error" in box:
        raise box["error"]
    return box["figures"]


def report(fig: dict[str, float]) -> None:
    """Print the figures as ``name: value unit (goal ...)`` lines."""
    per = fig["joins"] or 1.0
    _common.figure("soak_viewer_joins", fig["joined"], "joined", f"= {int(fig['joins'])}")
    _common.figure("soak_viewer_vanished", fig["vanished"], "viewers", "freed by ICE consent")
    _common.figure("soak_viewer_failed_joins", fig["failed_joins"], "joins", "0")
    _common.figure("soak_viewer_reap", fig["reap_s"], "s", "<= 40 s after the last vanish")
    goal = f"<= {BOUNDS['rss_growth_mb']:.0f} MB per 50 joins"
    _common.figure("soak_viewer_rss_growth", fig["rss_growth_mb"], "MB", goal)
    _common.figure("soak_viewer_rss_growth_per_join", fig["rss_growth_mb"] * 1024 / per, "KB", "")
    _common.figure("soak_viewer_fds_growth", fig["fds_growth"], "fds", f"<= {BOUNDS['fds_growth']}")
    _common.figure("soak_viewer_tasks_growth", fig["tasks_growth"], "tasks", "0")
    _common.figure(
        "soak_viewer_threads_growth",
        fig["threads_growth"],
        "threads",
        f"<= {BOUNDS['threads_growth']}",
    )
    _common.figure("soak_viewer_new_viewer_join", fig["new_viewer_join_s"], "s", "<= 5 s")
    _common.figure("soak_viewer_loop_errors", fig["loop_errors"], "errors", "0")


if __name__ == "__main__":
    _common.isolate()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--joins", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--vanish-every", type=int, default=4)
    parser.add_argument("--stay-s", type=float, default=1.0)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--endpoint-url", help=argparse.SUPPRESS)
    parser.add_argument("--first", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if args.child:
        import json

        result = asyncio.run(
            churn(
                args.endpoint_url,
                args.joins,
                first=args.first,
                concurrency=args.concurrency,
                vanish_every=args.vanish_every,
                stay_s=args.stay_s,
            )
        )
        print(json.dumps(result), flush=True)
        raise SystemExit(0)
    figures = run(
        args.joins, concurrency=args.concurrency, vanish_every=args.vanish_every, stay_s=args.stay_s
    )
    for k, v in figures.items():
        print(f"  {k} = {v:.2f}")
    report(figures)
