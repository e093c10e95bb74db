"""Audio receive path under loss and jitter: aiortc's stock path vs ours, side by side.

Two aiortc peers in a private network namespace, joined through the UDP impairment relay
(test/harness/netimpair.py: seeded Bernoulli loss, uniform 0..J ms extra delay per packet,
reordering allowed). The sender is the same in both cases (libopus with in-band FEC,
sonic_voice.kvs.opus_send.OpusFecTrack, as a browser with useinbandfec=1 sends); only the
receiver differs:

- stock: ``track.recv()`` on aiortc's RemoteStreamTrack (its JitterBuffer(16, prefetch=4));
- ours:  sonic_voice.kvs.jitter.install_receiver (adaptive depth, FEC, PLC, NACK).

Per cell (loss 0/5/10/20 % x jitter 0/30/60 ms):
- lost (stock): source frames that never came out; unrec (ours): frames concealed by PLC
  or silence; fec/nack: frames rebuilt from FEC / recovered by retransmission;
- latency: time a frame's audio comes out of the receive path minus the time its RTP
  packet entered the relay (= left the sender), mean and p95;
- SNR: received audio placed on the RTP timeline vs the source (aligned for the codec
  delay), in dB: concealment that sounds right scores higher than holes.

Goals at 10 % loss: unrecoverable <= 5 % of frames, p95 latency <= 120 ms.
Run: ``.venv/bin/python bench/loss_sweep.py [--seconds 5] [--quick]``.
"""

from __future__ import annotations

import argparse
import asyncio
import time

import numpy as np

from _common import figure, isolate, pct, setup_path

isolate()
setup_path()

from sonic_voice.kvs.jitter import install_receiver  # noqa: E402
from sonic_voice.kvs.opus_send import OpusFecTrack, OpusSendConfig, munge_sdp  # noqa: E402

from test.harness.netimpair import Impairment, UdpImpairRelay, connect_through  # noqa: E402
from test.harness.signals import speech_like  # noqa: E402

RATE = 48000
FRAME = 960
LEAD = RATE // 2


def snr_db(src: np.ndarray, got: np.ndarray) -> float:
    """SNR of ``got`` against ``src`` after the best small lag (Opus adds ~6.5 ms)."""
    s = src.astype(np.float64)
    best = -99.0
    for lag in range(0, 600, 8):
        g = got[lag : lag + len(s)].astype(np.float64)
        if len(g) < len(s):
            g = np.concatenate((g, np.zeros(len(s) - len(g))))
        err = np.sum((s - g) ** 2)
        val = 10 * np.log10(np.sum(s**2) / max(err, 1e-9))
        best = max(best, val)
    return best


