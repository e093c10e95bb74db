"""Adaptive bitrate for the robot -> viewer Opus stream: what to encode at, from what the
viewer reports. Pure (no I/O, no clock of its own): feed it reports, apply its decisions.

Inputs (:func:`sonic_voice.kvs.opus_send.run_abr` feeds them as they arrive): each RTCP
receiver report (aiortc sends one every 0.5-1.5 s; a browser about audio every ~5 s,
libwebrtc's default, randomised 2.5-7.5 s): fraction lost since the previous one, and its
own RTT (from our sender reports, which wait in the same bottleneck queue as the audio);
REMB where the browser sends it. One report is the fastest it can react: 64 -> 12 kbit/s
costs 0.5-2 s of the old rate's loss (bench/abr.py); faster needs transport-wide
congestion control feedback, which aiortc does not have.

**What it controls is the rate on the wire**, not the codec's: every packet costs
``overhead_bytes`` of IP, UDP, RTP (with its header extensions) and SRTP, 64 bytes here,
which at 20 ms packets is 25.6 kbit/s before a single bit of speech, plus ``rtcp_bps``.
A budget on the wire is split into a packet duration and an Opus bitrate by
:meth:`AbrController.plan`: the shortest packet whose Opus rate reaches ``prefer_bps``,
else the one that leaves Opus the most (at 12 kbit/s: 120 ms packets and ~6 kbit/s of
Opus; 20 ms packets could not carry even an empty Opus stream).

Rules (loss-based like libwebrtc's audio network adaptor and GCC's loss controller, plus a
queueing-delay guard, which matters on a thin link where a queue fills before it drops):

- **down** at the first report with loss > ``loss_high``, or with an RTT that rose
  ``rtt_rise_s`` (plus half a packet) over its recent minimum (a queue building): to what
  got through, ``wire * (1 - loss) * backoff`` (``heavy_backoff`` when the loss is
  heavy: the report straddles the fall, so its loss understates the new link's). A
  report also covers time before the last cut: the part of its interval before the cut
  took effect (an RTT and a full queue after it) is charged with the loss that caused the
  cut, and only the rest counts (so the old rate's tail does not cut twice, and a first
  cut that fell short is followed at the next report, which also lowers the ceiling);
- **up** only after ``hold_up_s`` with clean reports: the hysteresis that keeps a link at
  its edge from flapping. The rate the link carried when it last congested is a ceiling:
  up to ``ceiling_share`` of it fast (``up_factor`` a report), then additively, by
  ``probe_step`` of the ceiling, the step doubling (to ``max_probe_step``) with each
  clean report at least ``probe_after_s`` after the last step (so a link that stays thin
  costs a 5 % probe now and then, which its RTT shows before anything is lost, and one
  that got better is found in a few reports; no step while the RTT is off its floor);
  past ``clear_factor`` times the ceiling it is forgotten and growth is by ``up_factor``
  again; so it is when the RTT falls far under its recent floor (on a thin link that
  floor is mostly our own packets' serialization: the link grew). Steps come less often
  with longer packets (a 120 ms packet is a third of a 200 ms queue: no room to see a
  probe in the RTT before it loses). A step up followed by loss or a rising RTT makes
  the rate before it the ceiling, and goes back to ``ceiling_share`` of it;
- **REMB** caps the wire rate at ``remb_share`` of the estimate;
- **FEC**: libopus's expected-loss setting follows the smoothed loss (x1.5 margin, within
  ``[min_loss_pct, max_loss_pct]``); more expected loss means more of the bitrate goes to
  the LBRR copy of the previous frame.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any


@dataclass
class AbrConfig:
    min_bps: int = 6000  # Opus bitrate bounds
    max_bps: int = 32000
    start_bps: int = 32000
    # Packet durations it may choose (RFC 7587: up to the viewer's maxptime, 120 ms by
    # default; browsers decode up to 120 ms).
    ptimes_ms: tuple[int, ...] = (20, 40, 60, 80, 100, 120)
    # Per packet on the wire besides the Opus payload: IPv4 20 + UDP 8 + RTP 12 + header
    # extensions (aiortc's mid and audio level) + SRTP tag 10: 64 measured (bench/abr.py).
    overhead_bytes: int = 64
    prefer_bps: int = 12000  # the shortest packet giving Opus this much is chosen
    loss_high: float = 0.04
    loss_low: float = 0.01
    rtt_rise_s: float = 0.06
    # The RTT's floor is the minimum of this long: a link that changed (a sender report
    # crossing a 12 kbit/s link takes 80 ms by itself) gets a new floor once a cut drained it.
    rtt_window_s: float = 10.0
    backoff: float = 0.85
    # Loss this heavy: the link fell far. The report straddles the fall, so its loss
    # understates the new link's: cut deeper (heavy_backoff) to get under it at once.
    loss_heavy: float = 0.3
    heavy_backoff: float = 0.65
    up_factor: float = 1.5
    hold_up_s: float = 1.0
    ceiling_share: float = 0.9
    probe_step: float = 0.05
    max_probe_step: float = 0.1
    episode_s: float = 3.0  # cuts this close together answer one fall of the link
    queue_s: float = 0.2  # a bottleneck queue's depth, at most (what the old rate left there)
    faster_rtt_share: float = 0.6  # an RTT under this share of its recent floor: link grew
    # ... of a floor made of at least this many RTTs. With sender reports every ~5 s
    # (net_hooks.thin_sender_reports) the window may hold one RTT, taken while the fall's
    # queue was full (~300 ms): the next calm one (110 ms) then read as "the link grew"
    # and the rate went x1.5 on a 12 kbit/s link (bench/abr.py, a 220 ms spike).
    faster_min_rtts: int = 3
    probe_after_s: float = 0.9
    clear_factor: float = 1.3
    # Left for RTCP on the wire (aiortc: a 118-byte SR + SDES about once a second; every
    # ~5 s while transport-cc feedback comes, net_hooks.thin_sender_reports: the rest is
    # headroom for a queue to drain).
    rtcp_bps: int = 1000
    remb_share: float = 0.9
    min_loss_pct: int = 5
    max_loss_pct: int = 30
    loss_smoothing: float = 0.5
    # Transport-cc (update_twcc): a queue this far over one packet's duration is congestion.
    twcc_queue_s: float = 0.05
    # ... over one packet's duration, but at most this much (a 120 ms packet: the 200 ms
    # queue of bench/abr.py would overflow before a reading reached 170 ms).
    twcc_packet_slack_s: float = 0.04
    twcc_min_gap_s: float = 0.08  # cuts while the queue grows: at most this often
    twcc_settle_s: float = 0.4  # a queue that stopped growing: cut again after this long
    twcc_min_pairs: int = 1  # busy packet pairs the link's rate must rest on
    twcc_cut: float = 0.7  # no rate and no loss to go by: this share of the rate
    twcc_calm_s: float = 0.01  # a queue under this (over one packet's duration) is none
    twcc_up_every_s: float = 0.3  # steps up on transport-cc: at most this often
    # A one-way delay this far under its floor since the last cut (at most rtt_window_s,
    # of at least faster_min_rtts messages), and under it by more than half our own packet's
    # serialization at the rate we send (so a smaller packet of ours is not taken for
    # it): the link grew, as a faster RTT says on receiver reports.
    twcc_faster_s: float = 0.03

    def __post_init__(self) -> None:
        if not 500 <= self.min_bps <= self.start_bps <= self.max_bps <= 510000:
            raise ValueError(
                "abr bounds must satisfy 500 <= min_bps <= start_bps <= max_bps <= 510000, "
                f"not {self.min_bps}/{self.start_bps}/{self.max_bps}"
            )
        if not 0 <= self.loss_low < self.loss_high <= 1:
            raise ValueError("abr: need 0 <= loss_low < loss_high <= 1")
        if not self.ptimes_ms or any(
            p not in (10, 20, 40, 60, 80, 100, 120) for p in self.ptimes_ms
        ):
            raise ValueError(f"abr: ptimes_ms must be Opus packet durations, not {self.ptimes_ms}")

    def overhead_bps(self, ptime_ms: int) -> float:
        return self.overhead_bytes * 8 * 1000 / ptime_ms


@dataclass(frozen=True)
class Report:
    at: float  # seconds, any monotonic clock: when it arrived
    fraction_lost: float  # 0..1
    jitter_s: float = 0.0
    rtt_s: float | None = None
    remb_bps: int | None = None
    # The start of the interval it covers (None: since the previous receiver report).
    since: float | None = None
    source: str = "rr"  # "rr": a receiver report (others: only loss/REMB, no clean-up step)


@dataclass(frozen=True)
class Decision:
    bitrate: int  # Opus bit/s
    packet_loss_pct: int
    changed: bool
    reason: str
    ptime_ms: int = 20
    wire_bps: int = 0  # what it should take on the wire, headers included


class AbrController:
    """``decision = abr.update(Report(...))``; apply ``decision`` when ``changed``."""

    def __init__(self, config: AbrConfig | None = None) -> None:
        self.cfg = config or AbrConfig()
        self.ptime_ms = min(self.cfg.ptimes_ms)
        self.wire = self.cfg.start_bps + self.cfg.rtcp_bps + self.cfg.overhead_bps(self.ptime_ms)
        self.bitrate, self.ptime_ms = self.plan(self.wire)
        self.loss = 0.0  # smoothed fraction lost
        self.loss_pct = self.cfg.min_loss_pct
        self.min_rtt: float | None = None
        self.calm = True  # the last RTT was near its floor
        self._rtts: deque[tuple[float, float]] = deque()  # (at, rtt) of the last rtt_window_s
        # (at, one-way delay) of transport-cc's newest packets, the last rtt_window_s
        self._owds: deque[tuple[float, float]] = deque()
        self.last_rtt: float | None = None
        self.clean_since: float | None = None
        self.last_down = float("-inf")
        self.down_loss = 0.0  # the loss the last cut answered
        self.last_up = float("-inf")
        self.last_rr: float | None = None
        self.ceiling: float | None = None  # wire bit/s the link carried when it congested
        self.step = self.cfg.probe_step  # additive step near the ceiling (its share)
        self.good: float | None = None  # the wire rate before the last step up
        self.history: list[tuple[float, int, int, str]] = []  # (at, bitrate, loss %, why)
        self.reports: list[Report] = []  # every report seen (diagnostics, benches)
        self._twcc_queue: float | None = None
        self._twcc_clean_since: float | None = None
        self.twcc_seen = 0  # transport-cc messages seen (diagnostics, tests)
        self.twcc_lost = 0  # packets they reported lost

    @property
    def max_wire(self) -> float:
        cfg = self.cfg
        return cfg.max_bps + cfg.rtcp_bps + cfg.overhead_bps(min(cfg.ptimes_ms))

    @property
    def min_wire(self) -> float:
        cfg = self.cfg
        return cfg.min_bps + cfg.rtcp_bps + cfg.overhead_bps(max(cfg.ptimes_ms))

    def plan(self, wire_bps: float) -> tuple[int, int]:
        """(Opus bit/s, packet ms) for a wire budget: the shortest packet that leaves Opus
        ``prefer_bps`` (or its maximum), else the packet that leaves it the most."""
        cfg = self.cfg
        best = None
        for p in sorted(cfg.ptimes_ms):
            opus = wire_bps - cfg.rtcp_bps - cfg.overhead_bps(p)
            if opus >= min(cfg.prefer_bps, cfg.max_bps):
                best = (opus, p)
                break
            if best is None or opus > best[0]:
                best = (opus, p)
        assert best is not None
        opus, p = best
        return int(min(cfg.max_bps, max(cfg.min_bps, opus))), p

    def limit_ptime(self, max_ms: int) -> None:
        """Send no packet longer than ``max_ms`` (the viewer's ``a=maxptime``)."""
        allowed = tuple(p for p in self.cfg.ptimes_ms if p <= max_ms) or (min(self.cfg.ptimes_ms),)
        self.cfg.ptimes_ms = allowed
        self.bitrate, self.ptime_ms = self.plan(self.wire)

    def _cut(self, at: float, to: float, loss: float, why: str) -> str:
        self.wire = max(self.min_wire, to)
        self.last_down = at
        self.down_loss = loss
        self.step = self.cfg.probe_step
        # The delays before a cut are another link's (or a queue's): the floor that a
        # faster link is judged against is the one measured since.
        self._owds.clear()
        return why

    def update(self, r: Report) -> Decision:
        cfg = self.cfg
        self.reports.append(r)
        del self.reports[:-1000]
        since = r.since
        if r.source == "rr":
            if since is None:
                since = self.last_rr if self.last_rr is not None else r.at - 1.0
            self.last_rr = r.at
            a = cfg.loss_smoothing
            self.loss = a * r.fraction_lost + (1 - a) * self.loss
        since = r.at - 1.0 if since is None else since
        rtt_rise = 0.0
        # The RTT near its floor: no queue building, room to probe. A report without an
        # RTT of its own (it answers an SR already answered) keeps the last verdict.
        calm = self.calm
        faster = False
        if r.rtt_s is not None and r.rtt_s > 0:
            while self._rtts and self._rtts[0][0] < r.at - cfg.rtt_window_s:
                self._rtts.popleft()
            if len(self._rtts) >= cfg.faster_min_rtts:
                # Far under its recent floor: the path got faster. On a thin link the floor
                # is mostly our own packets' serialization (a 120 ms packet takes 100 ms to
                # cross 12 kbit/s, 19 ms at 64 kbit/s): the link grew under us.
                floor = min(x for _, x in self._rtts)
                faster = r.rtt_s < floor * cfg.faster_rtt_share and floor - r.rtt_s > 0.03
            self._rtts.append((r.at, r.rtt_s))
            self.min_rtt = min(x for _, x in self._rtts)
            # A sender report may wait behind one of our packets, which on a link we fill
            # takes up to a packet's duration to cross: half of that is not a queue.
            above = r.rtt_s - self.min_rtt - self.ptime_ms / 2000
            calm = self.calm = above < cfg.rtt_rise_s / 2
            # Only a *rising* RTT is a queue filling: after a cut it stays high until the
            # queue has drained.
            if self.last_rtt is not None and r.rtt_s > self.last_rtt:
                rtt_rise = above
            self.last_rtt = r.rtt_s
        # The share of this report's interval before the last cut took effect (one RTT
        # and a full queue after it: what was sent before the cut still waits there),
        # charged with the loss that caused the cut.
        took_effect = self.last_down + max(0.05, self.last_rtt or 0.1) + cfg.queue_s
        old = min(1.0, max(0.0, (took_effect - since) / max(1e-3, r.at - since)))
        loss = r.fraction_lost
        if old >= 0.999:
            loss, rtt_rise = 0.0, 0.0
        elif old > 0:
            loss = min(1.0, max(0.0, (loss - old * self.down_loss) / (1 - old)))
        old_wire, old_pct = self.wire, self.loss_pct
        why = "hold"
        if r.source == "remb":
            pass
        elif loss > cfg.loss_high or rtt_rise > cfg.rtt_rise_s:
            self.clean_since = None
            what = f"lost {loss:.0%}" if loss > cfg.loss_high else f"rtt +{rtt_rise * 1000:.0f} ms"
            carried = self.wire * (1 - min(loss, 0.9))
            if self.good is not None and self.last_up > self.last_down:
                # The last step up did it: the rate before it is the knee.
                self.ceiling = self.good if self.ceiling is None else min(self.ceiling, self.good)
                to = min(carried, self.ceiling) * cfg.ceiling_share
                why = f"down: {what} after a step up"
            else:
                # The link fell. The first report straddles the fall (its loss understates
                # the new link's: the ceiling it sets is high); a later one in the same
                # episode that mostly covers the new rate lowers it.
                back = cfg.heavy_backoff if loss >= cfg.loss_heavy else cfg.backoff
                to = carried * back
                carried = max(self.min_wire, carried)
                if r.at - self.last_down > cfg.episode_s or self.ceiling is None:
                    self.ceiling = carried
                elif old < 0.5:
                    self.ceiling = min(self.ceiling, carried)
                why = f"down: {what}"
            why = self._cut(r.at, to, loss, f"{why} ({r.source})")
        elif r.source == "rr" and loss < cfg.loss_low:
            if self.clean_since is None:
                self.clean_since = r.at
            if calm and self.ceiling is not None and self.wire > self.ceiling * cfg.clear_factor:
                self.ceiling = None  # well past it and calm: the link got better
            if faster and self.ceiling is not None:
                self.ceiling, self.clean_since = None, r.at - cfg.hold_up_s
            if r.at - self.clean_since >= cfg.hold_up_s:
                why = self._up(r.at, calm, cfg.probe_after_s * max(1.0, self.ptime_ms / 40)) or why
        elif r.source == "rr":
            self.clean_since = None  # between the thresholds: stay
        if r.remb_bps:
            cap = max(self.min_wire, r.remb_bps * cfg.remb_share)
            if self.wire > cap:
                self.wire = cap
                why = f"remb cap {r.remb_bps} bit/s"
        return self._decide(r.at, old_wire, old_pct, why)

    def _up(self, at: float, calm: bool, probe_gap_s: float) -> str | None:
        """One step up after clean feedback (the reason, or None for no step): x up_factor
        with no ceiling, to ``ceiling_share`` of it fast, then probe it by ``step`` at most
        every ``probe_gap_s``; only while ``calm``."""
        cfg = self.cfg
        if self.wire >= self.max_wire:
            return None
        target, why = self.wire, None
        near = self.ceiling * cfg.ceiling_share if self.ceiling is not None else None
        if near is None:
            target, why = self.wire * cfg.up_factor, "up: clean link"
        elif self.wire < near:
            target, why = min(near, self.wire * cfg.up_factor), "up: under the ceiling"
        elif calm and at - self.last_up >= probe_gap_s:
            target = self.wire + self.step * self.ceiling
            why = f"up: probing the ceiling (+{self.step:.0%})"
            self.step = min(cfg.max_probe_step, self.step * 2)
        if target > self.wire and calm:
            self.good = self.wire
            self.wire = min(self.max_wire, target)
            self.last_up = at
            return why
        return None

    def _decide(self, at: float, old_wire: float, old_pct: int, why: str) -> Decision:
        cfg = self.cfg
        self.wire = min(self.max_wire, self.wire)
        self.loss_pct = int(min(cfg.max_loss_pct, max(cfg.min_loss_pct, round(self.loss * 150))))
        old_plan = (self.bitrate, self.ptime_ms)
        self.bitrate, self.ptime_ms = self.plan(self.wire)
        changed = (self.bitrate, self.ptime_ms, self.loss_pct) != (*old_plan, old_pct)
        if changed or self.wire != old_wire:
            self.history.append((at, self.bitrate, self.loss_pct, why))
        return Decision(self.bitrate, self.loss_pct, changed, why, self.ptime_ms, int(self.wire))

    def update_twcc(self, s: Any) -> Decision:
        """Transport-cc feedback (:class:`sonic_voice.kvs.twcc.TwccSummary`, every ~100 ms):
        the fast way down. When the queue builds (the newest packet's delay over its floor,
        less one packet's duration, at most ``twcc_packet_slack_s``: our own packet's
        serialization on a link we fill; a whole 120 ms packet's slack put the cut at a
        170 ms queue, which a probe on a 12 kbit/s link overflowed before it was read) or
        packets are lost, cut to what the link carried while busy (``link_bps``), else by
        the loss, else by ``twcc_cut``. Again at the next message while the queue still
        grows; once it stopped growing, only after ``twcc_settle_s`` (what was sent before
        the cut drains meanwhile). Going up stays with the receiver reports' rules."""
        cfg = self.cfg
        self.twcc_seen += 1
        self.twcc_lost += s.lost
        old_wire, old_pct = self.wire, self.loss_pct
        why = "hold"
        faster = False
        if s.owd_s is not None:
            while self._owds and self._owds[0][0] < s.at - cfg.rtt_window_s:
                self._owds.popleft()
            if len(self._owds) >= cfg.faster_min_rtts:
                own = (self.bitrate * self.ptime_ms / 8000 + cfg.overhead_bytes) * 8 / self.wire
                under = min(x for _, x in self._owds) - s.owd_s
                faster = under > max(cfg.twcc_faster_s, own / 2)
            self._owds.append((s.at, s.owd_s))
        queued = s.queue_s - min(self.ptime_ms / 1000, cfg.twcc_packet_slack_s)
        growing = self._twcc_queue is not None and s.queue_s > self._twcc_queue + 0.005
        self._twcc_queue = s.queue_s
        lossy = s.packets > 0 and s.fraction_lost > cfg.loss_high
        if queued > cfg.twcc_queue_s or lossy:
            since = s.at - self.last_down
            if (growing and since > cfg.twcc_min_gap_s) or since > cfg.twcc_settle_s:
                self.clean_since = None
                if s.link_bps is not None and s.busy_pairs >= cfg.twcc_min_pairs:
                    to, how = s.link_bps * cfg.backoff, f"to the link's {s.link_bps:.0f} bit/s"
                elif s.fraction_lost > 0:
                    to = self.wire * (1 - s.fraction_lost) * cfg.backoff
                    how = f"lost {s.fraction_lost:.0%}"
                else:
                    to, how = self.wire * cfg.twcc_cut, f"x{cfg.twcc_cut}"
                to = min(to, self.wire * cfg.backoff)
                if self.ceiling is None or s.at - self.last_down > cfg.episode_s:
                    self.ceiling = max(self.min_wire, to / cfg.backoff)
                else:
                    self.ceiling = min(self.ceiling, max(self.min_wire, to / cfg.backoff))
                what = f"queue +{queued * 1000:.0f} ms" if queued > cfg.twcc_queue_s else "loss"
                why = self._cut(s.at, to, s.fraction_lost, f"down: {what}, {how} (twcc)")
            self._twcc_clean_since = None
        elif s.packets and not s.lost and queued < cfg.twcc_calm_s:
            # Clean and no queue: the receiver reports' rules for going up, but checked at
            # every message (at most every twcc_up_every_s), not once a report.
            if self._twcc_clean_since is None:
                self._twcc_clean_since = s.at
            if faster and self.ceiling is not None:
                # The link grew (on a thin link the delay's floor is mostly our packets'
                # serialization): forget the ceiling and go up now, as a faster RTT does.
                # With sender reports every ~5 s (net_hooks.thin_sender_reports) RTTs are
                # too few for that rule: 12 -> 64 kbit/s took 7.2 s instead of 2.6 (sim).
                self.ceiling = None
                self._twcc_clean_since = s.at - cfg.hold_up_s
            if (
                s.at - self._twcc_clean_since >= cfg.hold_up_s
                and s.at - self.last_down >= cfg.hold_up_s
                and s.at - self.last_up >= cfg.twcc_up_every_s
            ):
                step = self._up(s.at, True, cfg.probe_after_s * max(1.0, self.ptime_ms / 40))
                why = f"{step} (twcc)" if step else why
        else:
            self._twcc_clean_since = None
        return self._decide(s.at, old_wire, old_pct, why)
