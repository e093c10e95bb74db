"""A NAT + TURN network for WebRTC tests, built from private network namespaces.

::

    robot ns  10.77.1.2 ──┐                         ┌── 198.18.0.2  the test's own namespace
                          ├── router ns (nftables) ─┤   ("the internet"): coturn + KVS stand-in
    viewer ns 10.77.2.2 ──┘   masquerade out of      └
                              198.18.0.1; drops robot <-> viewer

The router masquerades both LANs behind 198.18.0.1 with random source ports (a NAT that
maps each flow separately, so server-reflexive candidates are useless to the other side)
and drops anything forwarded between the two LANs, so the only path from robot to viewer
is through the TURN relay. Addresses are private test ranges (10.77.0.0/16, RFC 2544's
198.18.0.0/15); the test namespace has no default route and neither has the router, so
nothing leaves the machine. Everything runs inside ``scripts/isolated.sh``'s namespace.

Namespaces are held open by ``unshare -n sleep`` children (no ``ip netns``: that writes
under the host's ``/run/netns``). Python code joins one with ``os.setns`` on a thread of its
own (:class:`NsLoop`): sockets belong to the namespace of the thread that creates them, so
a whole aiortc peer runs in the robot's or the viewer's network from this one process.

:class:`Coturn` runs Debian's ``turnserver`` with a temporary config in the REST-API
shared-secret mode (``use-auth-secret``): the KVS stand-in mints time-limited credentials
(``<expiry>:<user>`` / base64 HMAC-SHA1) that coturn checks against the same secret, like
the real service's TURN relays (kvs-signaling.md §1.3).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

PUBLIC_IP = "198.18.0.2"  # the test namespace: TURN server and KVS stand-in
ROUTER_PUBLIC_IP = "198.18.0.1"  # where both LANs appear from, NATed
ROBOT_IP = "10.77.1.2"
VIEWER_IP = "10.77.2.2"
ROBOT_NET = "10.77.1.0/24"
VIEWER_NET = "10.77.2.0/24"
TURN_PORT = 3478
TURN_REALM = "sonic-voice.test"

_NFT_RULES = f"""
table ip sv_nat {{
  chain post {{
    type nat hook postrouting priority 100; policy accept;
    oifname "r-pub" masquerade random
  }}
}}
table inet sv_filter {{
  chain sv_forward {{
    type filter hook forward priority 0; policy accept;
    ip saddr {ROBOT_NET} ip daddr {VIEWER_NET} counter drop
    ip saddr {VIEWER_NET} ip daddr {ROBOT_NET} counter drop
    iifname "r-pub" ct state new counter drop
  }}
  chain sv_input {{
    type filter hook input priority 0; policy drop;
    ct state established,related accept
    iifname "lo" accept
    counter
  }}
}}
"""


class TopologyUnavailable(RuntimeError):
    """This machine cannot build the topology; the message says why (tests skip with it)."""


def _run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess:
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=10, **kw)
    if res.returncode != 0:
        raise TopologyUnavailable(f"{' '.join(cmd)}: {res.stderr.strip() or res.returncode}")
    return res


def unavailable_reason() -> str | None:
    """Why the topology cannot be built here, or None if it can."""
    if os.environ.get("SONIC_VOICE_NETNS") != "1":
        return "not inside scripts/isolated.sh's private network namespace"
    if os.geteuid() != 0:
        return "needs root (veth pairs and nftables in private namespaces)"
    for tool in ("ip", "nft", "unshare", "nsenter", "turnserver"):
        if shutil.which(tool) is None:
            pkg = {"nft": "nftables", "turnserver": "coturn", "ip": "iproute2"}.get(tool, "")
            return f"{tool} not installed" + (f" (Debian package {pkg})" if pkg else "")
    if not hasattr(os, "setns"):
        return "os.setns missing (Python >= 3.12 on Linux)"
    return None


class Namespace:
    """A network namespace held open by an ``unshare -n sleep`` child."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.proc = subprocess.Popen(
            ["unshare", "-n", "sleep", "infinity"], stdin=subprocess.DEVNULL
        )
        path = f"/proc/{self.proc.pid}/ns/net"
        deadline = time.monotonic() + 5
        while os.readlink(path) == os.readlink("/proc/self/ns/net"):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise TopologyUnavailable(f"unshare -n failed for {name}")
            time.sleep(0.01)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def sh(self, *cmds: str) -> None:
        for cmd in cmds:
            _run(["nsenter", "-t", str(self.pid), "-n", "sh", "-c", cmd])

    def popen(self, cmd: list[str], **kw: Any) -> subprocess.Popen:
        return subprocess.Popen(["nsenter", "-t", str(self.pid), "-n", *cmd], **kw)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(5)


