"""Adaptive bitrate for the robot -> viewer Opus stream: what to encode at, from what the
viewer reports. Pure (no I/O, no clock of its own): feed it reports, apply its decisions.

Inputs, per RTCP receiver report (a browser sends one about every second; aiortc's
receiver every 0.5-1.5 s): fraction lost since the last report, interarrival jitter, RTT
(from our sender reports), and, where the browser sends it, a REMB estimate.

Rules (loss-based like libwebrtc's audio network adaptor and GCC's loss controller, plus a
queueing-delay guard, which matters on a thin link where a queue fills before it drops):

- **down** at once when loss > ``loss_high`` or the RTT rose ``rtt_rise_s`` above its
  minimum (a queue is building): to what got through, ``rate * (1 - loss) * backoff``,
  never below ``min_bps``. One report is enough: at 32 kbit/s into a 12 kbit/s link 60 %
  is lost, and 32 * 0.4 * 0.8 = 10.2 kbit/s fits in one step;
- **up** only after ``hold_up_s`` of clean reports (loss < ``loss_low``, no RTT rise), by
  ``up_factor`` per report, to ``max_bps``: the hysteresis that keeps a link at its edge
  from flapping. The rate the link carried when it last congested is remembered as a
  ceiling: up to 95 % of it fast, past it only by one ``probe_factor`` step after
  ``probe_after_s`` clean (a probe that stays clean clears the ceiling: the link got
  better, fast growth again). A link that stays thin then costs one small probe every few
  seconds, which the RTT rise usually catches before anything is lost;
- **REMB** caps the rate at ``remb_share`` of the estimate;
- **FEC**: libopus's expected-loss setting follows the smoothed loss (x1.5 margin, within
  ``[min_loss_pct, max_loss_pct]``); more expected loss means more of the bitrate goes to
  the LBRR copy of the previous frame.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class AbrConfig:
    min_bps: int = 6000
    max_bps: int = 32000
    start_bps: int = 32000
    loss_high: float = 0.04
    loss_low: float = 0.01
    rtt_rise_s: float = 0.08
    backoff: float = 0.8
    up_factor: float = 1.25
    hold_up_s: float = 2.0
    probe_after_s: float = 5.0
    probe_factor: float = 1.15
    # A report covers about the second before it: after a cut, the next one still shows
    # the old rate's loss. Cut again only after this long.
    min_down_interval_s: float = 1.0
    settle_s: float = 3.0
    loss_heavy: float = 0.15
    remb_share: float = 0.9
    min_loss_pct: int = 5
    max_loss_pct: int = 30
    loss_smoothing: float = 0.5

    def __post_init__(self) -> None:
        if not 6000 <= self.min_bps <= self.start_bps <= self.max_bps <= 510000:
            raise ValueError(
                "abr bounds must satisfy 6000 <= min_bps <= start_bps <= max_bps <= 510000, "
                f"not {self.min_bps}/{self.start_bps}/{self.max_bps}"
            )
        if not 0 <= self.loss_low < self.loss_high <= 1:
            raise ValueError("abr: need 0 <= loss_low < loss_high <= 1")


@dataclass(frozen=True)
class Report:
    at: float  # seconds, any monotonic clock
    fraction_lost: float  # 0..1
    jitter_s: float = 0.0
    rtt_s: float | None = None
    remb_bps: int | None = None


@dataclass(frozen=True)
class Decision:
    bitrate: int
    packet_loss_pct: int
    changed: bool
    reason: str


class AbrController:
    """``decision = abr.update(Report(...))``; apply ``decision`` when ``changed``."""

    def __init__(self, config: AbrConfig | None = None) -> None:
        self.cfg = config or AbrConfig()
        self.bitrate = self.cfg.start_bps
        self.loss = 0.0  # smoothed fraction lost
        self.loss_pct = self.cfg.min_loss_pct
        self.min_rtt: float | None = None
        self.last_rtt: float | None = None
        self.clean_since: float | None = None
        self.last_down = float("-inf")
        self.last_up = float("-inf")
        self.ceiling: float | None = None  # what the link carried when it last congested
        self.history: list[tuple[float, int, int, str]] = []  # (at, bitrate, loss %, why)
        self.reports: list[Report] = []  # every report seen (diagnostics, benches)

    def update(self, r: Report) -> Decision:
        cfg = self.cfg
        self.reports.append(r)
        del self.reports[:-1000]
        a = cfg.loss_smoothing
        self.loss = a * r.fraction_lost + (1 - a) * self.loss
        rtt_rise = 0.0
        if r.rtt_s is not None and r.rtt_s > 0:
            self.min_rtt = r.rtt_s if self.min_rtt is None else min(self.min_rtt, r.rtt_s)
            # Only a *rising* RTT is a queue filling: aiortc (like most stacks) smooths its
            # RTT, which stays high for seconds after a queue has drained.
            if self.last_rtt is not None and r.rtt_s > self.last_rtt:
                rtt_rise = r.rtt_s - self.min_rtt
            self.last_rtt = r.rtt_s
        old_rate, old_pct = self.bitrate, self.loss_pct
        why = "hold"
        congested = r.fraction_lost > cfg.loss_high or rtt_rise > cfg.rtt_rise_s
        if congested:
            self.clean_since = None
            since = r.at - self.last_down
            # Just after a cut, reports still carry the old rate's queue: cut again only
            # for heavy loss (the link fell further), not for its tail.
            settling = since < cfg.settle_s and r.fraction_lost < cfg.loss_heavy
            if since >= cfg.min_down_interval_s and not settling:
                carried = self.bitrate * (1 - min(r.fraction_lost, 0.9))
                self.ceiling = max(cfg.min_bps, carried)
                self.bitrate = max(cfg.min_bps, int(carried * cfg.backoff))
                self.last_down = r.at
                why = f"down: lost {r.fraction_lost:.0%}, rtt +{rtt_rise * 1000:.0f} ms"
        elif r.fraction_lost < cfg.loss_low:
            if self.clean_since is None:
                self.clean_since = r.at
            if self.ceiling is not None and self.bitrate > self.ceiling:
                self.ceiling = None  # a probe past the old ceiling stayed clean
            clean_for = r.at - self.clean_since
            if clean_for >= cfg.hold_up_s and self.bitrate < cfg.max_bps:
                target = self.bitrate * cfg.up_factor
                near = int(self.ceiling * 0.95) if self.ceiling is not None else None
                if near is None or target <= near:
                    why = "up: clean link"
                elif self.bitrate < near:
                    target, why = near, "up: to just under the last ceiling"
                elif r.at - max(self.last_up, self.clean_since) >= cfg.probe_after_s:
                    target, why = self.bitrate * cfg.probe_factor, "up: probing past the ceiling"
                else:
                    target = self.bitrate
                new = min(cfg.max_bps, int(target))
                if new > self.bitrate:
                    self.bitrate = new
                    self.last_up = r.at
        else:
            self.clean_since = None  # between the thresholds: stay
        if r.remb_bps:
            cap = max(cfg.min_bps, int(r.remb_bps * cfg.remb_share))
            if self.bitrate > cap:
                self.bitrate = cap
                why = f"remb cap {r.remb_bps} bit/s"
        self.loss_pct = int(min(cfg.max_loss_pct, max(cfg.min_loss_pct, round(self.loss * 150))))
        changed = (self.bitrate, self.loss_pct) != (old_rate, old_pct)
        if changed:
            self.history.append((r.at, self.bitrate, self.loss_pct, why))
        return Decision(self.bitrate, self.loss_pct, changed, why)
