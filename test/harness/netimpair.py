"""A UDP impairment relay between two WebRTC peers on loopback: loss and jitter on a real
network path (real sockets, real SRTP), controlled and seeded by the test.

``tc netem`` is missing in this kernel (tbf/htb exist but only shape rate, they cannot drop
or reorder), so the path is a relay: each peer's ICE host candidate is rewritten, in the
SDP the *other* peer receives, to one of the relay's two sockets. All traffic (STUN, DTLS,
SRTP, SRTCP) then flows through the relay, which forwards it in its own thread:

    A ──► relay.face_b (127.0.0.2:Y) ──[a_to_b impairment]──► B
    A ◄── [b_to_a impairment] ◄── relay.face_a (127.0.0.2:X) ◄── B

Only RTP/RTCP datagrams (first byte 128..191) are impaired; STUN and DTLS pass untouched so
set-up is deterministic, and the first ``warmup_packets`` RTP packets of each direction
pass too (so both ends agree on the stream's first timestamp). Loss is Bernoulli with
``loss_pct``; jitter adds a uniform random delay in ``[0, jitter_ms]`` to ``delay_ms``
(packets may reorder, as on a real path). One ``random.Random(seed)`` per direction.

The relay also logs, for benchmarks, when each RTP timestamp first entered it (the send
time, to ~0.1 ms on loopback): ``relay.first_seen[direction][rtp_ts]``.
"""

from __future__ import annotations

import heapq
import random
import re
import selectors
import socket
import threading
import time
from dataclasses import dataclass, field

HOST = "127.0.0.2"


@dataclass
class Impairment:
    loss_pct: float = 0.0
    jitter_ms: float = 0.0
    delay_ms: float = 0.0
    seed: int = 1
    warmup_packets: int = 10
    # Bottleneck: 0 = none. A FIFO drained at ``rate_kbps`` of whole IP packets, as a real
    # link counts them: the datagram (RTP header and extensions, codec payload, SRTP tag)
    # plus ``ip_udp_overhead`` bytes of UDP and IPv4 header. RTP and RTCP share it. So
    # "12 kbit/s" is the link, not the codec: Opus in 20 ms packets needs ~23 kbit/s of
    # headers alone there (50 x 58 bytes), whatever its own bitrate. A packet that would
    # wait over ``queue_ms`` in it is dropped (tail drop, as a router's buffer; 200 ms is
    # a modest buffer: home routers and cellular links often hold more).
    rate_kbps: float = 0.0
    queue_ms: float = 200.0
    queue_rtcp: bool = True  # RTCP waits in the bottleneck queue too, and counts in the rate
    ip_udp_overhead: int = 28  # IPv4 (20) + UDP (8)
    # "payload": count only RTP media payload (codec bits; RTCP free), the model before
    # 2026-11: kept so old figures can be compared; no real link counts that way.
    count: str = "wire"


@dataclass
class DirectionStats:
    rtp: int = 0
    rtcp: int = 0
    dropped: int = 0
    queue_dropped: int = 0  # of ``dropped``: by the bottleneck's full queue
    # (arrival, bytes counted) of every RTP/RTCP packet that entered the bottleneck
    offered: list[tuple[float, int]] = field(default_factory=list)
    other: int = 0
    delays_ms: list[float] = field(default_factory=list)


_CAND = re.compile(r"^a=candidate:(\S+) (\d) (udp) (\d+) (\S+) (\d+) typ host(.*)$", re.IGNORECASE)


def _candidate(sdp: str) -> tuple[str, int]:
    for line in sdp.splitlines():
        m = _CAND.match(line.strip())
        if m and m.group(2) == "1" and ":" not in m.group(5):
            return m.group(5), int(m.group(6))
    raise ValueError("no IPv4 UDP host candidate for component 1 in the SDP")


def _rewrite(sdp: str, addr: tuple[str, int]) -> str:
    """Keep one IPv4 host candidate per m-section, pointed at ``addr``; drop the rest."""
    eol = "\r\n" if "\r\n" in sdp else "\n"
    out, kept = [], False
    for line in sdp.split(eol):
        if line.startswith("m="):
            kept = False
        m = _CAND.match(line)
        if line.startswith("a=candidate:"):
            if m and m.group(2) == "1" and ":" not in m.group(5) and not kept:
                out.append(
                    f"a=candidate:{m.group(1)} 1 udp {m.group(4)} {addr[0]} {addr[1]} typ host"
                )
                kept = True
            continue
        out.append(line)
    return eol.join(out)


