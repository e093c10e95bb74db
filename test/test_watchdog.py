"""The watchdog (test/harness/watchdog.py): a failing or hung run ends in minutes.

Each test runs pytest on a small generated test file in a subprocess, as CI would run
the suite, and asserts on its exit status, its output and on what is left running.

The scenario is the one that hung CI for ~15 minutes: a test fails while its action
server is still executing a live goal (the execute callback never returns, as when a
tool timeout does not cancel its goal), with a child process and a stray non-daemon
thread still running. Without the watchdog that session never exits (checked by
``test_without_the_watchdog_the_session_hangs``, so the scenario cannot pass vacuously).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

CONFTEST = """
from test.conftest import pulse, ros_graph  # noqa: F401  (the suite's fixtures and isolation)
"""

LIVE_GOAL = """
import os
import subprocess
import threading
import time

from rclpy.action import ActionClient, ActionServer, CancelResponse
from rclpy.callback_groups import ReentrantCallbackGroup
from test_msgs.action import Fibonacci


def test_fails_with_a_live_goal(ros_graph):
    node = ros_graph.node("server")
    executing = threading.Event()

    def execute(handle):
        executing.set()
        while True:  # never ends, ignores the cancel: a goal nobody cancels
            time.sleep(0.05)

    ActionServer(
        node, Fibonacci, "fib", execute_callback=execute,
        cancel_callback=lambda _h: CancelResponse.ACCEPT,
        callback_group=ReentrantCallbackGroup(),
    )
    client = ActionClient(ros_graph.node("client"), Fibonacci, "fib")
    assert client.wait_for_server(timeout_sec=20)
    client.send_goal_async(Fibonacci.Goal(order=5))
    assert executing.wait(20), "the goal never started"
    child = subprocess.Popen(["sleep", "600"])
    with open(os.environ["WD_PIDFILE"], "w") as f:
        f.write(str(child.pid))
    threading.Thread(target=time.sleep, args=(3600,), name="stray-non-daemon").start()
    assert 1 + 1 == 3, "planted failure with a live goal"
"""

HUNG = '''
import os
import signal
import subprocess
import threading

import pytest


@pytest.mark.timeout(2)
def test_blocked_on_a_child():
    """Blocked where pytest-timeout's SIGALRM cannot reach it; killing the child frees it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    child = subprocess.Popen(["sleep", "600"])
    child.wait()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGALRM})
    assert child.returncode == 0, f"the child was killed ({child.returncode})"


@pytest.mark.timeout(2)
def test_blocked_for_ever():
    """Nothing frees it: the watchdog ends the run and names it."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
    child = subprocess.Popen(["sleep", "600"])
    with open(os.environ["WD_PIDFILE"], "w") as f:
        f.write(str(child.pid))
    threading.Event().wait()
'''


def _run(
    tmp_path: Path, body: str, timeout: float, *extra: str, env: dict | None = None
) -> tuple[int | None, str, float]:
    """pytest on a generated test file in a new session; (status or None if it had to be
    killed at ``timeout``, output, seconds)."""
    (tmp_path / "conftest.py").write_text(CONFTEST)
    (tmp_path / "test_generated.py").write_text(textwrap.dedent(body))
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "-c",
        str(ROOT / "pyproject.toml"),
        "--rootdir",
        str(tmp_path),
        *extra,
        str(tmp_path / "test_generated.py"),
    ]
    full_env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "WD_PIDFILE": str(tmp_path / "child.pid"),
        **(env or {}),
    }
    t0 = time.monotonic()
    proc = subprocess.Popen(
        cmd,
        cwd=tmp_path,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout)
        return proc.returncode, out, time.monotonic() - t0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        return None, out, time.monotonic() - t0


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


def _child_pid(tmp_path: Path) -> int:
    return int((tmp_path / "child.pid").read_text())


@pytest.mark.timeout(400)
def test_failure_with_a_live_goal_ends_the_run_in_minutes(tmp_path: Path) -> None:
    """A test fails with its action server executing a live goal, a child process and a
    stray non-daemon thread: the suite ends well within 5 minutes, reports the failure,
    and leaves nothing running."""
    status, out, seconds = _run(tmp_path, LIVE_GOAL, timeout=300)
    assert status is not None, f"the session was still running after 300 s:\n{out}"
    assert seconds < 300
    assert status == 1, out
    assert "1 failed" in out and "planted failure with a live goal" in out, out
    assert "FAILED" in out and "test_fails_with_a_live_goal" in out, out
    # What the watchdog did, in the report: the child killed, the goal's thread ended or
    # named, the thread that would have blocked the exit named.
    assert "process(es) left running, killed" in out and "sleep 600" in out, out
    assert "would block the interpreter's exit" in out and "stray-non-daemon" in out, out
    assert not _alive(_child_pid(tmp_path)), "the test's child process outlived the run"


@pytest.mark.timeout(120)
def test_without_the_watchdog_the_session_hangs(tmp_path: Path) -> None:
    """The control: the same session without the plugin is still running after 40 s (it
    would wait for ever on the goal's worker thread), so the test above proves the
    watchdog, not a scenario that ends by itself."""
    status, out, _ = _run(tmp_path, LIVE_GOAL, 40, "-p", "no:test.harness.watchdog")
    assert "1 failed" in out, out  # the failure was reported...
    assert status is None, f"...yet the session ended by itself (status {status}):\n{out}"


@pytest.mark.timeout(300)
def test_hung_tests_are_killed_with_their_children(tmp_path: Path) -> None:
    """Two tests pytest-timeout cannot interrupt (SIGALRM blocked in the main thread).
    The first is freed by killing its child and fails; the second is stuck for good:
    the watchdog dumps the stacks, names it FAILED and ends the run with status 1."""
    env = {"SONIC_VOICE_WATCHDOG_GRACE": "3", "SONIC_VOICE_WATCHDOG_STUCK": "5"}
    status, out, seconds = _run(tmp_path, HUNG, timeout=240, env=env)
    assert status == 1, out
    assert seconds < 120, out
    assert "test_blocked_on_a_child still running after" in out, out
    # Freed by killing its child, it failed (pytest-timeout's pending alarm, or its own
    # assertion) and is reported as such.
    first = out.split("test_blocked_for_ever still running")[0]
    assert "killing the test's processes:" in first and "sleep 600" in first, out
    assert "FAILED test_generated.py::test_blocked_on_a_child - " in out, out
    assert "FAILED test_generated.py::test_blocked_for_ever - watchdog: hung" in out, out
    assert "Current thread" in out or "Thread 0x" in out, out  # the stacks were dumped
    assert not _alive(_child_pid(tmp_path)), "the hung test's child outlived the run"
