"""pytest plugin: a failing or hung run ends in minutes, with every process it started.

Loaded for the whole suite from pyproject's ``addopts`` (``-p test.harness.watchdog``).

Why: after one real failure (a tool timeout that did not cancel its goal) the suite sat
~15 minutes at interpreter exit, past pytest-timeout's 300 s: the test's action server
was still executing the goal on a ``MultiThreadedExecutor`` worker, and
``concurrent.futures`` joins every pool worker at exit, daemon or not. pytest-timeout
only times tests, never the exit, and it cannot reach a main thread stuck in C code.

What it does:

- **Per test** (setup + call + teardown): child processes that the test started and that
  are still alive after its teardown are killed (SIGTERM, SIGKILL after 2 s), whether
  the test passed or not: ROS nodes, pulseaudio, pacat, chromium, launch... Processes
  started by session/module fixtures (the PulseAudio server) are left to their fixture.
  The pytest process is made a child subreaper, so grandchildren whose parent died
  (a double-forking daemon, chromium's helpers) are still found.
- **After a failed test**, Python threads it started that are still running are ended by
  an asynchronous ``SystemExit`` (a goal's execute loop, a feeder thread); those that
  stay (blocked in C) are reported with their stacks.
- **A hung test**: a watchdog thread gives each test its pytest-timeout budget plus a
  grace (``SONIC_VOICE_WATCHDOG_GRACE``, 60 s), so pytest-timeout fires first. Past it,
  the stacks of all threads are dumped and the test's processes killed (that frees a
  test blocked on a child); if the test still does not move within 15 s, the run ends
  with ``FAILED <test> - watchdog: hung`` and exit status 1.
- **At exit**: threads that would block the interpreter's exit (non-daemon threads, pool
  workers) are reported with their stacks and the process ends with the session's exit
  status at once (``os._exit``) after killing every child process; any other hang on the
  way out is ended the same way after ``SONIC_VOICE_WATCHDOG_EXIT`` (60 s).

Everything it did is listed in a "watchdog" section of the terminal summary.
"""

from __future__ import annotations

import ctypes
import faulthandler
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable

import pytest

GRACE_S = float(os.environ.get("SONIC_VOICE_WATCHDOG_GRACE", "60"))
EXIT_S = float(os.environ.get("SONIC_VOICE_WATCHDOG_EXIT", "60"))
STUCK_S = float(os.environ.get("SONIC_VOICE_WATCHDOG_STUCK", "15"))
DEFAULT_TIMEOUT_S = 300.0

# The terminal, before pytest's fd capture redirects fd 2 (this module is imported by
# ``-p`` before capture starts).
try:
    _TERM_FD = os.dup(2)
except OSError:  # pragma: no cover - no stderr at all
    _TERM_FD = -1

_PR_SET_CHILD_SUBREAPER = 36


def _say(text: str) -> None:
    """Write to the real terminal, whatever pytest captures."""
    data = (text if text.endswith("\n") else text + "\n").encode(errors="replace")
    fd = _TERM_FD if _TERM_FD >= 0 else 2
    try:
        os.write(fd, data)
    except OSError:
        pass


def _dump_stacks(header: str) -> None:
    _say(header)
    if _TERM_FD >= 0:
        faulthandler.dump_traceback(file=_TERM_FD, all_threads=True)


# -- processes ------------------------------------------------------------------------
def _proc_table() -> dict[int, tuple[int, str, str]]:
    """pid -> (ppid, state, command name), from /proc."""
    table: dict[int, tuple[int, str, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                raw = f.read().decode(errors="replace")
        except OSError:
            continue
        head, _, rest = raw.rpartition(")")
        fields = rest.split()
        if len(fields) < 2:
            continue
        table[int(entry)] = (int(fields[1]), fields[0], head.partition("(")[2])
    return table


def descendants(root: int | None = None) -> dict[int, str]:
    """Live (non-zombie) descendants of ``root`` (this process): pid -> command name."""
    root = os.getpid() if root is None else root
    table = _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, str] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        ppid, state, name = table[pid]
        if state not in ("Z", "X"):
            out[pid] = name
        stack.extend(children.get(pid, []))
    return out


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:160]
    except OSError:
        return "?"


