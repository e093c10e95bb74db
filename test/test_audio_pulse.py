"""The libpulse speaker backend (sonic_voice/audio/pulse.py) on the private PulseAudio
server: what the sink's monitor plays, compared sample by sample with what was written;
the flush bound measured on the monitor (the old PortAudio path fails it); the echo
canceller's tap; the backend choice; no thread left behind."""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from sonic_voice.audio.devices import (
    DeviceNotFoundError,
    PlaybackStream,
    StreamSettings,
    open_playback,
)
from sonic_voice.audio.echo import tap_playback
from sonic_voice.audio.pulse import PulsePlayback, PulseUnavailableError, match_sink

from test.harness.ros import wait_for
from test.harness.signals import best_alignment, chunk_correlations, silent_runs, speech_like

RATE = 24000
NO_SERVER = "unix:/nonexistent/sonic-voice-test/native"


def settings(**kw) -> StreamSettings:
    """audio_io's speaker defaults (20 ms blocks, 15 ms latency) at Nova Sonic's rate."""
    return StreamSettings(**{"rate": RATE, "block_ms": 20.0, "latency": 0.015, **kw})


def tasks() -> set[str]:
    """Thread ids of this process, C ones included (libpulse's mainloop is not Python's)."""
    return set(os.listdir("/proc/self/task"))


@contextlib.contextmanager
def speaker(backend: str = "pulse") -> Iterator[PlaybackStream | PulsePlayback]:
    pb = open_playback(settings(), backend)
    assert pb.backend == backend
    pb.start()
    try:
        yield pb
    finally:
        pb.close()


