"""The conversation lifecycle's pure parts, in milliseconds: the VAD (speech engages;
silence, steady noise, clicks and gated audio do not), the pre-roll (hands over from a
sample, whole chunks, nothing twice), the phase machine (timer, tools, robot speech,
memory, a trigger while closing) and the cost ledger (per conversation, per hour)."""

from __future__ import annotations

import numpy as np
import pytest

from sonic_voice import contracts as c
from sonic_voice.audio.vad import VadConfig, VoiceActivity
from sonic_voice.sonic import engagement as eng

from test.harness.signals import speech_like

R = 16000


def feed(vad: VoiceActivity, x: np.ndarray, gated: bool = False) -> int | None:
    """Sample index at which speech was decided (None: never)."""
    for i in range(0, len(x) - 511, 512):
        if vad.process(x[i : i + 512], gated):
            return i + 512
    return None


def noise(seconds: float, dbfs: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal(int(seconds * R)) * 10 ** (dbfs / 20) * 32767).astype(np.int16)


@pytest.mark.parametrize("seed", [1, 2, 3, 4, 5])
def test_vad_decides_speech_within_400_ms_and_finds_its_onset(seed: int) -> None:
    x = np.concatenate([np.zeros(R, np.int16), speech_like(2.0, R, seed)])
    onset = int(np.argmax(np.abs(x) > 300))
    vad = VoiceActivity()
    at = feed(vad, x)
    assert at is not None and at - onset <= 0.4 * R, (at, onset)
    assert vad.onset_sample is not None and abs(vad.onset_sample - onset) <= 0.06 * R


@pytest.mark.parametrize(
    "sound",
    [
        np.zeros(5 * R, np.int16),
        noise(5, -60),
        np.concatenate([np.zeros(2 * R, np.int16), noise(4, -25)]),  # a fan switched on
        np.concatenate([np.zeros(2 * R, np.int16), noise(4, -10)]),
        (np.sin(2 * np.pi * 100 * np.arange(5 * R) / R) * 800).astype(np.int16),  # hum
        np.concatenate(
            [np.zeros(R, np.int16), np.full(160, 20000, np.int16), np.zeros(R, np.int16)]
        ),
    ],
    ids=["silence", "quiet-noise", "fan-on", "loud-fan-on", "hum", "click"],
)
def test_vad_ignores_silence_steady_noise_and_clicks(sound: np.ndarray) -> None:
    vad = VoiceActivity()
    assert feed(vad, sound) is None