def kill_processes(pids: Iterable[int], term_wait_s: float = 2.0) -> list[str]:
    """SIGTERM ``pids``, SIGKILL what is left after ``term_wait_s``; reap our orphans.
    Returns one line per process ended."""
    pids = [p for p in pids if p != os.getpid()]
    lines_pids = list(pids)
    lines = [f"{p} {_cmdline(p)}" for p in pids]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = []
        for p in pids:
            try:
                os.kill(p, sig)
                alive.append(p)
            except ProcessLookupError:
                pass
        if not alive or sig == signal.SIGKILL:
            break
        deadline = time.monotonic() + term_wait_s
        while time.monotonic() < deadline:
            table = _proc_table()
            if all(table.get(p, (0, "Z", ""))[1] in ("Z", "X") for p in alive):
                break
            time.sleep(0.05)
        pids = alive
    _reap(lines_pids)
    return lines


def _reap(pids: Iterable[int]) -> None:
    """Reap the killed processes that are our children (orphans re-parented to us as
    subreaper, or a leaked Popen of a test that is over), so they leave no zombie."""
    me = os.getpid()
    table = _proc_table()
    for pid in pids:
        ppid, state, _ = table.get(pid, (0, "", ""))
        if ppid == me and state in ("Z", "X"):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass


# -- threads --------------------------------------------------------------------------
def _blocking_exit() -> list[threading.Thread]:
    """Threads the interpreter would join at exit: non-daemon ones and pool workers."""
    me = threading.current_thread()
    workers: set[threading.Thread] = set()
    try:
        from concurrent.futures import thread as cft

        workers = set(cft._threads_queues.keys())
    except Exception:  # noqa: BLE001
        pass
    return [
        t
        for t in threading.enumerate()
        if t is not me
        and t is not threading.main_thread()
        and t.is_alive()
        and (not t.daemon or t in workers)
    ]


def _raise_in(thread: threading.Thread, exc: type[BaseException] = SystemExit) -> bool:
    tid = thread.ident
    if tid is None:
        return False
    n = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), ctypes.py_object(exc))
    if n > 1:  # never more than one thread
        ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(tid), None)
        return False
    return n == 1


def end_threads(threads: list[threading.Thread], wait_s: float = 3.0) -> list[threading.Thread]:
    """Ask each thread to exit (an async SystemExit, delivered at its next Python line);
    returns those still alive after ``wait_s`` (blocked in C code)."""
    deadline = time.monotonic() + wait_s
    pending = [t for t in threads if t.is_alive()]
    while pending and time.monotonic() < deadline:
        for t in pending:
            _raise_in(t)
        time.sleep(0.2)
        pending = [t for t in pending if t.is_alive()]
    return pending


def _thread_stack(t: threading.Thread) -> str:
    import traceback

    frame = sys._current_frames().get(t.ident or -1)
    if frame is None:
        return "    (no Python frame)"
    return "".join("    " + line for line in traceback.format_stack(frame)[-6:]).rstrip()


