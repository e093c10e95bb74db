"""The browser's first word after a pause: does ``opus_pause_in_silence`` cost latency or
clip the onset? Real Chromium (the viewer page, test/harness/chromium.py) against the
robot's real ``KvsMaster`` through the KVS stand-in, on loopback.

Why: with ``opus_pause_in_silence`` the robot sends a viewer nothing while it is silent
(most of its life), which saves most of the robot -> viewer send path's CPU (issue 10).
It is off by default for a worry: after the pause Chromium's NetEq restarts its buffer
and might add delay to, or clip, the start of the next utterance. This measures both.

How, per session (a fresh master with the mode and a fresh Chromium; sessions alternate
off/on so slow drifts of the shared machine hit both modes alike):

- ``UTTERANCES`` utterances, each ``master.play()``-ed after 1.5-3 s of robot silence
  (random, the same sequence in both modes). Each utterance is speech-like (the tests'
  signal) cut to start at a voiced frame: an abrupt onset, the case a clipped first
  syllable would show.
- The page's robot audio (the WebAudio source the page makes of the remote track) goes
  also to this benchmark's own AudioWorklet, which keeps every sample with the context
  frame (``currentFrame``) it was rendered at.
- Onset: the first 200 ms of the utterance cross-correlated with the capture (sent
  signal FFT-resampled 24 -> 48 kHz, zero phase) from the capture position at play
  time on: the lag puts the utterance's first sample at a context frame.
- Frame -> time: a 2 ms timer in the page records (performance.now(), currentTime) pairs;
  within +-1.5 s of the onset, max(currentTime - performance.now()) is the moment a render
  callback had just finished (currentTime jumps a callback at a time), so a frame is
  rendered at ``frame / rate - that offset``, to within one render callback (the
  audio callback's 10 ms here: every sample of a callback is rendered at once). The page's
  performance.now() and Python's time.monotonic() are both CLOCK_MONOTONIC; their offset
  is read over CDP (20 round trips, the shortest one's midpoint: error <= half its
  round trip, printed). Both errors are the same for both modes, so the difference of the
  modes is unbiased; the delay is play() -> the onset reaching the page's WebAudio graph
  (robot pacing, loopback, NetEq, Chromium's WebAudio feed), not the loudspeaker.
- Split: the sender's part is play() -> the first speech packet handed to aiortc
  (``record_send_times``); the browser's part is the rest.
- Clipping: NCC of the first 100 ms played vs sent at the found lag, and the energy of the
  first 20 ms played / sent, next to the same ratio for the loudest 100 ms after the first
  200 ms (the path's steady gain): a clipped or faded first syllable shows as a
  first-20-ms ratio well below the steady one.
- Chromium's own stats (getStats inbound-rtp), per utterance (from just before play() to
  the utterance's end + 0.5 s): jitterBufferDelay / jitterBufferEmittedCount, the target
  delay, concealed samples and concealment events, accelerate/decelerate samples; and
  packetsLost over the session.

Measured here (2026-11-30, 8 sessions, 24 utterances a mode, load average 0.7-1.9 of 2
cores, 10 ms pause_preroll_ms): play() -> onset p50 55.4 ms off, 55.4 ms on (p99 91 / 66;
robot part 8.3 / 0.4 ms, browser part 46.5 / 54.9 ms); first 100 ms NCC 0.97 both; first
20 ms energy ratio 0.89 / 0.87 (steady 0.88 / 0.89); no packet lost. Session to session
the onset moves by 10-20 ms (where NetEq settles), more than the modes differ: compare
them only side by side. With ``FIRST_WORD_STALL_MS=400``: off p50 291 ms (Chromium's
target delay 400 ms after the stall), on 40 ms.

``python bench/first_word.py`` (inside scripts/isolated.sh: it re-executes itself there).
``FIRST_WORD_SESSIONS`` (4: off, on, off, on), ``FIRST_WORD_UTTERANCES`` (8 per session),
``FIRST_WORD_SETTLE_S`` (2: connected, before the first pause), ``FIRST_WORD_VERBOSE=1``
(a line per utterance: delay, NCC, played/sent amplitude per 10 ms of the onset),
``FIRST_WORD_STALL_MS`` (0): block the robot's event loop once that long, in the silence
before the first utterance (a busy robot: a tool call, a session rotation, the GIL).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import sys
import time
from dataclasses import dataclass, field

import _common

_common.isolate()
_common.setup_path()

import numpy as np  # noqa: E402

from test import test_web_viewer as page  # noqa: E402
from test.harness.chromium import Chromium  # noqa: E402
from test.harness.signals import best_alignment, speech_like  # noqa: E402

VERBOSE = bool(os.environ.get("FIRST_WORD_VERBOSE"))  # a line per utterance on stderr
STALL_MS = float(os.environ.get("FIRST_WORD_STALL_MS", "0"))
SESSIONS = int(os.environ.get("FIRST_WORD_SESSIONS", "4"))
UTTERANCES = int(os.environ.get("FIRST_WORD_UTTERANCES", "8"))
SETTLE_S = float(os.environ.get("FIRST_WORD_SETTLE_S", "2"))
RATE_OUT = 24000  # what master.play() takes
UTTER_S = 0.8
PAUSE_S = (1.5, 3.0)

# Before the page's scripts: keep every RTCPeerConnection (for getStats) and every
# MediaStreamSource the page makes (the robot's audio into its AudioContext).
HOOKS_JS = (
    page.RECORD_PEERS_JS
    + """