def _media_payload(data: bytes) -> int:
    """Bytes of codec payload in an SRTP packet (header, CSRCs, extension, 10-byte tag off)."""
    n = 12 + 4 * (data[0] & 0x0F)
    if data[0] & 0x10 and len(data) >= n + 4:
        n += 4 + 4 * int.from_bytes(data[n + 2 : n + 4], "big")
    return max(0, len(data) - n - 10)


class UdpImpairRelay:
    """Relay between peer A and peer B. Use ``sdp_for_b(a_sdp)`` / ``sdp_for_a(b_sdp)``."""

    def __init__(
        self,
        a_to_b: Impairment | None = None,
        b_to_a: Impairment | None = None,
        host: str = HOST,
    ) -> None:
        self.imp = {"a_to_b": a_to_b or Impairment(), "b_to_a": b_to_a or Impairment()}
        self.rng = {k: random.Random(v.seed) for k, v in self.imp.items()}
        self.stats = {k: DirectionStats() for k in self.imp}
        self.first_seen: dict[str, dict[int, float]] = {k: {} for k in self.imp}
        self.dropped_ts: dict[str, set[int]] = {k: set() for k in self.imp}
        self._busy_until = dict.fromkeys(self.imp, 0.0)  # bottleneck queue drains by then
        # When each RTP timestamp left the relay (benches: the path's own delay).
        self.forwarded: dict[str, dict[int, float]] = {k: {} for k in self.imp}
        # face_a: the address B believes is A. face_b: the address A believes is B.
        self.face_a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.face_b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        for s in (self.face_a, self.face_b):
            s.bind((host, 0))
            s.setblocking(False)
        self.a_addr: tuple[str, int] | None = None
        self.b_addr: tuple[str, int] | None = None
        self._heap: list[tuple[float, int, socket.socket, bytes, tuple[str, int]]] = []
        self._n = 0
        self._stop = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="netimpair", daemon=True)
        self._thread.start()

    # -- SDP ------------------------------------------------------------------------------
    def sdp_for_b(self, a_sdp: str) -> str:
        """A's description as B must see it: A's candidate replaced by the relay."""
        self.a_addr = _candidate(a_sdp)
        return _rewrite(a_sdp, self.face_a.getsockname())

    def sdp_for_a(self, b_sdp: str) -> str:
        self.b_addr = _candidate(b_sdp)
        return _rewrite(b_sdp, self.face_b.getsockname())

    def set_impairment(self, direction: str, imp: Impairment) -> None:
        """Change a direction's impairment now (a step change: the bottleneck queue keeps
        what it holds)."""
        self.imp[direction] = imp
        self.rng[direction] = random.Random(imp.seed)

    # -- forwarding -----------------------------------------------------------------------
    def _run(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.face_a, selectors.EVENT_READ, "from_b")
        sel.register(self.face_b, selectors.EVENT_READ, "from_a")
        sel.register(self._wake_r, selectors.EVENT_READ, "wake")
        while not self._stop.is_set():
            now = time.monotonic()
            while self._heap and self._heap[0][0] <= now:
                _, _, sock, data, addr = heapq.heappop(self._heap)
                self._note_forwarded(sock, data, now)
                try:
                    sock.sendto(data, addr)
                except OSError:
                    pass
            timeout = max(0.0, self._heap[0][0] - time.monotonic()) if self._heap else 0.5
            for key, _ in sel.select(timeout):
                if key.data == "wake":
                    self._wake_r.recv(64)
                    continue
                while True:
                    try:
                        data, src = key.fileobj.recvfrom(65536)
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError:
                        break
                    self._handle(key.data, data, src)
        sel.close()

    def _handle(self, origin: str, data: bytes, src: tuple[str, int]) -> None:
        if origin == "from_a":
            self.a_addr = src
            direction, out_sock, dest = "a_to_b", self.face_a, self.b_addr
        else:
            self.b_addr = src
            direction, out_sock, dest = "b_to_a", self.face_b, self.a_addr
        if dest is None:
            return
        st = self.stats[direction]
        now = time.monotonic()
        media = len(data) >= 12 and 128 <= data[0] <= 191
        if not media:
            st.other += 1
            out_sock.sendto(data, dest)
            return
        rtcp = 192 <= data[1] <= 223
        imp = self.imp[direction]
        rng = self.rng[direction]
        ts = None
        if rtcp:
            st.rtcp += 1
        else:
            st.rtp += 1
            ts = int.from_bytes(data[4:8], "big")
            self.first_seen[direction].setdefault(ts, now)
        warm = not rtcp and st.rtp <= imp.warmup_packets
        if not warm and imp.loss_pct > 0 and rng.random() * 100 < imp.loss_pct:
            st.dropped += 1
            if ts is not None:
                self.dropped_ts[direction].add(ts)
            return
        delay = imp.delay_ms + (rng.uniform(0, imp.jitter_ms) if imp.jitter_ms > 0 else 0.0)
        if imp.rate_kbps > 0 and (imp.queue_rtcp or not rtcp):
            # RTCP waits in the same queue (so the RTT shows it) and takes its share.
            start = max(now, self._busy_until[direction])
            if start - now > imp.queue_ms / 1000:
                st.dropped += 1
                st.queue_dropped += 1
                if ts is not None:
                    self.dropped_ts[direction].add(ts)
                return
            if imp.count == "payload":
                wire = _media_payload(data) if not rtcp else 0
            else:
                wire = len(data) + imp.ip_udp_overhead
            st.offered.append((now, wire))
            done = start + wire * 8 / (imp.rate_kbps * 1000)
            self._busy_until[direction] = done
            delay += (done - now) * 1000
        if not rtcp:
            st.delays_ms.append(delay)
        if delay <= 0:
            self._note_forwarded(out_sock, data, now)
            out_sock.sendto(data, dest)
            return
        self._n += 1
        heapq.heappush(self._heap, (now + delay / 1000, self._n, out_sock, data, dest))

    def _note_forwarded(self, sock: socket.socket, data: bytes, now: float) -> None:
        if len(data) >= 12 and 128 <= data[0] <= 191 and not 192 <= data[1] <= 223:
            direction = "a_to_b" if sock is self.face_a else "b_to_a"
            ts = int.from_bytes(data[4:8], "big")
            self.forwarded[direction].setdefault(ts, now)

    def close(self) -> None:
        self._stop.set()
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass
        self._thread.join(2)
        for s in (self.face_a, self.face_b, self._wake_r, self._wake_w):
            s.close()

    def __enter__(self) -> UdpImpairRelay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


