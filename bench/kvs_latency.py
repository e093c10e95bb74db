"""One-way audio latency over the KVS WebRTC link on loopback, and CPU per viewer, for the
master's audio paths side by side: ``ours`` (the default: adaptive jitter buffer with Opus
FEC/PLC/NACK in, libopus FEC sender out, munged answer) and ``stock`` (aiortc's own receive
path and encoder: ``resilient_receive=False, opus_fec=False``).

viewer -> robot: an aiortc viewer sends noise bursts; latency = time the master's on_audio
callback delivers the 16 kHz block holding a burst onset (what audio/remote publishes) minus
the time the viewer's sender emitted the 20 ms frame holding it.
robot -> viewer: KvsMaster.play() of a burst; latency = arrival of the viewer's decoded frame
holding the onset minus the play() call. The viewer is aiortc (test/harness/viewer.py), so
this includes aiortc's stock receive buffer *at the viewer* (~80 ms prefill) in both modes;
a browser's NetEq replaces it in real use.
CPU per viewer: the master process's CPU time per second of audio with N talking viewers
(separate processes) while the robot talks to all of them, minus the idle master.

Jitter-buffer depth estimate: microseconds per played frame spent in
``AdaptiveJitterBuffer._update_target`` with a full 4 s window (offline, no network).

``--modes ours,stock`` (default both), ``KVS_BENCH_BURSTS`` (40), ``KVS_BENCH_CPU_S`` (10).
``--load both|off|on`` (default both, bench/_common.py): the latencies quiet, then under
the standard background load (one busy process per core); CPU per viewer is measured
without it (CPU time, not wall time: the load would only add noise).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

import _common

_common.isolate()
_common.setup_path()

import numpy as np  # noqa: E402

from sonic_voice.emulators.kvs import KvsEmulator  # noqa: E402
from sonic_voice.kvs.jitter import AdaptiveJitterBuffer, JitterConfig  # noqa: E402
from sonic_voice.kvs.master import KvsMaster  # noqa: E402
from sonic_voice.kvs.settings import KvsSettings  # noqa: E402

from test.harness.signals import speech_like  # noqa: E402
from test.harness.viewer import TEST_SECRET, Viewer  # noqa: E402

BURSTS = int(os.environ.get("KVS_BENCH_BURSTS", "40"))
PERIOD_S = 0.25
CPU_SECONDS = float(os.environ.get("KVS_BENCH_CPU_S", "10"))
THRESH = 2000


def burst(rate: int, ms: float = 30, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(rate * ms / 1000)) * 8000).clip(-30000, 30000).astype(np.int16)


def onsets(events: list[tuple[float, np.ndarray]]) -> list[float]:
    """Times of the chunks where the signal rises from quiet to a burst."""
    out, quiet = [], True
    for t, x in events:
        loud = len(x) and int(np.abs(x.astype(np.int32)).max()) > THRESH
        if loud and quiet:
            out.append(t)
        quiet = not loud
    return out


def pair(sent: list[float], got: list[float]) -> list[float]:
    """Match each received onset to the latest sent onset before it (within a period)."""
    lat = []
    for g in got:
        before = [s for s in sent if s <= g and g - s < PERIOD_S * 0.9]
        if before:
            lat.append((g - before[-1]) * 1000)
    return lat


MODES = {"ours": True, "stock": False}


def settings(emu: KvsEmulator, mode: str) -> KvsSettings:
    return KvsSettings(
        "bench",
        endpoint_url=emu.endpoint_url,
        access_key_id="AKIDBENCH",
        secret_access_key=TEST_SECRET,
        ice_servers_override=[],
        resilient_receive=MODES[mode],
        opus_fec=MODES[mode],
    )


async def latency(emu: KvsEmulator, mode: str) -> tuple[list[float], list[float], list[float]]:
    """(viewer -> robot ms, robot -> viewer ms, our jitter buffer's delay per frame ms)."""
    got_master: list[tuple[float, np.ndarray]] = []
    master = KvsMaster(
        settings(emu, mode),
        on_audio=lambda c, b: got_master.append((time.monotonic(), np.frombuffer(b, "<i2"))),
    )
    await master.start()
    viewer = await Viewer(emu.endpoint_url, "bench", "bench-viewer").join()
    sent_viewer: list[tuple[float, np.ndarray]] = []
    viewer.mic.on_frame = lambda t, x: sent_viewer.append((t, x))
    await master.wait_viewers(1)
    await asyncio.sleep(1.0)  # let both jitter buffers settle
    rx = master.peers["bench-viewer"].rx
    if rx is not None:
        rx.stats.delays_ms.clear()
    b16, b24 = burst(16000), burst(24000, seed=1)
    gap16 = np.zeros(int(16000 * PERIOD_S) - len(b16), np.int16)
    # viewer -> master: bursts queued on the viewer's paced track.
    viewer.say(np.concatenate([np.concatenate([b16, gap16]) for _ in range(BURSTS)]))
    # master -> viewer: one play() per burst, at the period.
    played: list[float] = []
    for _ in range(BURSTS):
        played.append(time.monotonic())
        master.play(b24)
        await asyncio.sleep(PERIOD_S)
    await asyncio.sleep(0.6)
    up = pair(onsets(sent_viewer), onsets(got_master))
    down = pair(played, onsets(viewer.frames))
    buffered = list(rx.stats.delays_ms) if rx is not None else []
    await viewer.close()
    await master.stop()
    return up, down, buffered


async def cpu(emu: KvsEmulator, n: int, mode: str) -> float:
    """Master-process CPU seconds per second of wall time with ``n`` viewers."""
    master = KvsMaster(settings(emu, mode))
    await master.start()
    procs = []
    for i in range(n):
        procs.append(
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "test.harness.viewer",
                "--endpoint-url",
                emu.endpoint_url,
                "--channel",
                "bench",
                "--client-id",
                f"load-{i}",
                stdout=asyncio.subprocess.PIPE,
                cwd=str(_common.ROOT),
            )
        )
    for p in procs:
        await asyncio.wait_for(p.stdout.readline(), 60)
    assert await master.wait_viewers(n, 30)
    speech = speech_like(2.0, 24000, seed=5)

    async def talk() -> None:
        while True:
            if all(p.out.queued_seconds < 0.5 for p in master.peers.values()):
                master.play(speech)
            await asyncio.sleep(0.1)

    talker = asyncio.create_task(talk())
    await asyncio.sleep(2.0)
    c0, w0 = time.process_time(), time.monotonic()
    await asyncio.sleep(CPU_SECONDS)
    used = (time.process_time() - c0) / (time.monotonic() - w0)
    talker.cancel()
    for p in procs:
        p.kill()
        await p.wait()
    await master.stop()
    return used


