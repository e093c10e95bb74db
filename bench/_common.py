"""Shared by the benchmarks: run inside a private network namespace, percentile maths,
and the one-line figure format ``name: value unit (goal ...)``."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent


def isolate() -> None:
    """Re-exec this benchmark through scripts/isolated.sh unless already isolated."""
    if os.environ.get("SONIC_VOICE_NETNS"):
        return
    os.environ["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    script = str(ROOT / "scripts" / "isolated.sh")
    os.execv("/bin/bash", ["bash", script, sys.executable, *sys.argv])


def setup_path() -> None:
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))


def pct(values: list[float] | np.ndarray, q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q))


def figure(name: str, value: float, unit: str, goal: str = "") -> None:
    tail = f" (goal {goal})" if goal else ""
    print(f"{name}: {value:.2f} {unit}{tail}", flush=True)
