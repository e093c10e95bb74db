"""audio_io on real PortAudio streams through a private PulseAudio server."""

from __future__ import annotations

import threading
import time
import warnings

import numpy as np
import pytest
import soxr
from rclpy.parameter import Parameter
from std_msgs.msg import Empty, String, UInt8MultiArray

from sonic_voice.audio.devices import DeviceNotFoundError, resolve_device
from sonic_voice.nodes.audio_io import STATE_TOPIC, AudioIONode
from sonic_voice.ros.topics import (
    AUDIO_QOS,
    EVENT_QOS,
    FLUSH_TOPIC,
    LATCHED_QOS,
    MIC_TOPIC,
    OUT_TOPIC,
    msg_pcm,
    pcm_msg,
)

from test.harness.ros import wait_for
from test.harness.signals import (
    best_alignment,
    chunk_correlations,
    silence,
    silent_runs,
    speech_like,
)


class MicListener:
    def __init__(self, graph) -> None:
        self.node = graph.node("mic_listener")
        self.blocks: list[np.ndarray] = []
        self.lock = threading.Lock()
        self.node.create_subscription(UInt8MultiArray, MIC_TOPIC, self._on, AUDIO_QOS)

    def _on(self, msg: UInt8MultiArray) -> None:
        with self.lock:
            self.blocks.append(msg_pcm(msg).copy())

    def audio(self) -> np.ndarray:
        with self.lock:
            return np.concatenate(self.blocks) if self.blocks else np.zeros(0, np.int16)


def make_node(graph, **params) -> AudioIONode:
    overrides = [Parameter(k, value=v) for k, v in params.items()]
    node = AudioIONode(context=graph.context, parameter_overrides=overrides)
    graph.add(node)
    return node


@pytest.mark.parametrize("device_rate", [0, 44100], ids=["device-at-16k", "device-at-44k1"])
def test_mic_reaches_audio_mic_resampled(pulse, ros_graph, device_rate: int) -> None:
    """A known signal played into the virtual mic arrives on audio/mic at 16 kHz."""
    listener = MicListener(ros_graph)
    node = make_node(ros_graph, enable_output=False, input_device_rate=device_rate)
    assert node.capture is not None and node.capture.device_rate == (device_rate or 16000)
    src_rate = 48000
    src = speech_like(2.0, src_rate, seed=5)
    wait_for(lambda: len(listener.blocks) > 5, 10)
    player = pulse.play_into_mic(
        np.concatenate([silence(0.3, src_rate), src, silence(0.5, src_rate)]), src_rate
    )
    player.wait(15)
    assert wait_for(lambda: len(listener.audio()) > 16000 * 3, 10)
    time.sleep(0.3)
    got = listener.audio()
    # Every block is 32 ms at 16 kHz.
    assert {len(b) for b in listener.blocks} == {512}
    expected = soxr.resample(src, src_rate, 16000)
    lag, ncc = best_alignment(expected, got)
    # Whole signal, and piece by piece: PulseAudio on a loaded machine may drop a few ms of
    # capture (an xrun, counted in the stream's status flags); that costs one 100 ms piece,
    # while a bug in our capture/resampling/publishing path spoils many.
    pieces = chunk_correlations(expected, got, chunk=1600, search=800)
    good = float(np.mean(pieces >= 0.9))
    flags = node.capture.status_flags
    assert ncc >= 0.9 or (ncc >= 0.8 and good >= 0.9), (
        f"ncc {ncc:.3f} at lag {lag}; {good:.0%} of 100 ms pieces >= 0.9; xruns {flags}"
    )


def test_out_plays_continuously_from_odd_chunks(pulse, ros_graph) -> None:
    """A 24 kHz utterance in odd, varying chunks plays without inserted silence."""
    node = make_node(ros_graph, enable_input=False)
    assert node.playback is not None
    pub_node = ros_graph.node("speaker_feeder")
    pub = pub_node.create_publisher(UInt8MultiArray, OUT_TOPIC, AUDIO_QOS)
    assert wait_for(lambda: pub.get_subscription_count() > 0, 10)
    rate = 24000
    src = speech_like(2.0, rate, seed=7, level=0.4) | 1  # odd samples: never exactly 0
    rng = np.random.default_rng(11)
    with pulse.record_speaker(rate) as rec:
        i = 0
        while i < len(src):
            n = int(rng.integers(7, 2001))
            pub.publish(pcm_msg(src[i : i + n]))
            i += n
        assert wait_for(lambda: node.playback.buffer.played_samples >= len(src), 10)
        time.sleep(0.4)
        got = rec.stop()
    lag, ncc = best_alignment(src, got)
    assert ncc >= 0.95, f"ncc {ncc:.3f}"
    segment = got[lag : lag + len(src)]
    # Each half on its own lines up at the same lag: nothing was inserted in between.
    half = len(src) // 2
    _, ncc1 = best_alignment(src[:half], segment[:half])
    _, ncc2 = best_alignment(src[half:], segment[half:])
    assert min(ncc1, ncc2) >= 0.95
    # Silence inside the utterance is only ever a counted underrun (the feed fell behind the
    # device on a loaded machine: reported, not raced); the utterance's end is one more.
    gaps, underruns = silent_runs(segment), node.playback.buffer.underruns
    assert underruns >= 1, "the end of the utterance is an underrun"
    assert gaps <= underruns - 1, f"{gaps} silent gaps, {underruns - 1} underruns before the end"
    if gaps:
        warnings.warn(f"{gaps} underrun(s) inside the utterance (CPU contention?)", stacklevel=1)


