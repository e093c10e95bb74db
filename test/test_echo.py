"""Echo cancellation: the pure EchoCanceller on synthetic echo, then audio_io on the
virtual devices with the speaker's monitor routed (delayed, attenuated) into the mic.

About the near-end comparison: WebRTC's APM always high-passes when AEC is on, and its
filter's phase shift alone brings the waveform correlation of our bass-heavy synthetic
speech with its source to ~0.6 (measured; echo or not). So the person's speech is compared
with its source passed through the same APM without any echo: what the robot would hear
if it were silent. That isolates what the echo canceller does to the person's voice.
"""

from __future__ import annotations

import threading
import time

import numpy as np
import soxr
from rclpy.parameter import Parameter
from std_msgs.msg import UInt8MultiArray

from sonic_voice.audio.echo import EchoCanceller
from sonic_voice.nodes.audio_io import AudioIONode
from sonic_voice.nodes.common import AUDIO_QOS, MIC_TOPIC, OUT_TOPIC, msg_pcm, pcm_msg

from test.harness.ros import wait_for
from test.harness.signals import best_alignment, speech_like

R = 16000


def db(x: np.ndarray) -> float:
    return 10 * np.log10(np.mean(x.astype(np.float64) ** 2) + 1e-9)


def through_apm(x: np.ndarray, rate: int = R, block: int = 512) -> np.ndarray:
    """``x`` as the APM (NS + HPF, no echo) would deliver it: the near-end reference."""
    ec = EchoCanceller(rate, echo_cancellation=False)
    n = len(x) // block * block
    return np.concatenate([ec.process_near(x[i : i + block]) for i in range(0, n, block)])


def test_echo_canceller_removes_synthetic_echo_and_keeps_the_person() -> None:
    far = np.concatenate([speech_like(6.0, R, seed=3, level=0.4), np.zeros(4 * R, np.int16)])
    near = speech_like(3.0, R, seed=9, level=0.3)
    start = int(4.5 * R)  # 1.5 s of double talk, then the person alone
    person = np.zeros(len(far))
    person[start : start + len(near)] = near
    d = int(0.07 * R)
    echo = np.zeros(len(far))
    echo[d:] = 0.3 * far[:-d]
    echo[d + 37 :] += 0.1 * far[: -d - 37]  # a second reflection
    mic = np.clip(echo + person, -32768, 32767).astype(np.int16)
    ec = EchoCanceller(R)
    out = []
    for i in range(0, len(mic) - 511, 512):
        ec.process_far(far[i : i + 512])  # what the speaker plays, as it plays
        out.append(ec.process_near(mic[i : i + 512]))
    out = np.concatenate(out)
    window = slice(2 * R, 4 * R)  # echo only, after convergence
    erle = db(mic[window]) - db(out[window])
    assert erle >= 20, f"ERLE {erle:.1f} dB"
    ref = through_apm(person.astype(np.int16))
    _, ncc = best_alignment(ref[start : start + len(near)], out[start - R :])
    assert ncc >= 0.8, f"person vs source {ncc:.3f}"
    assert ec.far_samples >= len(mic) - 1024 and ec.far_dropped == 0


def test_far_end_queue_is_bounded_and_rates_are_checked() -> None:
    ec = EchoCanceller(R, max_far_queue_s=0.5)
    for _ in range(100):
        ec.process_far(np.ones(480, np.int16), 48000)  # resampled to 16 kHz, 160 each
    assert ec.far_dropped > 0
    try:
        EchoCanceller(22050)
    except ValueError as e:
        assert "22050" in str(e)
    else:
        raise AssertionError("22050 Hz accepted")


class MicListener:
    def __init__(self, graph, name: str) -> None:
        self.node = graph.node(name)
        self.blocks: list[np.ndarray] = []
        self.lock = threading.Lock()
        self.node.create_subscription(UInt8MultiArray, MIC_TOPIC, self._on, AUDIO_QOS)

    def _on(self, msg: UInt8MultiArray) -> None:
        with self.lock:
            self.blocks.append(msg_pcm(msg).copy())

    def audio(self) -> np.ndarray:
        with self.lock:
            return np.concatenate(self.blocks) if self.blocks else np.zeros(0, np.int16)


def _echo_run(pulse, graph, echo_cancel: bool, robot: np.ndarray, person: np.ndarray):
    """Robot speech on audio/out; 4.2 s in, the person starts talking into the mic. Returns
    (audio/mic, index where audio/out was published, index where the person started)."""
    tag = "on" if echo_cancel else "off"
    listener = MicListener(graph, f"echo_mic_listener_{tag}")
    node = AudioIONode(
        context=graph.context,
        parameter_overrides=[Parameter("echo_cancel", value=echo_cancel)],
    )
    graph.add(node)
    assert (node.echo is not None) == echo_cancel
    pub = graph.node(f"echo_speaker_feeder_{tag}").create_publisher(
        UInt8MultiArray, OUT_TOPIC, AUDIO_QOS
    )
    assert wait_for(lambda: pub.get_subscription_count() > 0, 10)
    assert wait_for(lambda: len(listener.blocks) > 10, 10)
    i_out = len(listener.audio())
    pub.publish(pcm_msg(robot))
    time.sleep(4.2)
    i_person = len(listener.audio())
    player = pulse.play_into_mic(person, R)
    player.wait(20)
    time.sleep(1.0)
    got = listener.audio()
    node.shutdown_resources()
    return got, i_out, i_person


def test_audio_io_cancels_the_robots_own_voice(pulse, ros_graph) -> None:
    robot = speech_like(5.0, 24000, seed=12, level=0.4)  # plays 0..5 s
    person = speech_like(3.0, R, seed=13, level=0.3)  # starts at ~4.2 s: ~1 s double talk
    module = pulse.echo_path(delay_ms=60, gain_db=-10.0)
    try:
        off, o0, p0 = _echo_run(pulse, ros_graph, False, robot, person)
        on, o1, p1 = _echo_run(pulse, ros_graph, True, robot, person)
    finally:
        pulse.remove_echo_path(module)
    # Echo only: from 1 s after the robot starts (AEC3 has converged) until the person.
    w_off = off[o0 + R : p0 - R // 5]
    w_on = on[o1 + R : p1 - R // 5]
    robot16 = soxr.resample(robot, 24000, R)
    _, ncc_echo = best_alignment(robot16[: 2 * R], off[o0:])
    # Without AEC the robot's voice is plainly in audio/mic (loud and recognisable).
    assert db(w_off) > db(robot16) - 20 and ncc_echo > 0.2, (db(w_off), ncc_echo)
    erle = db(w_off) - db(w_on)
    assert erle >= 20, f"ERLE {erle:.1f} dB (echo {db(w_off):.1f} -> {db(w_on):.1f} dB re 1 LSB)"
    ref = through_apm(np.concatenate([np.zeros(R // 2, np.int16), person]))[R // 2 :]
    _, ncc = best_alignment(ref[: len(person) - R // 2], on[p1:])
    assert ncc >= 0.8, f"the person's speech vs its source: ncc {ncc:.3f}"