(() => {
  window.__svSources = [];
  const native = AudioContext.prototype.createMediaStreamSource;
  AudioContext.prototype.createMediaStreamSource = function (stream) {
    const node = native.call(this, stream);
    window.__svSources.push({ ctx: this, node });
    return node;
  };
})();
"""
)

# A capture that knows when each sample was rendered: blocks of 1024 samples, each with
# the context frame of its first sample.
WORKLET_JS = """
class SvTimedCapture extends AudioWorkletProcessor {
  constructor() { super(); this.buf = new Float32Array(1024); this.fill = 0; this.at = 0; }
  process(inputs) {
    const ch = inputs[0] && inputs[0][0];
    if (!ch) return true;
    for (let i = 0; i < ch.length; i++) {
      if (this.fill === 0) this.at = currentFrame + i;
      this.buf[this.fill++] = ch[i];
      if (this.fill === this.buf.length) {
        this.port.postMessage({ at: this.at, pcm: this.buf });
        this.buf = new Float32Array(1024);
        this.fill = 0;
      }
    }
    return true;
  }
}
registerProcessor("sv-timed-capture", SvTimedCapture);
"""

START_CAPTURE_JS = """
(async () => {
  const { ctx, node } = window.__svSources[window.__svSources.length - 1];
  const url = URL.createObjectURL(new Blob([WORKLET], { type: "text/javascript" }));
  await ctx.audioWorklet.addModule(url);
  const cap = new AudioWorkletNode(ctx, "sv-timed-capture");
  const st = { rate: ctx.sampleRate, blocks: [], clock: [] };
  cap.port.onmessage = (e) => st.blocks.push(e.data);
  node.connect(cap);
  const mute = ctx.createGain();
  mute.gain.value = 0;
  cap.connect(mute).connect(ctx.destination);
  st.timer = setInterval(() => st.clock.push([performance.now(), ctx.currentTime]), 2);
  st.ctx = ctx;
  window.__svCap = st;
  return ctx.sampleRate;
})()
""".replace("WORKLET", json.dumps(WORKLET_JS), 1)

# Capture position now: the last block's first frame + its length (a block lags its
# rendering by up to its length; this is only where the onset search starts).
CAP_POS_JS = """(() => { const b = window.__svCap.blocks;
  return b.length ? b[b.length - 1].at + b[b.length - 1].pcm.length : 0; })()"""

TAKE_JS = """
(() => {
  const st = window.__svCap;
  const blocks = st.blocks;
  const n = blocks.reduce((a, b) => a + b.pcm.length, 0);
  const pcm = new Float32Array(n);
  const at = [];
  let i = 0;
  for (const b of blocks) { at.push(b.at); pcm.set(b.pcm, i); i += b.pcm.length; }
  const bytes = new Uint8Array(pcm.buffer);
  let bin = "";
  for (let j = 0; j < bytes.length; j += 0x8000) {
    bin += String.fromCharCode.apply(null, bytes.subarray(j, j + 0x8000));
  }
  return { rate: st.rate, at, pcm: btoa(bin), clock: st.clock };
})()
"""

STATS_JS = """
(async () => {
  const pc = window.__svPeers[window.__svPeers.length - 1];
  const report = await pc.getStats();
  let out = null;
  report.forEach((r) => { if (r.type === "inbound-rtp" && r.kind === "audio") out = r; });
  return out;
})()
"""
STAT_KEYS = (
    "jitterBufferDelay",
    "jitterBufferEmittedCount",
    "jitterBufferTargetDelay",
    "jitterBufferMinimumDelay",
    "concealedSamples",
    "silentConcealedSamples",
    "concealmentEvents",
    "insertedSamplesForDeceleration",
    "removedSamplesForAcceleration",
    "totalSamplesReceived",
    "packetsReceived",
    "packetsLost",
    "packetsDiscarded",
)


def fft_resample(x: np.ndarray, src: int, dst: int) -> np.ndarray:
    """Band-limited, zero-phase resampling (no filter delay: the onset stays at sample 0)."""
    n = len(x)
    m = round(n * dst / src)
    spec = np.fft.rfft(x.astype(np.float64))
    out = np.zeros(m // 2 + 1, complex)
    k = min(len(spec), len(out))
    out[:k] = spec[:k]
    return np.fft.irfft(out, m) * (m / n)


def utterance(seed: int) -> np.ndarray:
    """0.8 s of the tests' speech-like signal starting at a voiced 20 ms (abrupt onset)."""
    x = speech_like(UTTER_S + 1.0, RATE_OUT, seed=seed, level=0.3)
    win = RATE_OUT // 50
    rms = np.sqrt(np.convolve(x.astype(np.float64) ** 2, np.ones(win) / win, "valid"))
    start = int(np.argmax(rms >= 0.7 * np.sqrt(np.mean(x.astype(np.float64) ** 2))))
    return x[start : start + int(UTTER_S * RATE_OUT)]


