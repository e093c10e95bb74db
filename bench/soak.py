"""Long soak: the Nova Sonic session through many rotations and recoveries (and, when
``bench/_soak_viewers.py`` exists, KVS viewers joining and vanishing), printing the growth
per hour of RSS, open file descriptors, asyncio tasks and threads.

CI runs a short version (test/test_soak_session.py, 100 legs in ~40 s); this runs longer:

    .venv/bin/python bench/soak.py --minutes 30 --legs 1000 --viewer-joins 500

Legs are run in rounds of ``--round`` legs until ``--legs`` are done or ``--minutes``
have passed (whichever first); each round is one ``_soak_session.run()`` (a fresh session
and stand-in), and the process-wide figures are sampled between rounds, so growth per
hour covers what rounds leave behind (the leak that matters on a robot that runs for
days) as well as within a round. Figures: ``name: value unit (goal ...)``.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, isolate, setup_path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--legs", type=int, default=1000)
    ap.add_argument("--viewer-joins", type=int, default=500)
    ap.add_argument("--round", type=int, default=100, help="legs per session round")
    ap.add_argument("--fault-every", type=int, default=7)
    ap.add_argument(
        "--speed", type=float, default=1.0, help="microphone audio at this many times real time"
    )
    args = ap.parse_args()
    isolate()
    setup_path()
    import _soak_session as soak

    try:
        viewers = importlib.import_module("_soak_viewers")
    except ImportError:
        viewers = None
        print("viewers: bench/_soak_viewers.py not found; session soak only", flush=True)

    deadline = time.monotonic() + args.minutes * 60
    t0 = time.monotonic()
    samples: list[tuple[float, dict[str, float]]] = []
    legs = lost = rounds = 0
    within: dict[str, list[float]] = {}
    while legs < args.legs and time.monotonic() < deadline:
        n = min(args.round, args.legs - legs)
        r = soak.run(legs=n, fault_every=args.fault_every, speed=args.speed)
        rounds += 1
        legs += int(r["legs"])
        lost += int(r["frames_lost"])
        for k in ("rss_mb", "fds", "tasks", "threads"):
            within.setdefault(k, []).append(r[f"{k}_per_hour"])
        samples.append((time.monotonic(), asyncio.run(_sample(soak))))
        print(
            f"round {rounds}: {int(r['legs'])} legs in {r['seconds']:.0f} s, "
            f"{int(r['frames_lost'])} frames lost, rss {samples[-1][1]['rss_mb']:.1f} MB, "
            f"fds {samples[-1][1]['fds']:.0f}, threads {samples[-1][1]['threads']:.0f}",
            flush=True,
        )
    hours = (time.monotonic() - t0) / 3600
    figure("soak_legs", legs, "legs", f"{args.legs}")
    figure("soak_minutes", hours * 60, "min")
    figure("soak_frames_lost", lost, "frames", "0")
    for k, unit in (
        ("rss_mb", "MB/h"),
        ("fds", "fds/h"),
        ("tasks", "tasks/h"),
        ("threads", "threads/h"),
    ):
        across = soak.slope_per_hour(samples, k) if len(samples) >= 3 else 0.0
        mean_within = sum(within[k]) / len(within[k]) if within.get(k) else 0.0
        figure(f"soak_{k}_growth_across_rounds", across, unit, "~0")
        figure(f"soak_{k}_growth_within_round", mean_within, unit, "~0")
    if viewers is not None:  # KVS viewers joining and vanishing (another developer's part)
        v = viewers.run(joins=args.viewer_joins)
        for k, val in v.items():
            figure(f"soak_viewers_{k}", val, "")


async def _sample(soak: object) -> dict[str, float]:
    return soak.sample()  # type: ignore[attr-defined]


if __name__ == "__main__":
    main()