# -- the plugin -----------------------------------------------------------------------
class Watchdog:
    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.notes: list[str] = []
        self.exitstatus: int = 0
        self.spared_pids: set[int] = set()
        self.spared_threads: set[int] = set()
        self._lock = threading.Lock()
        self._item: pytest.Item | None = None
        self._item_started = 0.0
        self._item_budget = DEFAULT_TIMEOUT_S
        self._item_pids: set[int] = set()
        self.failed: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._thread.start()

    # ---- per test
    def budget(self, item: pytest.Item) -> float:
        try:
            import pytest_timeout

            t = pytest_timeout._get_item_settings(item).timeout
        except Exception:  # noqa: BLE001 - plugin absent or changed: the ini value
            t = None
        return float(t) if t else DEFAULT_TIMEOUT_S

    def begin(self, item: pytest.Item) -> None:
        with self._lock:
            self._item = item
            self._item_started = time.monotonic()
            self._item_budget = self.budget(item)
            self._item_pids = set(descendants())
            self._item_threads = {t.ident for t in threading.enumerate()}

    def end(self, item: pytest.Item) -> None:
        with self._lock:
            self._item = None
        failed = item.nodeid in self.failed
        new_pids = [
            p for p in descendants() if p not in self._item_pids and p not in self.spared_pids
        ]
        if new_pids:
            ended = kill_processes(new_pids)
            self.notes.append(
                f"{item.nodeid}: {len(ended)} process(es) left running, killed: " + "; ".join(ended)
            )
        if failed:
            left = [
                t
                for t in threading.enumerate()
                if t.ident not in self._item_threads
                and t.ident not in self.spared_threads
                and t.is_alive()
            ]
            if left:
                stuck = end_threads(left)
                ended = [t.name for t in left if t not in stuck]
                note = f"{item.nodeid} (failed): ended threads {ended}"
                if stuck:
                    note += "; still running (blocked in C): " + ", ".join(
                        f"{t.name}\n{_thread_stack(t)}" for t in stuck
                    )
                self.notes.append(note)

    def spare(self, before_pids: set[int], before_threads: set[int | None]) -> None:
        """Processes and threads a wider-scoped fixture just started belong to it."""
        self.spared_pids |= set(descendants()) - before_pids
        self.spared_threads |= {
            t.ident for t in threading.enumerate() if t.ident not in before_threads
        }

    # ---- hung tests
    def _watch(self) -> None:
        while not self._stop.wait(1.0):
            with self._lock:
                item, started, budget = self._item, self._item_started, self._item_budget
                item_pids = self._item_pids
            if item is None or time.monotonic() - started < budget + GRACE_S:
                continue
            elapsed = time.monotonic() - started
            _dump_stacks(
                f"\nwatchdog: {item.nodeid} still running after {elapsed:.0f} s "
                f"(budget {budget:.0f} s + {GRACE_S:.0f} s grace); stacks of all threads:"
            )
            new = [p for p in descendants() if p not in item_pids and p not in self.spared_pids]
            if new:
                _say(
                    "watchdog: killing the test's processes:\n  "
                    + "\n  ".join(kill_processes(new, term_wait_s=1.0))
                )
            if self._stop.wait(STUCK_S):
                return
            with self._lock:
                still = self._item is item
            if still:
                self._abort(item, elapsed + STUCK_S)
            # else the kill freed it; its outcome is reported as usual.

    def _abort(self, item: pytest.Item, elapsed: float) -> None:
        reporter = self.config.pluginmanager.get_plugin("terminalreporter")
        counts = ""
        if reporter is not None:
            stats = getattr(reporter, "stats", {})
            counts = ", ".join(
                f"{len(v)} {k}" for k, v in stats.items() if k in ("passed", "failed", "error")
            )
        left = kill_processes(descendants(), term_wait_s=1.0)
        # The terminal summary will never be printed: give the failures so far here.
        for rep in getattr(reporter, "stats", {}).get("failed", []) if reporter else []:
            crash = getattr(getattr(rep, "longrepr", None), "reprcrash", None)
            msg = (crash.message.splitlines() or [""])[0] if crash is not None else ""
            _say(f"FAILED {rep.nodeid} - {msg}")
        _say(
            f"\nFAILED {item.nodeid} - watchdog: hung for {elapsed:.0f} s; ending the run"
            + (f" (so far: {counts})" if counts else "")
            + (f"; killed {len(left)} process(es)" if left else "")
        )
        os._exit(1)

    # ---- exit
    def at_exit(self) -> None:
        self._stop.set()
        stuck = _blocking_exit()
        left = kill_processes(descendants(), term_wait_s=1.0)
        if left:
            _say(f"watchdog: session end: killed {len(left)} process(es): " + "; ".join(left))
        if stuck:
            _say(
                "watchdog: these threads would block the interpreter's exit; exiting now "
                f"with status {self.exitstatus}:\n"
                + "\n".join(f"  {t.name} (daemon={t.daemon})\n{_thread_stack(t)}" for t in stuck)
            )
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(self.exitstatus)
        status = self.exitstatus

        def backstop() -> None:
            time.sleep(EXIT_S)
            _dump_stacks(f"watchdog: interpreter exit took over {EXIT_S:.0f} s; stacks:")
            kill_processes(descendants(), term_wait_s=0.5)
            os._exit(status or 1)

        threading.Thread(target=backstop, name="watchdog-exit", daemon=True).start()


_dog: Watchdog | None = None


def pytest_configure(config: pytest.Config) -> None:
    global _dog
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    except (OSError, AttributeError):
        pass
    _dog = Watchdog(config)


@pytest.hookimpl(hookwrapper=True)
def pytest_fixture_setup(fixturedef: pytest.FixtureDef, request: pytest.FixtureRequest):
    if _dog is None or fixturedef.scope == "function":
        yield
        return
    before_pids = set(descendants())
    before_threads = {t.ident for t in threading.enumerate()}
    yield
    _dog.spare(before_pids, before_threads)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    if _dog is not None:
        _dog.begin(item)
    yield
    if _dog is not None:
        _dog.end(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if _dog is not None and report.failed:
        _dog.failed.add(item.nodeid)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if _dog is not None:
        _dog.exitstatus = int(exitstatus)


def pytest_terminal_summary(terminalreporter) -> None:
    if _dog is not None and _dog.notes:
        terminalreporter.section("watchdog")
        for note in _dog.notes:
            terminalreporter.write_line(note)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config: pytest.Config) -> None:
    if _dog is not None:
        _dog.at_exit()
