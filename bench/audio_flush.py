"""Flush to silence at the device: how long the speaker keeps sounding after a barge-in.

A private PulseAudio server (the test harness's) plays a continuous tone through the
speaker backend audio_io picks by default (``speaker_backend`` ``auto``: libpulse's own
API, sonic_voice/audio/pulse.py, with this server) or the one named by ``--backend``
(``portaudio``: PlaybackStream through ALSA's pulse plugin, the former path). The sink's
monitor is captured through PortAudio, and the flush is timed on that capture stream's
clock. At a random moment ``flush()`` is called; the figure is the time from that call to
the first silent sample seen on the monitor (what a listener at the speaker would hear),
and, for PortAudio, PortAudio's own estimate (DAC time of the last non-silent block).
Also the CPU while it plays (4 s, before the phases): this process (speaker and monitor
capture) and the PulseAudio daemon, in % of one core.

The stream settings are audio_io's defaults (``output_block_ms``, ``latency``,
``speaker_backend``, read from the node's parameter dataclass). Both phases by default
(``--load both|off|on``, bench/_common.py): quiet, then under the standard background load
(one busy process per core). Goal: flush -> silence p99 <= 20 ms (issue 10), in both.

    python bench/audio_flush.py [--trials 40] [--load both] [--rt PRIO]
                                [--backend auto|pulse|portaudio|both]

``FLUSH_DEBUG=1`` prints each flush slower than 15 ms with its call time and underflows.
"""

from __future__ import annotations

import argparse
import os
import threading
import time

import numpy as np

from _common import (
    Figures,
    add_load_option,
    add_rt_option,
    isolate,
    pct,
    phase,
    phases,
    real_time,
    setup_path,
)

RATE = 24000
GOAL = "<= 20 ms"


def audio_io_defaults() -> tuple[float, float, str]:
    """(output_block_ms, latency s, speaker_backend) as audio_io starts by default."""
    import dataclasses

    from sonic_voice.nodes.audio_io import AudioParams

    d = {f.name: f.default for f in dataclasses.fields(AudioParams)}
    return float(d["output_block_ms"]), float(d["latency"]), str(d["speaker_backend"])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--trials", type=int, default=40, help="flushes per phase")
    ap.add_argument("--block-ms", type=float, help="speaker block (default: audio_io's)")
    ap.add_argument("--latency", type=float, help="device latency, s (default: audio_io's)")
    ap.add_argument(
        "--backend",
        choices=("auto", "pulse", "portaudio", "both"),
        help="speaker backend (default: audio_io's speaker_backend); 'both': audio_io's, "
        "then portaudio (figures suffixed _portaudio)",
    )
    add_load_option(ap)
    add_rt_option(ap)
    args = ap.parse_args()
    real_time(args.rt)  # before any stream starts its threads
    setup_path()
    from test.harness.pulse import PulseServer

    server = PulseServer()
    try:
        os.environ.update(server.env)  # before PortAudio starts (sounddevice's import)
        block_ms, latency, backend = audio_io_defaults()
        args.block_ms = args.block_ms or block_ms
        args.latency = args.latency or latency
        args.backend = args.backend or backend
        if args.backend == "both":
            measure(args, server.proc.pid, backend)
            measure(args, server.proc.pid, "portaudio", suffix="_portaudio")
        else:
            measure(args, server.proc.pid, args.backend)
    finally:
        server.close()


