"""Echo cancellation: the pure EchoCanceller on synthetic echo, then audio_io on the
virtual devices with the speaker's monitor routed (delayed, attenuated) into the mic.

About the speaker's device settings: these tests run audio_io with a 100 ms output latency
and 20 ms blocks (``DEVICE``), not its 15 ms / 5 ms defaults. On this shared 2-core machine
the defaults underflow 10-120 times per run (the PortAudio callback comes late and the
device plays silence the echo canceller never sees): each underflow shifts the real echo
path against the far-end reference and AEC3 must re-converge, leaking echo (residual up to
-23 dBFS, enough for a false barge-in) and suppressing double talk (person correlation
0.1-0.6 per 250 ms). Measured with the defaults: residual from -25 to -78 dBFS across runs;
with ``DEVICE``: no underflow, -66 to -78 dBFS in every run. What is tested is the canceller
with a speaker that plays what it was given; robust far-end timing under underflows (DAC
timestamps) is a separate matter of audio_io/echo.py.

About the near-end comparison: WebRTC's APM always high-passes when AEC is on, and its
filter's phase shift alone brings the waveform correlation of our bass-heavy synthetic
speech with its source to ~0.6 (measured; echo or not). So the person's speech is compared
with its source passed through the same APM without any echo: what the robot would hear
if it were silent. That isolates what the echo canceller does to the person's voice.
"""

from __future__ import annotations

import subprocess
import threading
import time
import warnings

import numpy as np
import pytest
import soxr
from rclpy.parameter import Parameter
from std_msgs.msg import UInt8MultiArray

from sonic_voice.audio.echo import EchoCanceller
from sonic_voice.nodes.audio_io import AudioIONode
from sonic_voice.ros.topics import AUDIO_QOS, MIC_TOPIC, OUT_TOPIC, msg_pcm, pcm_msg

from test.harness.ros import wait_for
from test.harness.signals import best_alignment, chunk_correlations, speech_like

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


@pytest.mark.parametrize("far_rate", [24000, 22050])
def test_a_far_end_at_the_speakers_rate_is_cancelled(far_rate: int) -> None:
    """The speaker plays Nova Sonic's 24 kHz: its blocks go to the APM at 24 kHz (the APM
    converts its reference itself); a rate whose 10 ms is not whole samples (22.05 kHz) is
    resampled here first. Either way the echo is cancelled and the person kept."""
    far = np.concatenate(
        [speech_like(6.0, far_rate, seed=3, level=0.4), np.zeros(4 * far_rate, np.int16)]
    )
    far16 = soxr.resample(far, far_rate, R).astype(np.int16)
    near = speech_like(3.0, R, seed=9, level=0.3)
    start = int(4.5 * R)
    person = np.zeros(len(far16))
    person[start : start + len(near)] = near
    d = int(0.07 * R)
    echo = np.zeros(len(far16))
    echo[d:] = 0.3 * far16[:-d]
    mic = np.clip(echo + person, -32768, 32767).astype(np.int16)
    ec = EchoCanceller(R)
    step = far_rate * 32 // 1000  # 32 ms of the speaker per 32 ms of microphone
    out = []
    for k, i in enumerate(range(0, len(mic) - 511, 512)):
        ec.process_far(far[k * step : (k + 1) * step], far_rate)
        out.append(ec.process_near(mic[i : i + 512]))
    out = np.concatenate(out)
    window = slice(2 * R, 4 * R)
    erle = db(mic[window]) - db(out[window])
    assert erle >= 20, f"ERLE {erle:.1f} dB"
    ref = through_apm(person.astype(np.int16))
    _, ncc = best_alignment(ref[start : start + len(near)], out[start - R :])
    assert ncc >= 0.8, f"person vs source {ncc:.3f}"
    assert abs(ec.far_samples - len(out)) <= 2 * 512 and ec.far_dropped == 0
    assert set(ec._far_bufs) == ({far_rate} if far_rate % 100 == 0 else {R})


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