async def connect_through(relay: UdpImpairRelay, sender_track, on_track, *, munge=None):
    """Two aiortc peers on loopback joined through ``relay``: A sends ``sender_track``,
    B calls ``on_track(pc_b, track)`` from its "track" event (install a receiver there).
    ``munge(sdp) -> sdp`` is applied to both descriptions before they cross (e.g.
    :func:`sonic_voice.kvs.opus_send.munge_sdp`). Returns ``(pc_a, pc_b)`` once both are
    connected."""
    import asyncio

    from aiortc import RTCConfiguration, RTCPeerConnection

    munge = munge or (lambda s: s)
    pc_a = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    pc_b = RTCPeerConnection(RTCConfiguration(iceServers=[]))
    connected = {pc_a: asyncio.Event(), pc_b: asyncio.Event()}
    for pc in (pc_a, pc_b):

        def _watch(pc=pc) -> None:
            if pc.connectionState == "connected":
                connected[pc].set()

        pc.on("connectionstatechange", _watch)

    @pc_b.on("track")
    def _on_track(track) -> None:
        on_track(pc_b, track)

    pc_a.addTransceiver(sender_track, direction="sendonly")
    await pc_a.setLocalDescription(await pc_a.createOffer())
    from aiortc import RTCSessionDescription

    await pc_b.setRemoteDescription(
        RTCSessionDescription(relay.sdp_for_b(munge(pc_a.localDescription.sdp)), "offer")
    )
    await pc_b.setLocalDescription(await pc_b.createAnswer())
    await pc_a.setRemoteDescription(
        RTCSessionDescription(relay.sdp_for_a(munge(pc_b.localDescription.sdp)), "answer")
    )
    await asyncio.wait_for(asyncio.gather(*(e.wait() for e in connected.values())), timeout=20)
    return pc_a, pc_b
