"""CI soak of the Nova Sonic session (issue 11): 100 legs through the real SDK against the
Bedrock stand-in, each ended by rotate() or (every 7th) a recoverable fault, audio flowing
the whole time as tagged frames. Bounds, stated: from leg 10 to leg 100 RSS grows by at
most 25 MB (measured 4-7 MB: ~50 KB a leg, i.e. ~0.5 MB a day at one rotation per 6 min);
after stop() against before start() (the SDK's one-time start-up included): at most 8 fds
more (measured 4), no task left, threads within asyncio's default executor pool
(measured 0-5 more; none left once the loop closes); 0 frames lost.
bench/soak.py runs the same for longer and prints growth per hour."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import _soak_session


@pytest.mark.timeout(180)
def test_session_soak_100_legs_flat_and_lossless() -> None:
    r = _soak_session.run(legs=100, fault_every=7, speed=1.0, warmup=10)
    print({k: round(v, 2) for k, v in r.items()})
    assert r["legs"] >= 100
    assert r["recoveries"] >= 13 and r["rotations"] >= 80
    assert r["frames_lost"] == 0, f"{r['frames_lost']:.0f} of {r['frames_pushed']:.0f} frames lost"
    assert r["frames_dropped"] == 0
    assert r["rss_mb_growth"] <= 25.0, r  # leg 10 -> leg 100, running
    # After stop vs before start: includes the SDK's one-time start-up (imports, the CRT's
    # event-loop group and its epoll/eventfd descriptors): measured 24 MB and 4 fds.
    assert r["rss_mb_leaked"] <= 40.0, r
    assert r["fds_leaked"] <= 8, r
    assert r["fds_growth"] <= 20, r  # mid-run: closes of old legs still in flight
    assert r["tasks_leaked"] == 0, r
    assert r["tasks_growth"] <= 3, r
    # asyncio's default executor (a bounded pool, shut down with the loop; run() leaves only
    # the main thread) fills up to min(32, cpus + 4) workers: measured 0-5 more.
    assert r["threads_leaked"] <= min(32, (os.cpu_count() or 1) + 4), r
    assert r["threads_growth"] <= min(32, (os.cpu_count() or 1) + 4), r
    assert r["threads_left_after_run"] == 0, r