def cpu_seconds(pid: int | str = "self") -> float:
    """User + system CPU time of a process so far (all its threads)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(args: argparse.Namespace, daemon_pid: int, backend: str, suffix: str = "") -> None:
    import sounddevice as sd

    from sonic_voice.audio.devices import StreamSettings, open_playback, quiet_alsa

    quiet_alsa()  # underrun lines are counted (pb.status_flags), not printed
    settings = StreamSettings(rate=RATE, block_ms=args.block_ms, latency=args.latency)
    pb = open_playback(settings, backend)
    dac_log: list[tuple[float, int]] = []
    if pb.backend == "portaudio":
        # Wrap the callback to learn PortAudio's DAC estimate of every block.
        orig = pb._callback

        def cb(outdata, frames, time_info, status) -> None:
            before = pb.buffer.played_samples
            orig(outdata, frames, time_info, status)
            dac_log.append((time_info.outputBufferDacTime, pb.buffer.played_samples - before))

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
        device="pulse",
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
    tone = (0.5 * 32767 * np.sin(2 * np.pi * 440 * np.arange(RATE * 2) / RATE)).astype(np.int16)
    figs = Figures()
    counts = {}
    # CPU while the speaker plays (before the phases, whatever the machine is doing): this
    # process (the speaker and the monitor's capture) and the PulseAudio daemon.
    pb.write(np.tile(tone, 3))
    time.sleep(0.5)
    c0, d0, w0 = cpu_seconds(), cpu_seconds(daemon_pid), time.monotonic()
    time.sleep(4.0)
    wall = time.monotonic() - w0
    cpu_process = (cpu_seconds() - c0) / wall * 100
    cpu_daemon = (cpu_seconds(daemon_pid) - d0) / wall * 100
    pb.flush()
    time.sleep(0.3)

    def trials() -> tuple[list[float], list[float], list[float]]:
        measured, estimated, call_ms = [], [], []
        for _ in range(args.trials):
            pb.write(tone)
            time.sleep(0.4 + rng.uniform(0, 0.2))
            t_flush = cap.time  # the clock of the monitor's timestamps
            dac_mark = len(dac_log)
            c0 = time.perf_counter()
            pb.flush()
            call_ms.append((time.perf_counter() - c0) * 1000)
            time.sleep(0.3)
            # Under load the monitor's callbacks may lag: wait until it has delivered what
            # was played up to 0.2 s after the flush (its timestamps are capture times).
            deadline = time.monotonic() + 3.0
            while time.monotonic() < deadline:
                with lock:
                    if mon and mon[-1][0] >= t_flush + 0.2:
                        break
                time.sleep(0.02)
            with lock:
                blocks = list(mon)
                mon.clear()
            # First silent sample on the monitor after the flush (the tone has no zero runs
            # of 8+ samples; its zero crossings are single samples).
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
                if os.environ.get("FLUSH_DEBUG") and measured[-1] > 15:
                    print(
                        f"slow: {measured[-1]:.1f} ms, call {call_ms[-1]:.2f} ms, "
                        f"underflows {pb.status_flags}"
                    )
            last_audio = [t + n / RATE for t, n in dac_log[max(0, dac_mark - 50) :] if n > 0]
            if last_audio:
                estimated.append((max(last_audio) - t_flush) * 1000)
        return measured, estimated, call_ms

    for name in phases(args.load):
        with phase(name) as info:
            measured, estimated, call_ms = trials()
        figs.phases.append(info)
        counts[name] = len(measured)
        figs.add(name, "flush_to_silence_p50" + suffix, pct(measured, 50), "ms", GOAL)
        figs.add(name, "flush_to_silence_p99" + suffix, pct(measured, 99), "ms", GOAL)
        figs.add(name, "flush_call_p50" + suffix, pct(call_ms, 50), "ms")
        figs.add(name, "flush_call_p99" + suffix, pct(call_ms, 99), "ms")
        if estimated:
            figs.add(
                name, "flush_to_silence_portaudio_estimate_p50" + suffix, pct(estimated, 50), "ms"
            )
    cap.close()
    pb.close()
    print(
        f"audio_flush: {pb.backend} speaker ({backend}), block {args.block_ms:g} ms, "
        f"latency {args.latency:g} s, underflows {pb.status_flags}; trials "
        + ", ".join(f"{n}: {k} measured of {args.trials}" for n, k in counts.items())
    )
    figs.print()
    print(f"playback_cpu_process{suffix}: {cpu_process:.2f} % of a core")
    print(f"playback_cpu_pulseaudio{suffix}: {cpu_daemon:.2f} % of a core")


if __name__ == "__main__":
    isolate()
    main()
