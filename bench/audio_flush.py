"""Flush to silence at the device: how long the speaker keeps sounding after a barge-in.

A private PulseAudio server (the test harness's) plays a continuous tone through our
PlaybackStream (PortAudio, the audio_io settings); the sink's monitor is captured through
PortAudio too, so both sides are timed on PortAudio's stream clock. At a random moment
``flush()`` is called; the figure is the time from that call to the first silent sample
seen on the monitor (what a listener at the speaker would hear), and, for comparison,
PortAudio's own estimate (DAC time of the last non-silent block).

    python bench/audio_flush.py [--trials 40]
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np

from _common import figure, isolate, pct, setup_path

RATE = 24000


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=40)
    # Defaults are audio_io's (output_block_ms, latency).
    ap.add_argument("--block-ms", type=float, default=5.0)
    ap.add_argument("--latency", type=float, default=0.015)
    args = ap.parse_args()
    setup_path()
    from test.harness.pulse import PulseServer

    server = PulseServer()
    os.environ.update(server.env)
    import sounddevice as sd

    from sonic_voice.audio.devices import PlaybackStream, StreamSettings, quiet_alsa

    quiet_alsa()  # underrun lines are counted (pb.status_flags), not printed
    pb = PlaybackStream(StreamSettings(rate=RATE, block_ms=args.block_ms, latency=args.latency))
    # Wrap the callback to learn PortAudio's DAC estimate of every block.
    dac_log: list[tuple[float, int]] = []
    orig = pb._callback

    def cb(outdata, frames, time_info, status) -> None:
        before = pb.buffer.played_samples
        orig(outdata, frames, time_info, status)
        dac_log.append((time_info.outputBufferDacTime, pb.buffer.played_samples - before))

    pb._stream._callback = None  # keep the original stream object; replace its callback
    pb._stream.close()
    pb._stream = sd.OutputStream(
        device=pb.device_index,
        samplerate=RATE,
        channels=1,
        dtype="int16",
        blocksize=int(RATE * args.block_ms / 1000),
        latency=args.latency,
        callback=cb,
    )
    # The monitor of the speaker, captured on the same clock.
    os.environ["PULSE_SOURCE"] = "speaker.monitor"
    mon: list[tuple[float, np.ndarray]] = []
    lock = threading.Lock()

    def mcb(indata, frames, time_info, status) -> None:
        with lock:
            mon.append((time_info.inputBufferAdcTime, indata[:, 0].copy()))

    cap = sd.InputStream(
        device=pb.device_index,
        samplerate=RATE,
        channels=1,
        dtype="int16",
        blocksize=120,
        latency=0.01,
        callback=mcb,
    )
    pb.start()
    cap.start()
    time.sleep(1.0)
    rng = np.random.default_rng(1)
    measured, estimated, call_ms = [], [], []
    tone = (0.5 * 32767 * np.sin(2 * np.pi * 440 * np.arange(RATE * 2) / RATE)).astype(np.int16)
    for _ in range(args.trials):
        pb.write(tone)
        time.sleep(0.4 + rng.uniform(0, 0.2))
        t_flush = pb._stream.time
        dac_mark = len(dac_log)
        c0 = time.perf_counter()
        pb.flush()
        call_ms.append((time.perf_counter() - c0) * 1000)
        time.sleep(0.3)
        with lock:
            blocks = list(mon)
            mon.clear()
        # First silent sample on the monitor after the flush (the tone has no zero runs of
        # 8+ samples; its zero crossings are single samples).
        silent_at = None
        for t0, x in blocks:
            if t0 + len(x) / RATE < t_flush:
                continue
            quiet = np.abs(x.astype(np.int32)) < 50
            for i in range(len(x) - 8):
                if quiet[i : i + 8].all() and t0 + i / RATE >= t_flush - 0.005:
                    silent_at = t0 + i / RATE
                    break
            if silent_at is not None:
                break
        if silent_at is not None:
            measured.append((silent_at - t_flush) * 1000)
        last_audio = [t + n / RATE for t, n in dac_log[max(0, dac_mark - 50) :] if n > 0]
        if last_audio:
            estimated.append((max(last_audio) - t_flush) * 1000)
    cap.close()
    pb.close()
    server.close()
    print(f"trials: {len(measured)} measured of {args.trials}")
    figure("flush_to_silence_p50", pct(measured, 50), "ms", "<= 30 ms")
    figure("flush_to_silence_p99", pct(measured, 99), "ms", "<= 30 ms")
    figure("flush_call_p50", pct(call_ms, 50), "ms")
    figure("flush_to_silence_portaudio_estimate_p50", pct(estimated, 50), "ms")


if __name__ == "__main__":
    isolate()
    main()
