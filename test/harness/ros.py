"""Isolated ROS 2 graphs for tests.

Each :class:`RosGraph` has its own rclpy ``Context`` on its own ``ROS_DOMAIN_ID``, with
discovery limited to localhost, and an executor spinning in a thread that is joined on
close (a daemon thread still spinning at interpreter exit aborts the process with
"terminate called without an active exception").
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections.abc import Callable

import rclpy
from rclpy.context import Context
from rclpy.executors import MultiThreadedExecutor, SingleThreadedExecutor
from rclpy.node import Node

# Domain ids 1..100, a different base per test process so parallel runs do not meet.
_domains = itertools.count(1 + (os.getpid() % 50))


# Domains where a graph saw nodes that were not its own (a leaked participant from an earlier
# test, or a process a test started): not handed out again, and said in the summary.
tainted: dict[int, list[str]] = {}


def next_domain_id() -> int:
    """A domain for the next graph; the ~250 graphs of a full run go round the 100 domains
    more than once, so a domain where strangers were seen is skipped."""
    for _ in range(100):
        domain = 1 + (next(_domains) - 1) % 100
        if domain not in tainted:
            return domain
    return domain


class RosGraph:
    def __init__(
        self, domain_id: int | None = None, threads: int = 4, executor: str = "multi"
    ) -> None:
        """``executor="single"`` spins like the product (run_node, the runner): benchmarks
        use it; tests keep "multi" so blocking test servers still take cancels."""
        self.domain_id = domain_id if domain_id is not None else next_domain_id()
        self.context = Context()
        rclpy.init(context=self.context, domain_id=self.domain_id)
        if executor == "single":
            self.executor = SingleThreadedExecutor(context=self.context)
        else:
            self.executor = MultiThreadedExecutor(num_threads=threads, context=self.context)
        self.nodes: list[Node] = []
        # (name, namespace) of nodes a test starts in other processes on this domain
        self.expected_strangers: list[tuple[str, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._spin, name="ros-graph", daemon=True)
        self._thread.start()

    def _spin(self) -> None:
        """``executor.spin()`` until :meth:`close` sets ``_stop`` (then the executor is
        still whole: see :meth:`close`)."""
        try:
            while not self._stop.is_set() and self.context.ok():
                self.executor.spin_once(timeout_sec=0.05)
        except Exception:  # noqa: BLE001 - shutdown races end the spin
            pass

    def node(self, name: str, spin: bool = True, **kwargs) -> Node:
        """A plain helper node on this graph. ``spin=False``: not spun yet (``add`` it once
        its action clients exist: an ActionClient made on a node another thread already
        spins can lose goal answers, ros/compat.py item 2)."""
        node = Node(name, context=self.context, **kwargs)
        return self.add(node) if spin else node

    def add(self, node: Node, bring_up: bool | None = None) -> Node:
        """Spin ``node``; a sonic_voice lifecycle node is also configured and activated (as
        the runner does) when its ``autostart`` parameter is true or ``bring_up`` says so."""
        from sonic_voice.ros.node import VoiceNode
        from sonic_voice.ros.node import bring_up as up

        self.nodes.append(node)
        if isinstance(node, VoiceNode):
            if bring_up is None:
                bring_up = bool(node.get_parameter("autostart").value)
            if bring_up:  # before spinning it, as the runner does (ros/compat.py item 2)
                up(node)
        self.executor.add_node(node)
        return node

    def close(self) -> None:
        """Stop sonic_voice nodes while the executor still spins (goals get cancelled),
        then stop spinning and destroy everything."""
        import concurrent.futures

        from sonic_voice.ros.node import VoiceNode

        self._check_strangers()
        voice = [n for n in reversed(self.nodes) if isinstance(n, VoiceNode)]
        concurrent.futures.wait([n.begin_stop() for n in voice], timeout=5)
        # Stop spinning, then let callbacks still running on the pool finish (bounded)
        # before the shutdown: rclpy's shutdown does not wait for them and destroys the
        # guard condition each one triggers as it ends ("The following exception was
        # never retrieved: cannot use Destroyable ..." at garbage collection).
        self._stop.set()
        self._thread.join(10)
        running = [f for f in getattr(self.executor, "_futures", []) if not f.done()]
        deadline = time.monotonic() + 2.0
        while running and time.monotonic() < deadline:
            time.sleep(0.01)
            running = [f for f in running if not f.done()]
        if isinstance(self.executor, MultiThreadedExecutor):
            # Do not join the pool: a callback that never returns (a goal nobody
            # cancelled, after a failed test) would hang the teardown for ever. Such a
            # thread is ended by the watchdog (test/harness/watchdog.py).
            self.executor.shutdown(timeout_sec=5, wait_for_threads=False)
        else:
            self.executor.shutdown(timeout_sec=5)
        for n in reversed(self.nodes):
            try:
                if isinstance(n, VoiceNode):
                    n.release()
                n.destroy_node()
            except Exception:  # noqa: BLE001
                pass
        self.context.try_shutdown()

    def _check_strangers(self) -> None:
        """Nodes on this domain that are not this graph's: a graph or process another test
        left running (it answers this test's clients too). Cheap: the graph cache."""
        if not self.nodes:
            return
        ours = {(n.get_name(), n.get_namespace()) for n in self.nodes}
        ours |= set(self.expected_strangers)
        try:
            seen = self.nodes[0].get_node_names_and_namespaces()
        except Exception:  # noqa: BLE001 - a destroyed node: nothing to say
            return
        strangers = sorted(f"{ns.rstrip('/')}/{n}" for n, ns in seen if (n, ns) not in ours)
        if strangers:
            test = os.environ.get("PYTEST_CURRENT_TEST", "?").rsplit(" ", 1)[0]
            tainted[self.domain_id] = [test, *strangers]


def wait_for(predicate: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Wait until ``predicate()`` is true; for conditions that have no event to await."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()