def energy(x: np.ndarray) -> float:
    return float(np.sum(np.asarray(x, np.float64) ** 2)) or 1e-30


def ncc(a: np.ndarray, b: np.ndarray) -> float:
    d = float(np.linalg.norm(a) * np.linalg.norm(b))
    return float(np.dot(a, b) / d) if d else 0.0


@dataclass
class Result:
    mode: str
    delay_ms: list[float] = field(default_factory=list)
    send_ms: list[float] = field(default_factory=list)
    browser_ms: list[float] = field(default_factory=list)
    ncc100: list[float] = field(default_factory=list)
    e20: list[float] = field(default_factory=list)
    e_steady: list[float] = field(default_factory=list)
    jb_ms: list[float] = field(default_factory=list)
    target_ms: list[float] = field(default_factory=list)
    concealed_ms: list[float] = field(default_factory=list)
    concealment_events: list[float] = field(default_factory=list)
    accel_ms: list[float] = field(default_factory=list)
    decel_ms: list[float] = field(default_factory=list)
    lost: int = 0
    pacing_ms: list[float] = field(default_factory=list)
    capture_gaps: list[int] = field(default_factory=list)
    sync_err_ms: list[float] = field(default_factory=list)
    callback_ms: list[float] = field(default_factory=list)
    sent_per_s_idle: list[float] = field(default_factory=list)


async def clock_offset(browser: Chromium) -> tuple[float, float]:
    """(time.monotonic() - performance.now()/1000, half the best round trip), both s."""
    best = (float("inf"), 0.0)
    for _ in range(20):
        t0 = time.monotonic()
        perf = await browser.evaluate("performance.now()")
        t1 = time.monotonic()
        if t1 - t0 < best[0]:
            best = (t1 - t0, (t0 + t1) / 2 - perf / 1000)
    return best[1], best[0] / 2