def test_direct_apm_calls_are_livekits_own_path_bit_for_bit() -> None:
    """echo.py's _DirectApmCalls (livekit's FFI entry point with a request serialized once)
    gives exactly what livekit's public process_stream/process_reverse_stream give, frame
    for frame, through echo, double talk and silence; and it is in use (a livekit upgrade
    that changes its internals fails here instead of silently slowing the mic path)."""
    far = np.concatenate([speech_like(2.0, R, seed=4, level=0.4), np.zeros(R, np.int16)])
    person = np.zeros(len(far))
    person[R : R + R] = speech_like(1.0, R, seed=8, level=0.3)
    echo = np.zeros(len(far))
    echo[1100:] = 0.3 * far[:-1100]
    mic = np.clip(echo + person, -32768, 32767).astype(np.int16)
    far24 = soxr.resample(far, R, 24000).astype(np.int16)  # the speaker's own rate too
    direct, public = EchoCanceller(R), EchoCanceller(R)
    assert direct._calls is not None
    public._calls = None
    outs: dict[str, list[np.ndarray]] = {"direct": [], "public": []}
    for k, i in enumerate(range(0, len(mic) - 511, 512)):
        for name, ec in (("direct", direct), ("public", public)):
            if k < 40:
                ec.process_far(far[i : i + 512])
            else:
                ec.process_far(far24[k * 768 : (k + 1) * 768], 24000)
            outs[name].append(ec.process_near(mic[i : i + 512]))
    got, want = np.concatenate(outs["direct"]), np.concatenate(outs["public"])
    assert len(got) == len(want) and np.array_equal(got, want)
    assert db(mic[R // 2 : R]) - db(got[R // 2 : R]) > 10  # and it did cancel echo


def _play_into_mic(pulse, samples: np.ndarray, rate: int) -> subprocess.Popen:
    """The person's speech into the virtual microphone from a deep (300 ms) client buffer:
    a shallow one starves under load and PulseAudio fills the holes with silence (5-70 ms
    measured), which alone took the person's correlation to 0.36-0.50."""
    return pulse.play_into_mic(samples, rate, latency_ms=300)


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


# See the module docstring: a speaker that does not underflow on a loaded test machine.
DEVICE = [Parameter("latency", value="0.1"), Parameter("output_block_ms", value=20.0)]


def _echo_run(
    pulse, graph, echo_cancel: bool, robot: np.ndarray, person: np.ndarray, attempt: int = 0
):
    """Robot speech on audio/out; 4.2 s in, the person starts talking into the mic. Returns
    (audio/mic, index where audio/out was published, index where the person started,
    speaker underflows)."""
    tag = f"{'on' if echo_cancel else 'off'}{attempt}"
    listener = MicListener(graph, f"echo_mic_listener_{tag}")
    node = AudioIONode(
        context=graph.context,
        parameter_overrides=[Parameter("echo_cancel", value=echo_cancel), *DEVICE],
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
    player = _play_into_mic(pulse, person, R)
    player.wait(20)
    time.sleep(1.0)
    got = listener.audio()
    underflows = node.playback.status_flags if node.playback is not None else -1
    node.shutdown_resources()
    return got, i_out, i_person, underflows


def test_audio_io_cancels_the_robots_own_voice(pulse, ros_graph) -> None:
    robot = speech_like(5.0, 24000, seed=12, level=0.4)  # plays 0..5 s
    person = speech_like(3.0, R, seed=13, level=0.3)  # starts at ~4.2 s: ~1 s double talk
    module = pulse.echo_path(delay_ms=60, gain_db=-10.0)
    try:
        off, o0, p0, _ = _echo_run(pulse, ros_graph, False, robot, person)
        # An underflow plays silence the canceller never sees (the machine's CPU, not the
        # code under test; see the module docstring): measure again, up to 3 times, and
        # judge the canceller on a run whose speaker played what it was given.
        for attempt in range(3):
            on, o1, p1, underflows = _echo_run(pulse, ros_graph, True, robot, person, attempt)
            if underflows == 0:
                break
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
    assert erle >= 20, (
        f"ERLE {erle:.1f} dB (echo {db(w_off):.1f} -> {db(w_on):.1f} dB re 1 LSB); "
        f"speaker underflows {underflows}"
    )
    ref = through_apm(np.concatenate([np.zeros(R // 2, np.int16), person]))[R // 2 :]
    _, ncc = best_alignment(ref[: len(person) - R // 2], on[p1:])
    pieces = chunk_correlations(ref[: len(person) - R // 2], on[p1:], R // 4, R // 10)
    assert ncc >= 0.8, (
        f"the person's speech vs its source: ncc {ncc:.3f}; per 250 ms {np.round(pieces, 2)}; "
        f"speaker underflows {underflows}"
    )


# -- the robot's own voice and the Nova Sonic stand-in's barge-in detector ----------------
ANSWER = (
    "Welcome to the museum. The dinosaur hall is on the ground floor, to your left, and the "
    "space gallery is upstairs, next to the cafe. Guided tours start every hour."
)
BARGE_SCENARIO = {
    "turns": [
        {"on": "text", "say": ANSWER, "audio": {"espeak": {}}},
        {"on": "text", "say": ANSWER, "audio": {"espeak": {}}},
    ]
}


def loudest_dbfs(pcm: np.ndarray, frame: int = R // 100) -> float:
    """Level of the loudest 10 ms of ``pcm`` (what the stand-in's energy VAD looks at)."""
    n = len(pcm) // frame
    if not n:
        return float("-inf")
    x = pcm[: n * frame].astype(np.float64).reshape(n, frame)
    return float(20 * np.log10(np.sqrt((x**2).mean(axis=1)).max() / 32768 + 1e-12))


class SessionProbe:
    """Publishes text_input; records state and transcripts (what the session says)."""

    def __init__(self, graph, name: str) -> None:
        from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy
        from std_msgs.msg import String

        from sonic_voice.ros.topics import EVENT_QOS

        self.node = graph.node(name)
        self.lock = threading.Lock()
        self.states: list[str] = []
        self.node.create_subscription(
            String,
            "state",
            self._on_state,
            QoSProfile(
                depth=100,
                reliability=ReliabilityPolicy.RELIABLE,
                durability=DurabilityPolicy.TRANSIENT_LOCAL,
            ),
        )
        self.text = self.node.create_publisher(String, "text_input", EVENT_QOS)
        self._string = String

    def _on_state(self, msg) -> None:
        import json

        with self.lock:
            self.states.append(json.loads(msg.data)["state"])

    def say(self, text: str) -> None:
        self.text.publish(self._string(data=text))


def _robot_answers(pulse, graph, emu, echo_cancel: bool, tag: str):
    """audio_io (echo_cancel as given) + sonic_session on the graph; a typed question makes
    the stand-in speak ANSWER (espeak, paced in real time); the robot plays it on the
    speaker, whose monitor reaches the mic through ``pulse.echo_path``. Returns the stand-in's
    stream record once the answer is over (played out, echo tail included), the speaker
    recording, and the nodes."""
    from sonic_voice.nodes.sonic_session import SonicSessionNode

    speaker = AudioIONode(
        context=graph.context,
        parameter_overrides=[Parameter("echo_cancel", value=echo_cancel), *DEVICE],
    )
    graph.add(speaker)
    assert (speaker.echo is not None) == echo_cancel and speaker.playback is not None
    probe = SessionProbe(graph, f"barge_probe_{tag}")
    session = SonicSessionNode(
        context=graph.context,
        parameter_overrides=[
            Parameter("endpoint_uri", value=emu.endpoint_uri),
            Parameter("ca_bundle", value=emu.ca_file),
            Parameter("always_on", value=True),
        ],
    )
    graph.add(session)
    assert wait_for(lambda: probe.text.get_subscription_count() > 0, 20)
    assert wait_for(lambda: "listening" in probe.states, 20), probe.states
    assert emu.wait_for(lambda: emu.records and emu.records[0].audio_started, 20)
    rec = emu.records[0]
    buf = speaker.playback.buffer
    with pulse.record_speaker(R) as room:
        probe.say("What is there to see here?")
        assert emu.wait_for(lambda: rec.turns_fired, 20)
        # The answer plays out (or is cut by a barge-in): the stand-in ends the turn...
        assert emu.wait_for(lambda: "completionEnd" in rec.output_names, 40), rec.output_names
        # ...audio_io plays what it queued, and the echo of the last words comes back.
        assert wait_for(lambda: buf.queued_samples == 0, 20)
        time.sleep(1.5)
        heard = room.stop()
    return rec, heard, speaker, session, probe


@pytest.fixture
def stand_in(monkeypatch):
    """The Bedrock stand-in (real SDK, HTTP/2, SigV4) with BARGE_SCENARIO, paced in real
    time; its test keys in the environment. Requested before ``ros_graph`` so the graph
    (and the session's polite close) is torn down while the stand-in still listens."""
    from sonic_voice.emulators.sonic import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, EmulatorThread
    from sonic_voice.sonic import transport

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DEFAULT_SECRET_KEY)
    monkeypatch.setattr(transport, "_RESOLVERS", {})
    emu = EmulatorThread(scenario=BARGE_SCENARIO, realtime=True).start()
    try:
        yield emu
    finally:
        emu.stop()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("echo_cancel", [True, False], ids=["aec-on", "aec-off"])
def test_stand_in_hears_no_barge_in_from_the_robots_own_voice(
    pulse, stand_in, ros_graph, echo_cancel: bool
) -> None:
    """The robot's speaker is next to its microphone (speaker monitor -> mic, -10 dB,
    ~60 ms). The Nova Sonic stand-in speaks a long answer, sonic_session publishes it,
    audio_io plays it, its echo reaches audio/mic and sonic_session streams the mic to the
    stand-in, whose barge-in detector (energy VAD, -35 dBFS for 60 ms) listens all along.

    AEC on: no barge-in and no phantom utterance: the answer ends normally. AEC off (the
    control that shows the test can fail): the robot interrupts itself. Then, AEC on, a
    person who talks over the second answer still barges in: the canceller removed the
    robot's voice, not the microphone."""
    from sonic_voice.emulators.sonic import EmulatorThread

    from test.harness.ros import RosGraph

    emu, graph = stand_in, ros_graph
    extra: list = []  # the graphs and stand-ins of re-measured runs, closed at the end
    module = pulse.echo_path(delay_ms=60, gain_db=-10.0)
    try:
        runs: list[str] = []
        for attempt in range(3):
            tag = f"{'on' if echo_cancel else 'off'}{attempt}"
            rec, heard, speaker, _session, probe = _robot_answers(
                pulse, graph, emu, echo_cancel, tag
            )
            answer_s = rec.audio_out_bytes / 2 / 24000
            played_s = np.count_nonzero(np.abs(heard) > 300) / R
            # What reached the stand-in while it spoke: the mic, echo included (or not).
            mic = np.frombuffer(bytes(rec.pcm), "<i2")
            underflows = speaker.playback.status_flags
            seen = (
                f"{tag}: barge-ins {rec.barge_ins}, utterances {rec.utterances}, answer "
                f"{answer_s:.1f} s, speaker loud {played_s:.1f} s, loudest 10 ms at the "
                f"stand-in {loudest_dbfs(mic):.1f} dBFS (its VAD: -35 dBFS for 60 ms), "
                f"speaker underflows {underflows}"
            )
            print("\n" + seen)
            runs.append(seen)
            # An underflow plays silence the canceller never sees (the loaded machine's
            # CPU, not the code under test; see the module docstring), and AEC3 leaks
            # while it re-converges: such a run does not judge the canceller. Report it
            # and measure again on a fresh graph and stand-in (up to 3 runs; if every run
            # underflowed, the test is skipped with the figures, not failed or passed).
            if not (echo_cancel and underflows and (rec.barge_ins or rec.utterances)):
                break
            if attempt == 2:
                speaker.shutdown_resources()
                pytest.skip(
                    "the speaker underflowed in every run (the machine could not play in "
                    "real time), so the canceller could not be judged: " + "; ".join(runs)
                )
            speaker.shutdown_resources()
            warnings.warn(f"re-measured after speaker underflows: {seen}", stacklevel=1)
            graph = RosGraph()
            emu = EmulatorThread(scenario=BARGE_SCENARIO, realtime=True).start()
            extra.append((graph, emu))
        seen = "; ".join(runs)
        if echo_cancel:
            assert rec.barge_ins == 0, f"the robot barged in on itself: {seen}"
            assert rec.utterances == 0, f"the stand-in heard an utterance in the echo: {seen}"
            assert answer_s > 6.0, answer_s  # a long answer was sent...
            assert played_s > 0.5 * answer_s, (played_s, answer_s)  # ...and played out
            ends = [e for e in rec.output_names if e == "completionEnd"]
            assert len(ends) == 1
            # A person who talks over the second answer is heard.
            before = len(rec.output_names)
            probe.say("And the cafe?")
            assert emu.wait_for(lambda: len(rec.turns_fired) == 2, 20)
            assert emu.wait_for(
                lambda: "contentStart" in rec.output_names[before:] and rec.audio_out_bytes,
                20,
            )
            time.sleep(2.0)  # well into the answer (and past AEC3's first adaptation)
            _play_into_mic(pulse, speech_like(1.5, R, seed=31, level=0.3), R).wait(20)
            assert emu.wait_for(lambda: rec.barge_ins == 1, 20), rec.barge_ins
        else:
            # The control: without AEC the echo is loud enough to barge in.
            assert rec.barge_ins >= 1, "no barge-in without AEC: the test proves nothing"
        speaker.shutdown_resources()
    finally:
        pulse.remove_echo_path(module)
        for g, e in reversed(extra):
            g.close()
            e.stop()
