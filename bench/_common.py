"""Shared by the benchmarks: run inside a private network namespace, percentile maths,
the one-line figure format ``name: value unit (goal ...)``, and the standard background
load under which every latency benchmark also measures.

The load (``--load``): one busy process per core (two on the 2-core development machine),
each a pure-Python loop at normal priority, started when a loaded phase begins and killed
when it ends (and with the benchmark, even when it dies: ``PR_SET_PDEATHSIG``). It stands
for what shares a robot's computer (navigation, perception, a browser): work that takes
the cores in full time slices, so a latency-critical thread waits for a slice to end
unless it wakes with priority. ``--load both`` (the default) measures quiet, then loaded,
and prints the two side by side; ``off``/``on`` measure one phase.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent

QUIET, LOADED = "quiet", "loaded"
PHASES = {"off": [QUIET], "on": [LOADED], "both": [QUIET, LOADED]}

# The busy loop of one load process: dies with its parent (PR_SET_PDEATHSIG = 1, SIGKILL
# = 9), also when the parent is gone before prctl took effect.
# Normal priority even when the benchmark itself runs with another (chrt, nice).
_BUSY = """
import ctypes, os, sys
ctypes.CDLL(None).prctl(1, 9)
if os.getppid() != int(sys.argv[1]):
    raise SystemExit
os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
try:
    os.setpriority(os.PRIO_PROCESS, 0, 0)
except OSError:
    pass
while True:
    pass
"""


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
    if len(values) == 0:
        return float("nan")
    return float(np.percentile(np.asarray(values, dtype=float), q))


def missed(value: float, goal: str) -> bool:
    """Whether ``value`` misses a goal written ``<= X ...`` (other goals are not judged)."""
    words = goal.split()
    if len(words) < 2 or words[0] != "<=":
        return False
    try:
        return value > float(words[1])
    except ValueError:
        return False


def figure(name: str, value: float, unit: str, goal: str = "") -> None:
    tail = ""
    if goal:
        tail = f" (goal {goal}{'; MISSED' if missed(value, goal) else ''})"
    print(f"{name}: {value:.2f} {unit}{tail}", flush=True)


# --------------------------------------------------------------------------- load
def add_load_option(parser: argparse.ArgumentParser, default: str = "both") -> None:
    parser.add_argument(
        "--load",
        choices=sorted(PHASES),
        default=default,
        help=f"background load: {os.cpu_count()} busy processes (one per core, normal "
        "priority); 'both' measures quiet then loaded, side by side (default: %(default)s)",
    )


def add_rt_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--rt",
        type=int,
        default=0,
        metavar="PRIO",
        help="run the robot side at SCHED_RR priority PRIO (1-99; needs root or "
        "CAP_SYS_NICE), as a robot would give its audio path; stand-ins, far ends and the "
        "load stay at normal priority (default 0: normal priority)",
    )


def real_time(prio: int) -> None:
    """This process (and the threads it starts later) at SCHED_RR ``prio``; 0 = as is."""
    if prio:
        try:
            os.sched_setscheduler(0, os.SCHED_RR, os.sched_param(prio))
        except PermissionError:
            raise SystemExit(f"--rt {prio}: not permitted (root or CAP_SYS_NICE)") from None


def normal_priority() -> None:
    """A child that stands for something else (a stand-in, a far end): not real-time."""
    os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def phases(choice: str) -> list[str]:
    return list(PHASES[choice])


class BusyLoad:
    """One busy pure-Python process per core, at normal priority, for the time of a
    ``with`` block; ``cores`` is how many cores they actually got meanwhile (on a machine
    shared with others, less than their number)."""

    def __init__(self, n: int | None = None) -> None:
        self.n = n or os.cpu_count() or 2
        self.procs: list[subprocess.Popen] = []
        self.cores = 0.0
        self._t0 = 0.0

    def __enter__(self) -> BusyLoad:
        for _ in range(self.n):
            self.procs.append(
                subprocess.Popen(
                    [sys.executable, "-c", _BUSY, str(os.getpid())],
                    stdin=subprocess.DEVNULL,
                    close_fds=True,
                )
            )
        self._t0 = time.monotonic()
        time.sleep(0.5)  # they run before the measurement starts
        return self

    def __exit__(self, *exc: object) -> None:
        wall = time.monotonic() - self._t0
        used = sum(cpu_seconds(p.pid) for p in self.procs)
        self.cores = used / wall if wall > 0 else 0.0
        for p in self.procs:
            p.kill()
        for p in self.procs:
            p.wait()
        self.procs.clear()


def cpu_seconds(pid: int) -> float:
    """utime + stime of process ``pid`` (all its threads) so far, from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@dataclass
class Phase:
    """What a phase ran under, for the report."""

    name: str
    loadavg_before: float = 0.0
    load_cores: float = 0.0


@contextlib.contextmanager
def phase(name: str) -> Iterator[Phase]:
    """Run the block quiet or under :class:`BusyLoad`, recording what it ran under."""
    info = Phase(name, os.getloadavg()[0])
    print(f"-- phase {name} (load average {info.loadavg_before:.2f})", flush=True)
    if name == LOADED:
        with BusyLoad() as load:
            yield info
        info.load_cores = load.cores
    else:
        yield info


@dataclass
class Figures:
    """Figures of several phases, printed side by side, then one line each:
    ``name: value unit (goal ...)`` for the quiet phase, ``name_loaded: ...`` for the
    loaded one."""

    rows: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)
    values: dict[tuple[str, str], float] = field(default_factory=dict)
    phases: list[Phase] = field(default_factory=list)

    def add(self, phase_name: str, name: str, value: float, unit: str, goal: str = "") -> None:
        """One figure of one phase; ``goal`` may differ per phase (quiet vs loaded)."""
        for row_name, _unit, goals in self.rows:
            if row_name == name:
                goals[phase_name] = goal
                break
        else:
            self.rows.append((name, unit, {phase_name: goal}))
        self.values[(phase_name, name)] = value

    def print(self) -> None:
        names = [n for n in (QUIET, LOADED) if any(k[0] == n for k in self.values)]
        for p in self.phases:
            if p.name == LOADED:
                print(
                    f"load: {os.cpu_count()} busy processes got {p.load_cores:.2f} cores on "
                    f"average (load average before: {p.loadavg_before:.2f})"
                )
            else:
                print(f"quiet: load average before {p.loadavg_before:.2f} (other users' work)")
        width = max(len(r[0]) for r in self.rows) + 2 if self.rows else 10
        print(f"{'figure':{width}s}" + "".join(f"{n:>14s}" for n in names) + "  goal")
        for name, unit, goals in self.rows:
            cells = ""
            for n in names:
                v = self.values.get((n, name))
                cells += f"{'-' if v is None else f'{v:.2f} {unit}':>14s}"
            given = {n: g for n, g in goals.items() if g}
            if len(set(given.values())) == 1:
                goal = next(iter(given.values()))
            else:
                goal = "; ".join(f"{n} {g}" for n, g in given.items())
            print(f"{name:{width}s}{cells}  {goal}")
        for n in names:
            for name, unit, goals in self.rows:
                v = self.values.get((n, name))
                if v is not None:
                    figure(name if n == QUIET else f"{name}_{n}", v, unit, goals.get(n, ""))
