"""A bottleneck link simulated in virtual time, to drive sonic_voice.kvs.abr's controller
the way bench/abr.py's real peers do, in milliseconds of CPU and deterministically.

The model is the bench's ``--link wire``: a FIFO drained at the link rate, whole packets
counted (Opus payload plus ``overhead_bytes`` of IP, UDP, RTP with its extensions and
SRTP), tail-drop past ``queue_s`` of queue; sender reports (118 bytes) wait in the same
queue, every second, or with transport-cc feedback every 5 s x 0.5-1.5 as
``opus_send.run_abr`` thins them (``net_hooks.thin_sender_reports``). The receiver sends a
receiver report every 0.5-1.5 s (aiortc's interval) and, with ``twcc_feedback=True``,
transport-cc feedback every 100 ms; the return path is not limited.

What it does not model by default: the codec (a frame is the bytes its bitrate gives),
FEC (a lost packet's frames are lost), the receiver's jitter buffer (latency is the
path's: the time a packet left the sender until it arrived). ``receiver=True`` models
those three with the real parts: each packet is real Opus (libopus through opuslib, CBR
with FEC, as OpusFecTrack(adaptive=True) sends it, of a speech-like signal) and arrives
into sonic_voice.kvs.jitter's AdaptiveJitterBuffer on the virtual clock; a frame then
counts as lost unless it played from a packet or FEC (as bench/abr.py counts), and its
latency is when it played minus when its packet was sent (``rx_lost``, ``rx_delays``).
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field

import numpy as np

from sonic_voice.kvs import twcc
from sonic_voice.kvs.abr import AbrConfig, AbrController, Report
from sonic_voice.kvs.net_hooks import SENDER_REPORT_WIRE_BYTES

RTP_EXTRA = 26  # RTP header 12 + header extensions 14: with twcc.WIRE_EXTRA_BYTES, 64


@dataclass
class PhaseResult:
    kbps: float
    frames: int = 0
    lost: int = 0
    delays: list[float] = field(default_factory=list)
    follow_s: float | None = None
    # With receiver=True: frames that did not play from a packet or FEC, and per played
    # frame its playout minus its packet's send time.
    rx_lost: int = 0
    rx_delays: list[float] = field(default_factory=list)

    @property
    def rx_lost_pct(self) -> float:
        return 100.0 * self.rx_lost / self.frames if self.frames else 0.0

    def rx_p95_ms(self) -> float:
        if not self.rx_delays:
            return float("nan")
        d = sorted(self.rx_delays)
        return 1000 * d[min(len(d) - 1, int(0.95 * len(d)))]

    @property
    def lost_pct(self) -> float:
        return 100.0 * self.lost / self.frames if self.frames else 0.0

    def p95_ms(self) -> float:
        if not self.delays:
            return float("nan")
        d = sorted(self.delays)
        return 1000 * d[min(len(d) - 1, int(0.95 * len(d)))]


def simulate(
    steps: tuple[float, ...] = (64.0, 12.0, 64.0),
    phase_s: float = 20.0,
    twcc_feedback: bool = True,
    config: AbrConfig | None = None,
    seed: int = 3,
    queue_s: float = 0.2,
    prop_s: float = 0.01,
    fb_interval_s: float = 0.1,
    link: str = "wire",
    receiver: bool = False,
) -> tuple[list[PhaseResult], AbrController]:
    """``link="payload"``: the link counts only Opus payload (RTCP free), and the
    controller is told so (no per-packet overhead), as bench/abr.py ``--link payload``.
    ``receiver``: real Opus into the real jitter buffer (see the module's docstring)."""
    payload = link == "payload"
    cfg = config or (AbrConfig(overhead_bytes=0, rtcp_bps=0) if payload else AbrConfig())
    abr = AbrController(cfg)
    rng = random.Random(seed)
    hist = twcc.SendHistory(extra_bytes=0 if payload else twcc.WIRE_EXTRA_BYTES)
    rec = twcc.ArrivalRecorder(sender_ssrc=1)
    results = [PhaseResult(k) for k in steps]
    end = phase_s * len(steps)
    events: list[tuple[float, int, str, object]] = []
    n = 0

    def at(t: float, kind: str, data: object = None) -> None:
        nonlocal n
        n += 1
        heapq.heappush(events, (t, n, kind, data))

    busy = 0.0
    # Receiver report state: packets expected/received since the last report, and the
    # send time of the newest sender report that got through (for the RTT).
    rr_expected = rr_received = 0
    last_sr: tuple[float, float] | None = None  # (sent, arrived)
    at(0.0, "frame")
    sr_every = (lambda: 5.0 * rng.uniform(0.5, 1.5)) if twcc_feedback else (lambda: 1.0)
    at(1.0, "sr")
    at(rng.uniform(0.5, 1.5), "rr")
    if twcc_feedback:
        at(fb_interval_s, "fb")
    pending_frames = 0
    follow = {i: None for i in range(len(steps))}
    rx = _Receiver(phase_s * len(steps), seed) if receiver else None
    frame_no = 0  # 20 ms frames so far: the RTP clock
    sent_at: dict[int, tuple[float, int, int]] = {}  # ts -> (sent, frames, phase)
    if rx is not None:
        at(0.0, "tick")

    def phase_of(t: float) -> int:
        return min(len(steps) - 1, int(t // phase_s))

    def link_bps(t: float) -> float:
        return steps[phase_of(t)] * 1000

    def enqueue(t: float, wire_bytes: int) -> float | None:
        """When the packet arrives, or None if tail-dropped."""
        nonlocal busy
        start = max(t, busy)
        if start - t > queue_s:
            return None
        busy = start + wire_bytes * 8 / link_bps(start)
        return busy + prop_s

    while events:
        t, _, kind, data = heapq.heappop(events)
        if t >= end:
            break
        ph = phase_of(t)
        if kind == "frame":
            pending_frames += 1
            at(t + 0.02, "frame")
            if pending_frames * 20 >= abr.ptime_ms:
                frames, pending_frames = pending_frames, 0
                opus = int(abr.bitrate * frames * 0.02 / 8)
                ts = frame_no * 960
                frame_no += frames
                pkt = b""
                if rx is not None:
                    pkt = rx.encode(ts, frames, abr.bitrate, abr.loss_pct)
                    opus = len(pkt)
                    sent_at[ts] = (t, frames, ph)
                rtp = opus + RTP_EXTRA
                wire = opus if payload else rtp + twcc.WIRE_EXTRA_BYTES
                seq = hist.take_seq()
                hist.on_send(seq, t, opus if payload else rtp)
                arrive = enqueue(t, wire)
                rr_expected += 1
                res = results[ph]
                res.frames += frames
                if arrive is None:
                    res.lost += frames
                else:
                    rr_received += 1
                    res.delays += [arrive - t] * frames
                    at(arrive, "arrive", (seq, ts, pkt))
            # follow: down = the wire rate fits the link; up = near the maximum again
            if follow[ph] is None and ph > 0:
                fits = (
                    abr.wire <= link_bps(t)
                    if steps[ph] < steps[ph - 1]
                    else abr.bitrate >= 0.9 * cfg.max_bps and abr.ptime_ms == 20
                )
                if fits:
                    follow[ph] = t - ph * phase_s
        elif kind == "arrive":
            seq, ts, pkt = data  # type: ignore[misc]
            rec.on_packet(seq, t)
            if rx is not None:
                rx.jb.push(seq & 0xFFFF, ts & 0xFFFFFFFF, pkt, t)
        elif kind == "tick":
            assert rx is not None
            rx.play(t)
            at(t + 0.005, "tick")
        elif kind == "sr":
            arrive = enqueue(t, 0 if payload else SENDER_REPORT_WIRE_BYTES)
            if arrive is not None:
                last_sr = (t, arrive)
            at(t + sr_every(), "sr")
        elif kind == "rr":
            lost = 1 - rr_received / rr_expected if rr_expected else 0.0
            rr_expected = rr_received = 0
            rtt = None
            back = t + prop_s
            if last_sr is not None:
                rtt = back - last_sr[0] - (t - last_sr[1])
                last_sr = None
            # Decisions apply from the next frame on: the simulated sender reads abr's state.
            abr.update(Report(back, max(0.0, lost), rtt_s=rtt))
            at(t + rng.uniform(0.5, 1.5), "rr")
        elif kind == "fb":
            msg = rec.feedback()
            if msg is not None:
                s = hist.on_feedback(twcc.parse_feedback(msg), t + prop_s)
                abr.update_twcc(s)
            at(t + fb_interval_s, "fb")
    for i, r in enumerate(results):
        r.follow_s = follow[i]
    if rx is not None:
        for ts, (sent, frames, ph) in sent_at.items():
            whole = rx.packets.get(ts)  # decoded from its packet: all its frames played
            for k in range(frames):
                played = whole if whole is not None else rx.played.get(ts + k * 960)
                if played is None:
                    results[ph].rx_lost += 1
                elif whole is not None:  # (played faster, maybe: shorter than its frames)
                    results[ph].rx_delays.append(played - sent)
                else:  # a packet's k-th frame is due k frames after its first
                    results[ph].rx_delays.append(played - sent - k * 0.02)
    return results, abr


class _Receiver:
    """Real Opus packets of a speech-like signal, and the jitter buffer they go into."""

    def __init__(self, seconds: float, seed: int) -> None:
        import opuslib
        import opuslib.api.ctl
        import opuslib.api.encoder

        from sonic_voice.kvs.jitter import AdaptiveJitterBuffer, JitterConfig

        from test.harness.signals import speech_like

        # 4 s of it, repeated (making a minute of it takes longer than the simulation).
        piece = speech_like(4.0, 48000, seed=seed, level=0.3)
        self.pcm = np.tile(piece, int(seconds // 4.0) + 2)
        self.enc = opuslib.Encoder(48000, 1, opuslib.APPLICATION_VOIP)
        self.enc.vbr = 0
        opuslib.api.encoder.encoder_ctl(self.enc.encoder_state, opuslib.api.ctl.set_inband_fec, 1)
        self.jb = AdaptiveJitterBuffer(JitterConfig(nack=False))
        self.played: dict[int, float] = {}  # 20 ms frame ts -> when it played
        self.packets: dict[int, float] = {}  # packet ts -> when it played from its packet

    def encode(self, ts: int, frames: int, bitrate: int, loss_pct: int) -> bytes:
        self.enc.bitrate = int(bitrate)
        self.enc.packet_loss_perc = int(loss_pct)
        n = frames * 960
        return bytes(self.enc.encode(self.pcm[ts : ts + n].astype("<i2").tobytes(), n))

    def play(self, now: float) -> None:
        for f in self.jb.pop_due(now):
            if f.kind == "normal":
                self.packets.setdefault(f.rtp_ts, f.due)
            if f.kind in ("normal", "fec"):
                for k in range(0, len(f.pcm), 960):
                    self.played.setdefault(f.rtp_ts + k, f.due + k / 48000)