async def session(
    mode: bool, pauses: list[float], utterances: list[np.ndarray], res: Result
) -> None:
    async def prepare(browser: Chromium) -> None:
        await browser.send("Page.addScriptToEvaluateOnNewDocument", {"source": HOOKS_JS})
        # The page's CSP (script-src 'self') refuses the bench's worklet blob.
        await browser.send("Page.setBypassCSP", {"enabled": True})

    robot = page.robot_and_page("bench", prepare=prepare, opus_pause_in_silence=mode)
    async with robot as (_, master, browser):
        await browser.wait_for("window.__svSources.length > 0", 20)
        rate = await browser.evaluate(START_CAPTURE_JS)
        out = master.peers["bench"].out
        out.record_send_times = True
        await asyncio.sleep(SETTLE_S)  # the page's buffer settles
        if STALL_MS:  # the robot's loop blocked once, in the silence
            await asyncio.sleep(0.5)
            time.sleep(STALL_MS / 1000)  # noqa: ASYNC251 - the stall itself
        offset, err = await clock_offset(browser)
        res.sync_err_ms.append(err * 1000)
        plays = []
        for pause, u in zip(pauses, utterances, strict=True):
            n0, t0 = out.sent_frames, time.monotonic()
            await asyncio.sleep(pause)
            res.sent_per_s_idle.append((out.sent_frames - n0) / (time.monotonic() - t0))
            before = await browser.evaluate(STATS_JS)
            pos = await browser.evaluate(CAP_POS_JS)
            t_play = time.monotonic()
            master.play(u)
            await asyncio.sleep(UTTER_S + 0.5)
            after = await browser.evaluate(STATS_JS)
            plays.append((t_play, pos, u, before, after))
        cap = await browser.evaluate(TAKE_JS, time_limit=60)
        final = await browser.evaluate(STATS_JS)
        res.lost += int(final.get("packetsLost", 0))
        offset2, err2 = await clock_offset(browser)
        res.sync_err_ms.append(err2 * 1000)
        send_times = sorted(out.send_times.items())
    analyse(res, rate, cap, plays, (offset + offset2) / 2, send_times)