async def run_cell(kind: str, loss: float, jitter: float, seconds: float, seed: int) -> dict:
    relay = UdpImpairRelay(Impairment(loss_pct=loss, jitter_ms=jitter, seed=seed))
    track = OpusFecTrack(OpusSendConfig(packet_loss_pct=max(5, int(loss))))
    src = speech_like(seconds, RATE, seed=2, level=0.3)
    track.push(np.concatenate([np.zeros(LEAD, np.int16), src, np.zeros(LEAD, np.int16)]))
    n_frames = (2 * LEAD + len(src)) // FRAME
    out: dict[int, tuple[float, np.ndarray, str]] = {}  # rtp ts -> (time, pcm, kind)
    tasks: list[asyncio.Task] = []
    state: dict = {}

    def on_track(pc, t) -> None:
        if kind == "ours":

            def on_frame(f) -> None:
                if f.kind == "stretch":  # an inserted frame: it stands for no packet
                    return
                out.setdefault(f.rtp_ts & 0xFFFFFFFF, (time.monotonic(), f.pcm, f.kind))

            state["rx"] = install_receiver(pc, t, on_frame=on_frame)
        else:

            async def pull() -> None:
                try:
                    while True:
                        fr = await t.recv()
                        now = time.monotonic()
                        pcm = fr.to_ndarray().reshape(-1, 2).mean(axis=1).astype(np.int16)
                        out.setdefault(int(fr.pts), (now, pcm, "normal"))
                except Exception:  # noqa: BLE001 - the track ends when the peer closes
                    return

            tasks.append(asyncio.ensure_future(pull()))

    pc_a, pc_b = await connect_through(relay, track, on_track, munge=munge_sdp)
    deadline = time.monotonic() + seconds + 3 * LEAD / RATE + 5
    while track.sent_frames < n_frames and time.monotonic() < deadline:  # noqa: ASYNC110 - polls the sender's frame counter
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)
    for t in tasks:
        t.cancel()
    await pc_a.close()
    await pc_b.close()
    relay.close()
    if "rx" in state:
        state["rx"].stop()

    seen = relay.first_seen["a_to_b"]
    first_ts = min(seen, key=lambda ts: seen[ts])
    sent = sorted((ts - first_ts) & 0xFFFFFFFF for ts in seen)
    sent = [s for s in sent if s < n_frames * FRAME]
    timeline = np.zeros(n_frames * FRAME + RATE, np.int16)
    lat, missing, counts = [], 0, {"fec": 0, "plc": 0, "silence": 0, "normal": 0, "stretch": 0}
    for rel in sent:
        key = rel if kind == "stock" else (first_ts + rel) & 0xFFFFFFFF
        got = out.get(key)
        if got is None:
            missing += 1
            continue
        when, pcm, k = got
        counts[k] = counts.get(k, 0) + 1
        lat.append((when - seen[(first_ts + rel) & 0xFFFFFFFF]) * 1000)
        timeline[rel : rel + len(pcm)] = pcm[: len(timeline) - rel]
    unrec = missing + counts["plc"] + counts["silence"]
    stats = state["rx"].stats if "rx" in state else None
    return {
        "frames": len(sent),
        "unrec_pct": 100 * unrec / max(1, len(sent)),
        "fec": counts["fec"],
        "nack": stats.nack_recovered if stats else 0,
        "lat_mean": float(np.mean(lat)) if lat else float("nan"),
        "lat_p95": pct(lat, 95) if lat else float("nan"),
        "snr": snr_db(src, timeline[LEAD:]),
        "dropped": relay.stats["a_to_b"].dropped,
        "target": stats.target_ms if stats else 80.0,
    }


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--quick", action="store_true", help="only 0 and 10 %% loss, 0/30 ms")
    ap.add_argument("--loss", type=float, nargs="*", help="loss %% values to sweep")
    ap.add_argument("--jitter", type=float, nargs="*", help="jitter ms values to sweep")
    args = ap.parse_args()
    losses = args.loss or ([0, 10] if args.quick else [0, 5, 10, 20])
    jitters = args.jitter or ([0, 30] if args.quick else [0, 30, 60])
    t0 = time.monotonic()
    print(
        f"{'loss%':>5} {'jit':>4} | {'path':5} {'frames':>6} {'unrec%':>6} {'fec':>4} "
        f"{'nack':>4} {'mean':>6} {'p95':>6} {'snr':>6} {'target':>6}",
        flush=True,
    )
    results = {}
    for loss in losses:
        for jitter in jitters:
            for kind in ("stock", "ours"):
                r = await run_cell(kind, loss, jitter, args.seconds, seed=7 + int(loss + jitter))
                results[(loss, jitter, kind)] = r
                print(
                    f"{loss:>5} {jitter:>4} | {kind:5} {r['frames']:>6} {r['unrec_pct']:>6.1f} "
                    f"{r['fec']:>4} {r['nack']:>4} {r['lat_mean']:>6.1f} {r['lat_p95']:>6.1f} "
                    f"{r['snr']:>6.1f} {r['target']:>6.1f}",
                    flush=True,
                )
    print(f"sweep took {time.monotonic() - t0:.0f} s", flush=True)
    for kind in ("stock", "ours"):
        for jitter in jitters:
            r = results.get((10, jitter, kind))
            if r is None:
                continue
            figure(f"{kind}_loss10_jitter{jitter}_unrecoverable", r["unrec_pct"], "%", "<= 5")
            figure(f"{kind}_loss10_jitter{jitter}_latency_mean", r["lat_mean"], "ms")
            figure(f"{kind}_loss10_jitter{jitter}_latency_p95", r["lat_p95"], "ms", "<= 120")
            figure(f"{kind}_loss10_jitter{jitter}_snr", r["snr"], "dB")
        r = results.get((0, 0, kind))
        if r is not None:
            figure(f"{kind}_clean_latency_p95", r["lat_p95"], "ms", "well under 80 (ours)")


if __name__ == "__main__":
    asyncio.run(main())