def test_vad_is_deaf_while_gated_and_hears_after() -> None:
    x = np.concatenate([np.zeros(R, np.int16), speech_like(1.5, R, 2)])
    vad = VoiceActivity()
    assert feed(vad, x, gated=True) is None and vad.voiced_frames == 0
    assert feed(vad, np.concatenate([np.zeros(R // 2, np.int16), speech_like(1.5, R, 2)]))


def test_vad_config_is_checked() -> None:
    with pytest.raises(ValueError, match="aggressiveness"):
        VoiceActivity(VadConfig(aggressiveness=4))
    with pytest.raises(ValueError, match="vad_voiced_ms"):
        VoiceActivity(VadConfig(voiced_ms=500, window_ms=300))


def test_preroll_hands_over_from_a_sample_whole_chunks_once() -> None:
    p = eng.PreRoll(1.0, R)
    chunks = [bytes([i % 256]) * 1024 for i in range(50)]  # 512 samples each, 1.6 s
    for i, ch in enumerate(chunks):
        p.push(ch, i * 512)
    # Keeps about the last second (whole chunks).
    assert p.start >= 50 * 512 - R - 512 and p.end == 50 * 512
    got = p.take_from(45 * 512 + 100)  # a sample inside chunk 45
    assert got == chunks[45:]
    assert p.take_from(0) == []  # handed over once
    p.push(chunks[0], 50 * 512)
    assert p.take_from(p.end - 1) == [chunks[0]]


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_phases_timer_tools_and_robot_speech() -> None:
    clock = Clock()
    phases: list[str] = []
    e = eng.Engagement(eng.EngagementConfig(idle_timeout_s=10), clock, on_phase=phases.append)
    assert e.engage("speech") and e.phase == eng.ENGAGING
    assert not e.engage("service")  # already engaging
    e.opened()
    assert e.phase == eng.CONVERSING and e.trigger == "speech"
    clock.t += 9.9
    assert not e.timed_out()
    e.activity()  # the visitor spoke
    clock.t += 9.9
    assert not e.timed_out()
    e.robot_audio(5.0)  # the robot answers for 5 s: the timer starts when it stops
    clock.t += 14.9
    assert not e.timed_out()
    clock.t += 0.2
    assert e.timed_out()
    e.tool_started()  # a navigation goal: engaged however long it runs
    clock.t += 600
    assert not e.timed_out()
    e.tool_finished()
    clock.t += 9.9
    assert not e.timed_out()
    clock.t += 0.2
    assert e.timed_out()
    assert e.release() and e.phase == eng.CLOSING
    assert not e.release()
    assert e.closed([("USER", "hi"), ("ASSISTANT", "hello")]) == ""
    assert phases == [eng.ENGAGING, eng.CONVERSING, eng.CLOSING, eng.IDLE]


def test_a_trigger_while_closing_engages_once_closed() -> None:
    clock = Clock()
    e = eng.Engagement(clock=clock)
    e.engage("topic")
    e.opened()
    e.release()
    assert not e.engage("speech")  # the visitor spoke during the goodbye
    assert e.closed([]) == "speech"
    assert e.engage("speech") and e.phase == eng.ENGAGING


def test_memory_lasts_memory_s() -> None:
    clock = Clock()
    e = eng.Engagement(eng.EngagementConfig(memory_s=60), clock)
    e.engage("speech")
    e.opened()
    e.release()
    e.closed([("USER", "where is the lift"), ("ASSISTANT", "behind you")])
    clock.t += 59
    assert e.recall() == [("USER", "where is the lift"), ("ASSISTANT", "behind you")]
    clock.t += 2
    assert e.recall() == []


def test_ledger_sums_per_conversation_and_per_hour_with_prices() -> None:
    clock, wall = Clock(), Clock()
    wall.t = 3600 * 500 + 3500  # 100 s before an hour ends
    led = eng.Ledger(eng.Prices(1.0, 2.0, 0.5, 0.25), wall=wall, clock=clock)
    led.stream_opened()
    usage = {
        "details": {
            "delta": {
                "input": {"speechTokens": 1000, "textTokens": 2000},
                "output": {"speechTokens": 500, "textTokens": 4000},
            }
        }
    }
    led.usage(usage)
    clock.t += 30
    wall.t += 30
    first = led.stream_closed()
    assert first["streamed_s"] == 30 and first["input_tokens"] == 3000
    # 1*1 + 2*0.5 + 0.5*2 + 0.25*4 = 4 USD
    assert first["cost_usd"] == pytest.approx(4.0)
    # A conversation across the hour boundary: split between the two hours.
    led.stream_opened()
    clock.t += 60
    wall.t += 60
    led.usage(usage)
    clock.t += 30
    wall.t += 30
    second = led.stream_closed()
    assert second["streamed_s"] == 90
    hour = led.hour_report()
    assert hour["hour"].endswith(":00:00Z") and hour["conversations"] == 0
    assert hour["streamed_s"] == pytest.approx(20, abs=0.01)  # after the boundary
    assert led.totals["streamed_s"] == pytest.approx(120)


def test_contracts_take_the_lifecycle_fields_additively() -> None:
    old = {"state": "listening", "source": "local", "viewers": 0, "error": ""}
    assert c.check(c.STATE, old) == old  # an older publisher's message still passes
    new = {**old, "engagement": "conversing", "trigger": "speech"}
    assert c.decode(c.STATE, c.encode(c.STATE, new)) == new
    with pytest.raises(c.ContractError, match="engagement"):
        c.check(c.STATE, {**old, "engagement": "dozing"})
    led = eng.Ledger()
    c.check(c.USAGE_HOURLY, led.hour_report())
    led.stream_opened()
    figures = led.stream_closed()
    c.check(c.CONVERSATION, {"t": 1.0, "event": "released", "trigger": "speech", **figures})
    with pytest.raises(c.ContractError, match="hour"):
        c.check(c.USAGE_HOURLY, led.snapshot())
