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
  from flapping;
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
    hold_up_s: float = 3.0
    min_down_interval_s: float = 0.5
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
        self.clean_since: float | None = None
        self.last_down = float("-inf")
        self.history: list[tuple[float, int, int, str]] = []  # (at, bitrate, loss %, why)

    def update(self, r: Report) -> Decision:
        cfg = self.cfg
        a = cfg.loss_smoothing
        self.loss = a * r.fraction_lost + (1 - a) * self.loss
        rtt_rise = 0.0
        if r.rtt_s is not None and r.rtt_s > 0:
            self.min_rtt = r.rtt_s if self.min_rtt is None else min(self.min_rtt, r.rtt_s)
            rtt_rise = r.rtt_s - self.min_rtt
        old_rate, old_pct = self.bitrate, self.loss_pct
        why = "hold"
        congested = r.fraction_lost > cfg.loss_high or rtt_rise > cfg.rtt_rise_s
        if congested:
            self.clean_since = None
            if r.at - self.last_down >= cfg.min_down_interval_s:
                target = self.bitrate * (1 - min(r.fraction_lost, 0.9)) * cfg.backoff
                self.bitrate = max(cfg.min_bps, int(target))
                self.last_down = r.at
                why = f"down: lost {r.fraction_lost:.0%}, rtt +{rtt_rise * 1000:.0f} ms"
        elif r.fraction_lost < cfg.loss_low:
            if self.clean_since is None:
                self.clean_since = r.at
            elif r.at - self.clean_since >= cfg.hold_up_s and self.bitrate < cfg.max_bps:
                self.bitrate = min(cfg.max_bps, int(self.bitrate * cfg.up_factor))
                why = "up: clean link"
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