class NsLoop:
    """An asyncio loop on a thread that lives in ``ns``'s network namespace.

    ``await loop.run(coro)`` from another loop runs ``coro`` there (every socket it opens,
    and every thread it starts, belongs to that namespace).
    """

    def __init__(self, ns: Namespace) -> None:
        self.ns = ns
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        err: list[BaseException] = []

        def main() -> None:
            try:
                fd = os.open(f"/proc/{ns.pid}/ns/net", os.O_RDONLY)
                try:
                    os.setns(fd, os.CLONE_NEWNET)
                finally:
                    os.close(fd)
            except OSError as e:
                err.append(e)
                ready.set()
                return
            asyncio.set_event_loop(self.loop)
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=main, name=f"ns-{ns.name}", daemon=True)
        self.thread.start()
        ready.wait(5)
        if err:
            raise TopologyUnavailable(f"setns into {ns.name}: {err[0]}")

    def submit(self, coro: Coroutine) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    async def run(self, coro: Coroutine, timeout: float = 60.0) -> Any:  # noqa: ASYNC109
        return await asyncio.wait_for(asyncio.wrap_future(self.submit(coro)), timeout)

    def close(self) -> None:
        if self.loop.is_running():

            async def _drain() -> None:
                tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

            try:
                self.submit(_drain()).result(10)
            except Exception:  # noqa: BLE001 - closing anyway
                pass
            self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        if not self.loop.is_running():
            self.loop.close()


class NatTopology:
    """``with NatTopology() as net:`` robot, viewer and router namespaces, wired and NATed."""

    def __init__(self) -> None:
        self.namespaces: list[Namespace] = []
        self.robot: Namespace | None = None
        self.viewer: Namespace | None = None
        self.router: Namespace | None = None

    def up(self) -> NatTopology:
        reason = unavailable_reason()
        if reason:
            raise TopologyUnavailable(reason)
        try:
            self._build()
        except BaseException:
            self.down()
            raise
        return self

    def _build(self) -> None:
        self.robot, self.viewer, self.router = (Namespace(n) for n in ("robot", "viewer", "router"))
        self.namespaces = [self.robot, self.viewer, self.router]
        g, r, v = self.router.pid, self.robot.pid, self.viewer.pid
        for cmd in (
            "ip link add c-pub type veth peer name r-pub",
            f"ip link set r-pub netns {g}",
            "ip link add r-rob type veth peer name rob0",
            f"ip link set r-rob netns {g}",
            f"ip link set rob0 netns {r}",
            "ip link add r-vw type veth peer name vw0",
            f"ip link set r-vw netns {g}",
            f"ip link set vw0 netns {v}",
            f"ip addr add {PUBLIC_IP}/24 dev c-pub",
            "ip link set c-pub up",
            # Private addresses are routed to the router, which drops what it did not NAT
            # (a relay sending to a peer's host address gets silence, not an error).
            f"ip route add 10.77.0.0/16 via {ROUTER_PUBLIC_IP}",
        ):
            _run(cmd.split())
        self.router.sh(
            "ip link set lo up",
            f"ip addr add {ROUTER_PUBLIC_IP}/24 dev r-pub",
            "ip link set r-pub up",
            "ip addr add 10.77.1.1/24 dev r-rob",
            "ip link set r-rob up",
            "ip addr add 10.77.2.1/24 dev r-vw",
            "ip link set r-vw up",
            "echo 1 > /proc/sys/net/ipv4/ip_forward",
        )
        for ns, ip, dev, gw in (
            (self.robot, ROBOT_IP, "rob0", "10.77.1.1"),
            (self.viewer, VIEWER_IP, "vw0", "10.77.2.1"),
        ):
            ns.sh(
                "ip link set lo up",
                f"ip addr add {ip}/24 dev {dev}",
                f"ip link set {dev} up",
                f"ip route add default via {gw}",
            )
        _run(["nsenter", "-t", str(g), "-n", "nft", "-f", "-"], input=_NFT_RULES)

    def drops(self) -> dict[str, int]:
        """Packets the router dropped between the LANs: {"robot->viewer": n, "viewer->robot": n}."""
        assert self.router is not None
        res = _run(
            ["nsenter", "-t", str(self.router.pid), "-n", "nft", "-j", "list", "chain", "inet",
             "sv_filter", "sv_forward"]
        )  # fmt: skip
        counts = []
        for item in json.loads(res.stdout)["nftables"]:
            rule = item.get("rule")
            if rule:
                counts.extend(e["counter"]["packets"] for e in rule["expr"] if "counter" in e)
        return {"robot->viewer": counts[0], "viewer->robot": counts[1]}

    def down(self) -> None:
        for ns in self.namespaces:
            ns.close()
        self.namespaces = []
        subprocess.run(["ip", "link", "del", "c-pub"], capture_output=True)

    def __enter__(self) -> NatTopology:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