def update_target_us(frames: int = 5000) -> float:
    """Microseconds per frame in the buffer's depth estimate, with a full window (4 s of
    packets arriving with 10 ms jitter), as the playout loop calls it once per frame."""
    import time as _t

    def run(update: bool) -> float:
        jb = AdaptiveJitterBuffer(JitterConfig(nack=False))
        rng = np.random.default_rng(0)
        jitter = np.abs(rng.normal(0, 0.01, frames + 250))
        for i in range(250):
            jb.push(i & 0xFFFF, i * 960, b"", 1000 + i * 0.02 + jitter[i])
        t0 = _t.perf_counter()
        for i in range(250, 250 + frames):
            jb.push(i & 0xFFFF, i * 960, b"", 1000 + i * 0.02 + jitter[i])
            if update:
                jb._update_target()
        return _t.perf_counter() - t0

    best = min(run(True) - run(False) for _ in range(3))
    return best / frames * 1e6


async def main(modes: list[str], load: str) -> None:
    _common.figure(
        "jitter_update_target",
        update_target_us(),
        "us per frame",
        "<= 10 us (np.fromiter + np.quantile per frame: 157-655 us on main 53e7a54, loaded host)",
    )
    emu = KvsEmulator(channels=["bench"], verify_secret=TEST_SECRET)
    await emu.start()
    figs = _common.Figures()
    try:
        for name in _common.phases(load):
            with _common.phase(name) as info:
                for mode in modes:
                    up, down, buffered = await latency(emu, mode)
                    add_latency(figs, name, mode, up, down, buffered)
            figs.phases.append(info)
        for mode in modes:
            idle = await cpu(emu, 0, mode)
            loads = {n: await cpu(emu, n, mode) for n in (1, 3)}
            add_cpu(figs, mode, idle, loads)
    finally:
        await emu.stop()
    figs.print()


def add_latency(
    figs: _common.Figures,
    phase: str,
    mode: str,
    up: list[float],
    down: list[float],
    buffered: list[float],
) -> None:
    print(
        f"[{mode}, {phase}] bursts matched: viewer->robot {len(up)}/{BURSTS}, "
        f"robot->viewer {len(down)}/{BURSTS}"
    )
    pre = "" if mode == "ours" else "stock_"
    pct = _common.pct
    goal = "<= 120 ms p50 on loopback (stock: 122 ms p50 before issue 7)"
    figs.add(phase, f"{pre}viewer_to_audio_remote_p50", pct(up, 50), "ms", goal)
    goal = "<= 200 ms on loopback"
    figs.add(phase, f"{pre}viewer_to_audio_remote_p99", pct(up, 99), "ms", goal)
    goal = "<= 120 ms p50 on loopback; includes the aiortc viewer's own ~80 ms buffer"
    figs.add(phase, f"{pre}play_to_viewer_p50", pct(down, 50), "ms", goal)
    figs.add(phase, f"{pre}play_to_viewer_p99", pct(down, 99), "ms", "<= 200 ms on loopback")
    if buffered:
        goal = "well under aiortc's fixed ~80 ms on a clean link"
        figs.add(phase, f"{pre}jitter_buffer_delay_p50", pct(buffered, 50), "ms", goal)


def add_cpu(figs: _common.Figures, mode: str, idle: float, loads: dict[int, float]) -> None:
    pre = "" if mode == "ours" else "stock_"
    figs.add(_common.QUIET, f"{pre}master_cpu_idle", idle * 1000, "ms/s", "near 0")
    for n, used in loads.items():
        figs.add(
            _common.QUIET,
            f"{pre}master_cpu_per_viewer_{n}v",
            (used - idle) / n * 1000,
            "ms CPU per s of audio",
            "<= 250 ms (both directions; aiortc baseline ~110 ms per direction)",
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--modes", default="ours,stock", help="comma list of: ours, stock")
    _common.add_load_option(parser)
    args = parser.parse_args()
    chosen = [m for m in args.modes.split(",") if m]
    unknown = [m for m in chosen if m not in MODES]
    if unknown:
        parser.error(f"unknown mode(s) {unknown}; choose from {list(MODES)}")
    asyncio.run(main(chosen, args.load))
