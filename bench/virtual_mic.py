"""CPU of the process that plays a visitor line into the virtual microphone.

``VirtualAudio.play_into_mic`` starts ``pacat`` (SCHED_FIFO when root) to play a line
into the ``micfeed`` sink. Fed through a pipe that the writer closes at once, pacat
busy-looped until it had read the last byte (poll() reports POLLHUP on a hung-up pipe
even with stdin masked out): about a CPU-second per second of speech, mostly in the
kernel, on a real-time thread. This benchmark plays the same line both ways: ``pipe``
(the old feeding, kept here only for comparison) and ``memfd`` (what play_into_mic does
now), and reads the player's user+system CPU from ``/proc/PID/stat`` just before it exits.

    python bench/virtual_mic.py [--lines 3] [--seconds 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import threading
import time

import numpy as np

from _common import figure, isolate, pct, setup_path


def _cpu_until_exit(proc: subprocess.Popen) -> float:
    """User+system CPU seconds of ``proc``, sampled until it exits."""
    tck = os.sysconf("SC_CLK_TCK")
    last = 0.0
    while proc.poll() is None:
        try:
            with open(f"/proc/{proc.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            last = (int(fields[11]) + int(fields[12])) / tck
        except (FileNotFoundError, ProcessLookupError, IndexError):
            break
        time.sleep(0.01)
    proc.wait()
    return last


def _play_through_pipe(audio, samples: np.ndarray, rate: int) -> subprocess.Popen:
    """The feeding play_into_mic used before: a pipe closed as soon as it is written."""
    from sonic_voice.audio.virtual import _realtime

    proc = subprocess.Popen(
        [
            "pacat",
            "--playback",
            "-d",
            "micfeed",
            "--raw",
            "--format=s16le",
            f"--rate={rate}",
            "--channels=1",
            "--latency-msec=300",
        ],
        env=audio.client_env(),
        stdin=subprocess.PIPE,
    )
    _realtime(proc)

    def feed() -> None:
        try:
            proc.stdin.write(samples.astype("<i2").tobytes())
            proc.stdin.close()
        except BrokenPipeError:
            pass

    threading.Thread(target=feed, daemon=True).start()
    return proc


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--lines", type=int, default=3)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args()
    isolate()
    setup_path()
    from sonic_voice.audio.virtual import VirtualAudio

    rate = 16000
    t = np.arange(int(rate * args.seconds)) / rate
    line = (8000 * np.sin(2 * np.pi * 440 * t)).astype(np.int16)
    audio = VirtualAudio()
    try:
        # The first stream of a fresh daemon stalls; keep it out of the figures.
        _cpu_until_exit(audio.play_into_mic(line[: rate // 4], rate))
        cpu: dict[str, list[float]] = {"pipe": [], "memfd": []}
        for _ in range(args.lines):
            cpu["pipe"].append(_cpu_until_exit(_play_through_pipe(audio, line, rate)))
            cpu["memfd"].append(_cpu_until_exit(audio.play_into_mic(line, rate)))
    finally:
        audio.close()
    per_s = {k: [c / args.seconds for c in v] for k, v in cpu.items()}
    figure("virtual_mic_cpu_pipe_p50", pct(per_s["pipe"], 50), "CPU-s per s of speech")
    figure("virtual_mic_cpu_p50", pct(per_s["memfd"], 50), "CPU-s per s of speech", "< 0.05")
    figure("virtual_mic_cpu_p99", pct(per_s["memfd"], 99), "CPU-s per s of speech", "< 0.05")


if __name__ == "__main__":
    main()