class Monitor:
    """The speaker's monitor captured through PortAudio with capture timestamps, on the
    clock of ``self.time`` (what bench/audio_flush.py measures with)."""

    def __init__(self) -> None:
        import sounddevice as sd

        self.blocks: list[tuple[float, np.ndarray]] = []
        self.lock = threading.Lock()
        saved = os.environ.get("PULSE_SOURCE")
        os.environ["PULSE_SOURCE"] = "speaker.monitor"  # read by ALSA's pulse plugin at open
        try:
            self.stream = sd.InputStream(
                device="pulse",
                samplerate=RATE,
                channels=1,
                dtype="int16",
                blocksize=120,
                latency=0.01,
                callback=self._on,
            )
        finally:
            if saved is None:
                os.environ.pop("PULSE_SOURCE")
            else:
                os.environ["PULSE_SOURCE"] = saved
        self.stream.start()

    def _on(self, indata, frames, time_info, status) -> None:
        with self.lock:
            self.blocks.append((time_info.inputBufferAdcTime, indata[:, 0].copy()))

    @property
    def time(self) -> float:
        return self.stream.time

    def silent_after(self, t: float, timeout: float = 3.0) -> float | None:
        """Seconds from ``t`` to the first run of 8 silent samples captured after it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with self.lock:
                if self.blocks and self.blocks[-1][0] >= t + 0.25:
                    break
            time.sleep(0.02)
        with self.lock:
            blocks, self.blocks = self.blocks, []
        for t0, x in blocks:
            quiet = np.abs(x.astype(np.int32)) < 50
            for i in range(len(x) - 8):
                if t0 + i / RATE >= t - 0.005 and quiet[i : i + 8].all():
                    return t0 + i / RATE - t
        return None

    def close(self) -> None:
        self.stream.close()


def tone(seconds: float) -> np.ndarray:
    n = np.arange(int(seconds * RATE))
    return (0.5 * 32767 * np.sin(2 * np.pi * 440 * n / RATE)).astype(np.int16)


def test_written_audio_plays_gap_free_on_the_monitor(pulse) -> None:
    """Odd, varying chunks come out of the sink as one piece: the samples line up with
    what was written, both halves at the same lag, no silence inside."""
    src = speech_like(2.0, RATE, seed=7, level=0.4) | 1  # odd samples: never exactly 0
    rng = np.random.default_rng(11)
    with pulse.record_speaker(RATE) as rec, speaker() as pb:
        time.sleep(0.2)  # past the stream's start
        u0 = pb.status_flags
        i = 0
        while i < len(src):
            n = int(rng.integers(7, 2001))
            pb.write(src[i : i + n])
            i += n
        assert wait_for(lambda: pb.buffer.played_samples >= len(src), 10)
        time.sleep(0.4)
        got = rec.stop()
    lag, ncc = best_alignment(src, got)
    segment = got[lag : lag + len(src)]
    gaps, underflows = silent_runs(segment, min_len=24), pb.status_flags - u0
    # Silence inside the utterance only where the server counted an underflow (the write
    # callback came late on a loaded machine: a gap, the rest shifted, nothing lost).
    assert gaps <= underflows, f"{gaps} gaps, {underflows} underflows"
    if underflows:
        # The stream paused for a late callback (CPU contention): the samples around it no
        # longer line up with one lag, so the sample comparison says nothing. Reported.
        pytest.skip(f"{underflows} server underflow(s) (CPU contention): rerun alone")
    assert ncc >= 0.95, f"ncc {ncc:.3f}"
    half = len(src) // 2
    lag1, ncc1 = best_alignment(src[:half], segment[:half])
    lag2, ncc2 = best_alignment(src[half:], segment[half:])
    assert min(ncc1, ncc2) >= 0.95 and abs(lag1 - lag2) <= 2, (ncc1, ncc2, lag1, lag2)


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "backend",
    [
        "pulse",
        pytest.param(
            "portaudio",
            marks=pytest.mark.xfail(
                strict=True, reason="what PortAudio, ALSA and the server hold plays on"
            ),
        ),
    ],
)
def test_flush_silences_the_monitor_within_30_ms(pulse, backend: str) -> None:
    """flush() -> first silent sample on the sink's monitor, five flushes, on the monitor's
    capture clock. The median must be <= 30 ms (bench/audio_flush.py: pulse ~1-7 ms;
    PortAudio 50-60 ms, so that parameter is a strict xfail: it shows the test can fail)."""
    mon = Monitor()
    delays = []
    try:
        with speaker(backend) as pb:
            time.sleep(0.3)
            for k in range(5):
                pb.write(tone(2.0))
                time.sleep(0.4 + 0.037 * k)
                t = mon.time
                pb.flush()
                delays.append(mon.silent_after(t))
    finally:
        mon.close()
    measured = [d for d in delays if d is not None]
    assert len(measured) >= 4, delays
    assert float(np.median(measured)) * 1000 <= 30, [round(d * 1000, 1) for d in measured]


@pytest.mark.timeout(120)
def test_audio_after_a_flush_plays_cleanly(pulse) -> None:
    """Three times: an utterance, a flush in the middle of it, the next utterance. Each
    next one is found whole in the recording (piece by piece, no garble, no gap), and
    nothing of the flushed remainder plays."""
    cut = speech_like(3.0, RATE, seed=2, level=0.4) | 1
    nexts = [speech_like(0.6, RATE, seed=20 + k, level=0.4) | 1 for k in range(3)]
    with pulse.record_speaker(RATE) as rec, speaker() as pb:
        for nxt in nexts:
            pb.write(cut)
            assert wait_for(lambda: pb.buffer.played_samples > RATE // 2, 5)
            pb.flush()
            time.sleep(0.2)
            start = pb.buffer.played_samples
            pb.write(nxt)
            assert wait_for(lambda s=start, n=nxt: pb.buffer.played_samples >= s + len(n), 5)
            time.sleep(0.3)
        time.sleep(0.3)
        got = rec.stop()
    for k, nxt in enumerate(nexts):
        lag, ncc = best_alignment(nxt, got)
        pieces = chunk_correlations(nxt, got[lag : lag + len(nxt)], chunk=2400, search=48)
        # Garble spoils every piece; a server underflow (CPU contention, counted) one or two.
        bad = int((pieces < 0.9).sum())
        assert bad <= min(2, pb.status_flags), (k, ncc, pieces.round(2), pb.status_flags)
        assert ncc >= (0.95 if not bad else 0.7), (k, ncc, pieces.round(2))
        assert silent_runs(got[lag : lag + len(nxt)], min_len=24) <= pb.status_flags
    # Each cut utterance played ~0.5 s (plus what was in flight), never its 3 s.
    loud = float((np.abs(got.astype(np.int32)) > 0).sum()) / RATE
    assert loud < 3 * (0.5 + 0.25) + 3 * 0.6 + 0.3, f"{loud:.2f} s played"


@pytest.mark.timeout(120)
def test_echo_tap_sees_every_block_at_device_pace(pulse) -> None:
    """tap_playback on the pulse backend: every block handed to the server, block-sized,
    the written audio in it sample for sample, and the tap keeps the pace of what plays
    across flushes (the server drops audio the tap saw; the silence refilling it is not
    shown again, else the echo canceller's far end would run ahead by ~60 ms a flush)."""
    taps: list[np.ndarray] = []
    t_taps: list[float] = []
    with speaker() as pb:
        tap_playback(  # the block is the device's: kept as a copy
            pb, lambda x, rate: (taps.append(x.copy()), t_taps.append(time.monotonic()))
        )
        assert wait_for(lambda: len(taps) > 10, 5)
        src = speech_like(1.0, RATE, seed=5, level=0.4) | 1
        pb.write(src)
        assert wait_for(lambda: pb.buffer.played_samples >= len(src), 5)
        stream = np.concatenate(taps)
        lag, _ = best_alignment(src, stream)
        assert np.array_equal(stream[lag : lag + len(src)], src), "the tap saw other samples"
        assert {len(x) for x in taps} == {pb.block}
        # Pace: tapped samples against the time they took, across 6 flushes.
        n_before, t_before, u_before = len(taps), t_taps[-1], pb.status_flags
        for _ in range(6):
            pb.write(tone(0.5))
            time.sleep(0.2)
            pb.flush()
        time.sleep(0.3)
        tapped_s = (len(taps) - n_before) * pb.block / RATE
        elapsed = t_taps[-1] - t_before
    assert pb.flushes == 6
    # Without the refill rule: 6 x 60 ms = 360 ms ahead (measured +335 ms).
    ahead_ms = (tapped_s - elapsed) * 1000
    assert ahead_ms <= 120, f"tap {tapped_s:.3f} s in {elapsed:.3f} s"
    # Behind only by server underflows (the stream waited for a late callback; AEC3 then
    # re-converges, docs/audio-quality.md): none counted, then within 120 ms.
    assert ahead_ms >= -120 or pb.status_flags > u_before, f"{ahead_ms:.0f} ms behind"


def test_auto_picks_pulse_with_a_server_and_portaudio_without(pulse) -> None:
    pb = open_playback(settings(), "auto")
    try:
        assert isinstance(pb, PulsePlayback) and pb.device_name == "speaker"
    finally:
        pb.close()
    # A sink named by its description; the PortAudio name of the server is the default.
    for spec in ("Speaker", "pulse"):
        pb = open_playback(settings(device=spec), "auto")
        try:
            assert isinstance(pb, PulsePlayback) and pb.device_name == "speaker", spec
        finally:
            pb.close()
    # No server answers (ALSA's pulse plugin still reaches the test server): PortAudio.
    pb = open_playback(settings(), "auto", server=NO_SERVER)
    try:
        assert isinstance(pb, PlaybackStream)
    finally:
        pb.close()
    # A PortAudio index is PortAudio's, server or not.
    index = str(PlaybackStream(settings()).device_index)
    pb = open_playback(settings(device=index), "auto")
    try:
        assert isinstance(pb, PlaybackStream)
    finally:
        pb.close()


def test_pulse_without_a_server_is_one_clear_error(pulse) -> None:
    before = tasks()
    t0 = time.monotonic()
    with pytest.raises(PulseUnavailableError) as e:
        open_playback(settings(), "pulse", server=NO_SERVER)
    assert time.monotonic() - t0 < 3
    text = str(e.value)
    assert "speaker_backend 'pulse'" in text and "no PulseAudio server answers" in text
    assert "'portaudio'" in text and "\n" not in text
    assert not tasks() - before, "a failed connection left its mainloop thread"


def test_pulse_with_an_unknown_sink_lists_the_sinks(pulse) -> None:
    with pytest.raises(DeviceNotFoundError) as e:
        open_playback(settings(device="no-such-speaker"), "pulse")
    assert "no-such-speaker" in str(e.value) and "speaker (Speaker)" in str(e.value)
    with pytest.raises(ValueError, match="auto, pulse, portaudio"):
        open_playback(settings(), "alsa")


def test_match_sink_rules() -> None:
    sinks = [("speaker", "Speaker"), ("alsa_output.usb-X", "USB Audio Analog Stereo")]
    assert match_sink("", sinks) is None and match_sink("default", sinks) is None
    assert match_sink("speaker", sinks) == "speaker"
    assert match_sink("usb audio", sinks) == "alsa_output.usb-X"
    with pytest.raises(LookupError, match="sinks: speaker"):
        match_sink("hw:1,0", sinks)


def test_close_leaves_no_thread(pulse) -> None:
    before = tasks()
    pb = open_playback(settings(), "pulse")
    pb.start()
    pb.write(tone(0.3))
    time.sleep(0.2)
    started = tasks() - before
    assert len(started) == 1  # libpulse's mainloop thread
    assert pb.active
    pb.flush()
    pb.close()
    assert not started & tasks()
    assert not pb.active
    pb.flush()  # after close: drops the queue, touches nothing freed


@pytest.mark.timeout(60)
def test_a_server_that_goes_away_makes_the_stream_inactive(pulse) -> None:
    """What audio_io's watchdog relies on: the stream says it is no longer active when its
    server dies, and close() still returns and joins the thread."""
    from test.harness.pulse import PulseServer

    other = PulseServer()
    before = tasks()
    try:
        pb = PulsePlayback(settings(), server=f"unix:{other.socket}")
        pb.start()
        pb.write(tone(5.0))
        assert wait_for(lambda: pb.buffer.played_samples > RATE // 5, 5)
        assert pb.active
    finally:
        other.close()
    assert wait_for(lambda: not pb.active, 5)
    pb.flush()  # a flush on a dead stream only empties the queue
    assert pb.buffer.queued_samples == 0
    pb.close()
    assert not tasks() - before


def test_a_bad_latency_is_one_clear_error() -> None:
    with pytest.raises(ValueError, match="latency 'soon': 'low', 'high' or seconds"):
        PulsePlayback(settings(latency="soon"))
