"""Soak of the Nova Sonic session: many legs (streams) through rotation and recovery.

One ``SonicSession`` through the real SDK (aws-sdk-bedrock-runtime + awscrt HTTP/2, SigV4,
event stream) against the Bedrock stand-in on loopback, the stand-in on its own thread
(``EmulatorThread``) so the asyncio task count is the session's alone. Microphone audio
flows the whole time as tagged 32 ms frames (each frame's first two samples carry its
number), pushed at ``speed`` times real time. Every leg ends either by ``rotate()`` or,
every ``fault_every`` legs, by a recoverable fault from the stand-in (cycling
internalServerException, modelStreamErrorException, RST_STREAM, modelTimeoutException).

Measured before ``start()``, at leg ``warmup`` and after the last leg (both with the
session running on one live leg), and after ``stop()`` (fds given up to 5 s to settle,
the CRT closes connections asynchronously): RSS, open file descriptors, asyncio tasks of
the session's loop, threads. ``*_leaked`` is after stop minus before start. ``run()``
returns them with their growth, the legs done, and the tagged frames that never reached
the stand-in (must be 0).

Why the SDK and not the fake stream: leaks that matter live in awscrt (connections,
event-loop threads, body-writer tasks); the fake stream would hide them. One leg costs
~0.3-0.6 s here (a TLS handshake and HTTP/2 connection per stream), so 100 legs fit CI.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import time

import numpy as np

FRAME = 512  # 32 ms at 16 kHz
FAULTS = ("internalServerException", "modelStreamErrorException", "reset", "modelTimeoutException")


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def frame(i: int) -> np.ndarray:
    f = np.zeros(FRAME, np.int16)
    f[0], f[1] = 1 + i % 997, 1 + i // 997
    return f


def frame_ids(pcm: bytes | bytearray) -> set[int]:
    a = np.frombuffer(bytes(pcm), "<i2")
    a = a[: len(a) - len(a) % FRAME].reshape(-1, FRAME)
    return {int(r[1] - 1) * 997 + int(r[0] - 1) for r in a if r[0] > 0}


def slope_per_hour(trace: list[tuple[float, dict[str, float]]], key: str) -> float:
    """Least-squares growth of ``key`` per hour over the samples (0 with fewer than 3)."""
    if len(trace) < 3:
        return 0.0
    t = np.array([p[0] for p in trace])
    v = np.array([p[1][key] for p in trace])
    return float(np.polyfit(t - t[0], v, 1)[0] * 3600.0)


def sample() -> dict[str, float]:
    gc.collect()
    return {
        "rss_mb": rss_mb(),
        "fds": float(fds()),
        "tasks": float(len(asyncio.all_tasks())),
        "threads": float(threading.active_count()),
    }


async def _soak(legs: int, fault_every: int, speed: float, warmup: int) -> dict[str, float]:
    from sonic_voice.emulators.sonic import (
        DEFAULT_ACCESS_KEY,
        DEFAULT_SECRET_KEY,
        EmulatorThread,
    )
    from sonic_voice.sonic.session import SessionConfig, SessionListener, SonicSession
    from sonic_voice.sonic.transport import BedrockSettings

    ours = logging.getLogger("sonic_voice")
    level = ours.level
    ours.setLevel(logging.ERROR)  # the planted faults' warnings, for this soak only
    emu = EmulatorThread(scenario={"turns": []}, realtime=False, session_limit_s=0)
    emu.start()
    try:
        settings = BedrockSettings(
            endpoint_uri=emu.endpoint_uri,
            ca_bundle=emu.ca_file,
            access_key_id=DEFAULT_ACCESS_KEY,
            secret_access_key=DEFAULT_SECRET_KEY,
            open_timeout_s=10,
        )
        cfg = SessionConfig(
            rotate_after_s=3600.0,  # legs end here, by rotate() or a fault
            rotate_deadline_s=7200.0,
            healthy_after_s=0.2,  # a leg that lived this long clears the failure count
        )
        session = SonicSession(settings, cfg, None, SessionListener())
        before = sample()
        await session.start()
        pushed = 0
        stop_feed = asyncio.Event()

        async def feed() -> None:
            nonlocal pushed
            period = FRAME / 16000 / speed
            t0 = time.monotonic()
            while not stop_feed.is_set():
                session.push_audio(frame(pushed))
                pushed += 1
                delay = t0 + pushed * period - time.monotonic()
                await asyncio.sleep(max(0.0, delay))

        feeder = asyncio.create_task(feed(), name="soak-feed")
        seen: set[int] = set()

        def trim() -> None:
            # Runs on the stand-in's thread: keep only the frame numbers of finished
            # streams, so the stand-in's records do not count as the session's memory.
            for r in emu.records:
                if r.ended_ns and r.pcm:
                    seen.update(frame_ids(r.pcm))
                    r.pcm = bytearray()
                    r.events.clear()
                    r.late_events.clear()
                    r.output_events.clear()
                    r.audio_input_ns.clear()

        base: dict[str, float] = {}
        t_start = time.monotonic()
        t_base = t_start
        faults = 0
        trace: list[tuple[float, dict[str, float]]] = []
        try:
            for leg in range(1, legs + 1):
                if leg == warmup:
                    base, t_base = sample(), time.monotonic()
                if leg >= warmup and (leg - warmup) % 10 == 0:
                    trace.append((time.monotonic(), sample()))
                opened = session.attempts
                await asyncio.sleep(0.15)  # some audio on this leg
                if fault_every and leg % fault_every == 0:
                    kind = FAULTS[faults % len(FAULTS)]
                    faults += 1
                    emu.inject(kind)
                    deadline = time.monotonic() + 20
                    while session.attempts == opened or session.state == "connecting":
                        if session.fatal_error or time.monotonic() > deadline:
                            raise RuntimeError(f"no recovery from {kind}: {session.fatal_error}")
                        await asyncio.sleep(0.01)
                else:
                    await session.rotate()
                if session.fatal_error:
                    raise RuntimeError(session.fatal_error)
                if not os.environ.get("SOAK_DEBUG"):
                    emu.call(trim)
            await asyncio.sleep(0.5)  # the last closes finish, CRT callbacks land
            end = sample()  # like the warm-up sample: running, one live leg
            elapsed = time.monotonic() - t_base
        finally:
            stop_feed.set()
            await feeder
            await session.stop()
        settle = time.monotonic() + 5.0  # connections the CRT is still closing
        await asyncio.sleep(0.5)
        after = sample()
        while after["fds"] > before["fds"] and time.monotonic() < settle:
            await asyncio.sleep(0.25)
            after = sample()
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        if left:
            print("tasks left after stop:", [t.get_coro() for t in left], flush=True)
        records = list(emu.records)
        for r in records:
            seen.update(frame_ids(r.pcm))
        missing = sorted(set(range(pushed)) - seen)
        lost = len(missing)
        if os.environ.get("SOAK_DEBUG"):
            for r in records:
                ids = sorted(frame_ids(r.pcm))
                near = [i for i in ids if any(abs(i - m) < 15 for m in missing)]
                if near:
                    late = [e.name for e in r.late_events]
                    print(r.index, r.end_reason, near, late[:2], len(late))
            print("missing", missing)
            print([t.name for t in threading.enumerate()])
        out = {
            "legs": float(len(records)),
            "rotations": float(session.rotations),
            "recoveries": float(session.recoveries),
            "frames_pushed": float(pushed),
            "frames_lost": float(lost),
            "frames_dropped": float(session.frames_dropped),
            "seconds": time.monotonic() - t_start,
            "measured_s": elapsed,
        }
        for k, v in end.items():
            out[k] = v
            out[f"{k}_growth"] = v - base.get(k, v)
            out[f"{k}_after_stop"] = after[k]
            out[f"{k}_leaked"] = after[k] - before[k]  # after stop() vs before start()
            out[f"{k}_per_hour"] = slope_per_hour([*trace, (t_base + elapsed, end)], k)
        return out
    finally:
        emu.stop()
        ours.setLevel(level)


def run(
    legs: int = 100, fault_every: int = 7, speed: float = 1.0, warmup: int = 10
) -> dict[str, float]:
    """Soak ``legs`` streams; returns end figures, growth since leg ``warmup`` and losses."""
    threads = threading.active_count()
    out = asyncio.run(_soak(legs, fault_every, speed, min(warmup, max(1, legs // 2))))
    out["threads_left_after_run"] = float(threading.active_count() - threads)
    return out