def analyse(
    res: Result,
    rate: int,
    cap: dict,
    plays: list,
    offset: float,
    send_times: list[float],
) -> None:
    import base64

    pcm = np.frombuffer(base64.b64decode(cap["pcm"]), "<f4").astype(np.float64)
    at = np.asarray(cap["at"], np.int64)
    block = 1024  # the worklet's block: samples block*k.. carry context frames at[k]..
    if len(at) > 1 and not np.all(np.diff(at) == block):
        # A render quantum without input (the source not live yet) is not kept: map each
        # sample through its own block's frame, never through the first block's.
        steps = np.diff(at)
        bad = np.where(steps != block)[0]
        res.capture_gaps.extend(int(steps[i] - block) for i in bad)

    def frame_of(i: int) -> int:
        return int(at[i // block]) + i % block

    def index_of(frame: int) -> int:
        k = max(0, int(np.searchsorted(at, frame, side="right")) - 1)
        return k * block + max(0, frame - int(at[k]))

    clock = np.asarray(cap["clock"], np.float64)  # (performance.now() ms, currentTime s)
    perf_s, ctx_s = clock[:, 0] / 1000, clock[:, 1]
    jumps = np.diff(ctx_s)
    jumps = jumps[jumps > 0]
    if len(jumps):
        res.callback_ms.append(float(np.median(jumps)) * 1000)
    head = int(0.2 * rate)
    for t_play, pos, u, before, after in plays:
        sent = fft_resample(u, RATE_OUT, rate) / 32768.0
        lo = max(0, index_of(int(pos)) - int(0.1 * rate))
        window = pcm[lo : lo + int(1.5 * rate)]
        ref = sent[:head]
        corr = np.correlate(window, ref, "valid")
        norms = np.sqrt(np.convolve(window**2, np.ones(head), "valid")) * np.linalg.norm(ref)
        score = corr / np.maximum(norms, 1e-12)
        lag = int(np.argmax(score))
        start = lo + lag  # index in pcm of the utterance's first sample
        onset_frame = frame_of(start)
        # Frame -> monotonic time: the freshest (currentTime - perf) near the onset.
        onset_t_ctx = onset_frame / rate
        near = np.abs(ctx_s - onset_t_ctx) <= 1.5
        ctx_minus_perf = float(np.max(ctx_s[near] - perf_s[near]))
        onset_mono = onset_t_ctx - ctx_minus_perf + offset
        res.delay_ms.append((onset_mono - t_play) * 1000)
        # The robot's part: play() -> the first packet of the utterance handed to aiortc.
        ours = [(p, t) for p, t in send_times if t_play <= t <= t_play + UTTER_S + 0.1]
        first_sent = ours[0][1] if ours else float("nan")
        res.send_ms.append((first_sent - t_play) * 1000)
        res.browser_ms.append((onset_mono - first_sent) * 1000)
        # Pacing check: within an utterance, packets leave at their RTP time (a stalled
        # robot loop would burst them, and NetEq would deepen its buffer for it).
        if len(ours) > 1:
            late = np.array([t - p / 48000 for p, t in ours])
            res.pacing_ms.append(1000 * float(late.max() - late.min()))
        played = pcm[start : start + len(sent)]
        n100, n20, n10 = int(0.1 * rate), int(0.02 * rate), int(0.01 * rate)
        res.ncc100.append(ncc(played[:n100], sent[:n100]))
        res.e20.append(energy(played[:n20]) / energy(sent[:n20]))
        # The path's steady gain: the loudest 100 ms from 200 ms in, aligned anew (NetEq
        # may have stretched time since the onset by a few ms).
        a = int(0.2 * rate) + n10 * int(
            np.argmax([energy(sent[int(0.2 * rate) + i * n10 :][:n100]) for i in range(40)])
        )
        b = a + n100
        seg = sent[a:b]
        near_lo = start + a - n10
        k, _ = best_alignment(seg, pcm[near_lo : near_lo + (b - a) + 2 * n10])
        res.e_steady.append(energy(pcm[near_lo + k : near_lo + k + (b - a)]) / energy(seg))
        if VERBOSE:
            env = [
                np.sqrt(energy(played[i : i + n10]) / energy(sent[i : i + n10]))
                for i in range(0, 5 * n10, n10)
            ]
            print(
                f"  {res.mode}: delay {res.delay_ms[-1]:.1f} ms (robot {res.send_ms[-1]:.1f}),"
                f" onset NCC {score[lag]:.2f}, first 100 ms NCC {res.ncc100[-1]:.2f},"
                f" amplitude played/sent per 10 ms {' '.join(f'{e:.2f}' for e in env)},"
                f" steady {np.sqrt(res.e_steady[-1]):.2f}",
                file=sys.stderr,
            )
        if score[lag] < 0.5:
            print(f"warning: weak onset match (NCC {score[lag]:.2f})", file=sys.stderr)

        def d(key: str, before: dict = before, after: dict = after) -> float:
            return float(after.get(key, 0) or 0) - float(before.get(key, 0) or 0)

        emitted = d("jitterBufferEmittedCount")
        res.jb_ms.append(1000 * d("jitterBufferDelay") / emitted if emitted else float("nan"))
        res.target_ms.append(
            1000 * d("jitterBufferTargetDelay") / emitted if emitted else float("nan")
        )
        res.concealed_ms.append(1000 * d("concealedSamples") / 48000)
        res.concealment_events.append(d("concealmentEvents"))
        res.accel_ms.append(1000 * d("removedSamplesForAcceleration") / 48000)
        res.decel_ms.append(1000 * d("insertedSamplesForDeceleration") / 48000)


ROWS = (
    ("delay_ms", "first_word_delay", "ms", "play() -> onset in the page's WebAudio graph"),
    ("send_ms", "first_word_send", "ms", "play() -> first speech packet sent (robot)"),
    ("browser_ms", "first_word_browser", "ms", "first speech packet sent -> onset (browser)"),
    ("ncc100", "first_100ms_ncc", "", "first 100 ms played vs sent"),
    ("e20", "first_20ms_energy_ratio", "", "played / sent, first 20 ms"),
    ("e_steady", "steady_energy_ratio", "", "played / sent, loudest 100 ms after 200 ms"),
    ("jb_ms", "jitter_buffer_delay", "ms", "Chromium: jitterBufferDelay / emitted"),
    ("target_ms", "jitter_buffer_target", "ms", "Chromium: jitterBufferTargetDelay / emitted"),
    ("concealed_ms", "concealed", "ms", "Chromium: concealedSamples per utterance"),
    ("concealment_events", "concealment_events", "", "Chromium, per utterance"),
    ("accel_ms", "accelerated", "ms", "Chromium: removedSamplesForAcceleration"),
    ("decel_ms", "decelerated", "ms", "Chromium: insertedSamplesForDeceleration"),
)

GOALS = {
    "first_word_delay_diff_p50": "<= 5 ms",
    "first_100ms_ncc_on_p50": ">= 0.8",
    "first_20ms_energy_ratio_on_p50": ">= 0.5",
}


def main() -> None:
    rng = random.Random(7)
    pauses = [rng.uniform(*PAUSE_S) for _ in range(UTTERANCES)]
    # Made here: speech_like() takes ~100 ms of CPU; on the master's loop that stalls the
    # robot's track, which bursts its packets after, and Chromium's NetEq then holds a
    # deep buffer (measured: a 400 ms stall took its target delay from 20 to 340-520 ms
    # for the rest of the session).
    utterances = [utterance(100 + i) for i in range(UTTERANCES)]
    results = {"off": Result("off"), "on": Result("on")}
    load0 = os.getloadavg()
    for i in range(SESSIONS):
        mode = i % 2 == 1
        r = results["on" if mode else "off"]
        t0 = time.monotonic()
        asyncio.run(session(mode, pauses, utterances, r))
        print(
            f"session {i + 1}/{SESSIONS} pause_in_silence={mode}: {time.monotonic() - t0:.0f} s,"
            f" delays {', '.join(f'{x:.0f}' for x in r.delay_ms[-UTTERANCES:])} ms",
            flush=True,
        )
    load1 = os.getloadavg()
    off, on = results["off"], results["on"]
    print(f"\nn = {len(off.delay_ms)} utterances off, {len(on.delay_ms)} on ({SESSIONS} sessions)")
    print(f"load average at start {load0[0]:.2f}, at end {load1[0]:.2f} (2 cores)")
    print(
        "clock sync error (half the best CDP round trip): "
        f"{max(off.sync_err_ms + on.sync_err_ms):.2f} ms max; render callback "
        f"{np.median(off.callback_ms + on.callback_ms):.1f} ms (the frame->time resolution)"
    )
    print(
        "robot pacing within utterances (max spread of send time - RTP time): "
        f"off {max(off.pacing_ms, default=float('nan')):.1f} ms, "
        f"on {max(on.pacing_ms, default=float('nan')):.1f} ms; capture gaps (frames, "
        f"mapped around): {off.capture_gaps + on.capture_gaps}"
    )
    print(
        f"robot packets/s while silent: off {np.mean(off.sent_per_s_idle):.1f},"
        f" on {np.mean(on.sent_per_s_idle):.1f}"
    )
    cols = ("off p50", "off p99", "on p50", "on p99")
    print(f"{'':28s} " + " ".join(f"{c:>9s}" for c in cols) + f" {'on-off p50':>10s}")
    for attr, name, unit, what in ROWS:
        a, b = getattr(off, attr), getattr(on, attr)
        pa = [_common.pct(a, 50), _common.pct(a, 99)]
        pb = [_common.pct(b, 50), _common.pct(b, 99)]
        print(
            f"{name:28s} {pa[0]:9.3f} {pa[1]:9.3f} {pb[0]:9.3f} {pb[1]:9.3f} "
            f"{pb[0] - pa[0]:10.3f} {unit:3s} {what}"
        )
    print(f"packetsLost: off {off.lost}, on {on.lost}")
    print()
    for attr, name, unit, _what in ROWS[:6] + ROWS[6:7]:
        a, b = getattr(off, attr), getattr(on, attr)
        for tag, v in (("off", a), ("on", b)):
            for q in (50, 99):
                key = f"{name}_{tag}_p{q}"
                _common.figure(key, _common.pct(v, q), unit or "ratio", GOALS.get(key, ""))
        diff = f"{name}_diff_p50"
        _common.figure(
            diff, _common.pct(b, 50) - _common.pct(a, 50), unit or "ratio", GOALS.get(diff, "")
        )
    _common.figure("utterances_off", len(off.delay_ms), "n")
    _common.figure("utterances_on", len(on.delay_ms), "n")
    _common.figure("packets_lost", off.lost + on.lost, "packets", "<= 0 packets")


if __name__ == "__main__":
    main()