class Coturn:
    """Debian's coturn on ``PUBLIC_IP``, REST-API auth with ``secret``; start/stop/restart.

    ``max_lifetime`` caps allocation lifetimes (aioice refreshes at 5/6 of it), so a test
    sees allocation refreshes, and what credentials they carry, within seconds.
    """

    def __init__(self, workdir: Path, secret: str, *, max_lifetime: int = 600) -> None:
        self.workdir = Path(workdir)
        self.secret = secret
        self.max_lifetime = max_lifetime
        self.proc: subprocess.Popen | None = None
        self.log_path = self.workdir / "turnserver.log"
        self.conf = self.workdir / "turnserver.conf"
        self.conf.write_text(
            "\n".join(
                [
                    f"listening-ip={PUBLIC_IP}",
                    f"relay-ip={PUBLIC_IP}",
                    f"listening-port={TURN_PORT}",
                    "min-port=49152",
                    "max-port=49407",
                    "use-auth-secret",
                    f"static-auth-secret={secret}",
                    f"realm={TURN_REALM}",
                    f"max-allocate-lifetime={max_lifetime}",
                    "fingerprint",
                    "no-tls",
                    "no-dtls",
                    "no-tcp-relay",
                    "no-cli",
                    "no-multicast-peers",
                    "no-software-attribute",
                    f"userdb={self.workdir / 'turndb'}",
                    f"pidfile={self.workdir / 'turnserver.pid'}",
                    "simple-log",
                    "verbose",
                    "",
                ]
            )
        )

    @property
    def uri(self) -> str:
        return f"turn:{PUBLIC_IP}:{TURN_PORT}?transport=udp"

    def start(self, timeout: float = 10.0) -> None:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        log = open(self.log_path, "a")
        self.proc = subprocess.Popen(
            ["turnserver", "-c", str(self.conf), "--log-file", "stdout"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text()[-2000:]
                self.stop()
                raise TopologyUnavailable(f"turnserver did not start: {tail}")
            time.sleep(0.05)

    def _answers(self) -> bool:
        """A STUN binding request to the server gets an answer."""
        req = b"\x00\x01\x00\x00\x21\x12\xa4\x42" + os.urandom(12)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.1)
            try:
                s.sendto(req, (PUBLIC_IP, TURN_PORT))
                data = s.recv(2048)
            except OSError:
                return False
        return data[:2] == b"\x01\x01" and data[8:20] == req[8:20]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # the relay vanishes, as in an outage
            self.proc.wait(5)
        self.proc = None

    def log_text(self) -> str:
        return self.log_path.read_text() if self.log_path.exists() else ""