@pytest.mark.parametrize("backend", ["auto", "portaudio"])
def test_flush_stops_playback_and_output_resumes(pulse, ros_graph, backend: str) -> None:
    node = make_node(ros_graph, enable_input=False, speaker_backend=backend)
    assert node.playback.backend == {"auto": "pulse"}.get(backend, backend)
    helper = ros_graph.node("flusher")
    out = helper.create_publisher(UInt8MultiArray, OUT_TOPIC, AUDIO_QOS)
    flush = helper.create_publisher(Empty, FLUSH_TOPIC, EVENT_QOS)
    assert wait_for(lambda: out.get_subscription_count() and flush.get_subscription_count(), 10)
    rate = 24000
    long_utt = speech_like(4.0, rate, seed=2, level=0.4) | 1
    with pulse.record_speaker(rate) as rec:
        out.publish(pcm_msg(long_utt))
        assert wait_for(lambda: node.playback.buffer.played_samples > rate // 2, 5)
        flush.publish(Empty())
        assert wait_for(lambda: node.playback.buffer.queued_samples == 0, 2)
        time.sleep(0.5)
        short = speech_like(0.5, rate, seed=8, level=0.4) | 1
        out.publish(pcm_msg(short))
        time.sleep(1.0)
        got = rec.stop()
    loud = np.abs(got.astype(np.int32)) > 0
    played = loud.sum() / rate
    # ~0.5 s before the flush + the 0.5 s utterance after it, far from 4.5 s.
    assert played < 1.6, f"{played:.2f} s played; the flush did not stop the utterance"
    _, ncc = best_alignment(short, got)
    assert ncc >= 0.95  # the next utterance after the flush plays in full


def test_speaker_backend_pulse_without_a_server_fails_configure(
    pulse, ros_graph, monkeypatch
) -> None:
    """speaker_backend 'pulse' where no PulseAudio server answers: configuration fails
    (the node stays unconfigured, nothing opened). With the server, 'auto' takes pulse."""
    monkeypatch.setenv("PULSE_SERVER", "unix:/nonexistent/sonic-voice-test/native")
    node = make_node(ros_graph, enable_input=False, speaker_backend="pulse")
    assert node.playback is None
    assert node._state_machine.current_state[1] == "unconfigured"
    monkeypatch.undo()  # ALSA's pulse plugin (PortAudio) must reach the test server
    node = make_node(ros_graph, enable_input=False)
    assert node.playback is not None and node.playback.backend == "pulse"


def test_missing_device_lists_devices(pulse) -> None:
    with pytest.raises(DeviceNotFoundError) as e:
        resolve_device("no-such-microphone", "input")
    assert "Devices present" in str(e.value) and "pulse" in str(e.value)


def test_node_with_missing_device_fails_configure_and_says_why(pulse, ros_graph) -> None:
    node = make_node(ros_graph, input_device="no-such-microphone", enable_output=False)
    assert node.capture is None
    assert node._state_machine.current_state[1] == "unconfigured"


def test_state_topic_reports_devices(pulse, ros_graph) -> None:
    make_node(ros_graph)
    got: list[str] = []
    n = ros_graph.node("state_listener")
    n.create_subscription(String, STATE_TOPIC, lambda m: got.append(m.data), LATCHED_QOS)
    assert wait_for(lambda: any('"lifecycle":"active"' in g for g in got), 10)
    assert '"input":"ok"' in got[-1] and '"output":"ok"' in got[-1]


def test_a_speaker_that_stops_is_closed_reported_and_reopened(pulse, ros_graph) -> None:
    """The device watchdog (on the loop with ros/bridge.py Bridge.every; closing and
    re-opening in a worker thread): the sound server stops (SIGSTOP: no more requests for
    audio, a connection attempt hangs) -> after device_timeout_s the speaker is closed and
    audio_io/state says "lost" while the loop keeps running; the server back (SIGCONT) ->
    the speaker is re-opened, "ok" again, and the server asks it for audio."""
    import json
    import signal

    states: list[dict] = []
    probe = ros_graph.node("state_probe")
    probe.create_subscription(
        String, STATE_TOPIC, lambda m: states.append(json.loads(m.data)), LATCHED_QOS
    )
    node = make_node(
        ros_graph,
        enable_input=False,
        speaker_backend="pulse",
        device_timeout_s=0.5,
        device_retry_s=0.2,
    )
    assert wait_for(lambda: states and states[-1]["output"] == "ok", 10), states[-3:]
    first = node.playback
    ticks = node._timer.ticks
    pulse.proc.send_signal(signal.SIGSTOP)
    try:
        assert wait_for(lambda: any(s["output"] == "lost" for s in states), 10), states[-3:]
        time.sleep(1.0)  # a re-open attempt hangs on the stopped server meanwhile ...
        assert node._timer.ticks >= ticks + 4  # ... and the loop's ticks go on
    finally:
        pulse.proc.send_signal(signal.SIGCONT)
    n = len(states)
    assert wait_for(
        lambda: len(states) > n + 8 and all(s["output"] == "ok" for s in states[-8:]), 20
    ), states[-8:]
    assert node.playback is not None and node.playback is not first  # a new stream
    assert node.playback.active and time.monotonic() - node.playback.last_callback < 0.5
