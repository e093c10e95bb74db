"""The conversation lifecycle: how fast a visitor's first words reach a fresh stream, and
how much less is streamed in a day than with a stream open all the time.

1. **Speech onset -> first audio frame at the stand-in, on a fresh stream** (real parts:
   sonic_session on an rclpy graph spun like the product, the SDK over awscrt HTTP/2 + TLS
   + SigV4 against the Bedrock stand-in in this process). The robot is idle (no stream);
   microphone frames are published in real time (32 ms), tagged with a sequence number:
   0.6 s of quiet, then 1 s of speech-like sound, then 0.6 s of quiet. Measured from the
   publish of the first frame of speech to the arrival at the stand-in of the new
   stream's first ``audioInput`` (one clock, ``perf_counter_ns``), split into the local
   decision (onset -> the VAD engages) and the rest (stream open, pre-roll sent; the
   start-up check, ``check_on_start``, has opened one stream before, as on a robot). The
   pre-roll makes the loss 0 either way: every frame from the onset on is checked to
   arrive, once, in order. Then the conversation is released (``~/release``) and the
   next trial starts from idle.
2. **Streamed seconds per hour over a scripted day** of 20 visits (08:00-18:00; 3 to 8
   exchanges each, some with a 30-120 s navigation, some visitors coming back within a
   minute), driven through the real phase machine (``sonic_voice.sonic.engagement``) on a
   simulated clock, 0.1 s steps, with the stream-open time measured in part 1, against
   always-on (3600 s per hour). The VAD's own decisions on silence and noise are the unit
   tests' (test_engagement_unit.py); here the script says when someone speaks.

Run: ``.venv/bin/python bench/engage.py [TRIALS]`` (default 12).
"""

from __future__ import annotations

import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import figure, isolate, pct, setup_path

FRAME = 512  # 32 ms at 16 kHz
RATE = 16000


def tag(frame: Any, seq: int) -> Any:
    f = frame.astype("int16", copy=True)
    f[0], f[1] = 1 + seq % 997, 1 + seq // 997
    return f


def read_tag(f: Any) -> int | None:
    if f[0] <= 0 or f[1] <= 0:
        return None
    return (int(f[1]) - 1) * 997 + int(f[0]) - 1


# --------------------------------------------------------------------------- part 1
def onset_latency(trials: int) -> tuple[list[float], list[float], int, int, float]:
    """(onset -> first frame ms, onset -> engaged ms, frames lost, frames twice, open s)."""
    import numpy as np
    from rclpy.parameter import Parameter
    from std_msgs.msg import UInt8MultiArray
    from std_srvs.srv import Trigger

    from sonic_voice.emulators.sonic import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, EmulatorThread
    from sonic_voice.nodes.sonic_session import SonicSessionNode
    from sonic_voice.ros.topics import AUDIO_QOS, MIC_TOPIC, pcm_msg

    from test.harness.ros import RosGraph, wait_for
    from test.harness.signals import speech_like

    os.environ["AWS_ACCESS_KEY_ID"] = DEFAULT_ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = DEFAULT_SECRET_KEY
    emu = EmulatorThread(scenario={"turns": []}, realtime=False).start()
    graph = RosGraph(executor="single")
    first_ms: list[float] = []
    decide_ms: list[float] = []
    lost = twice = 0
    opens: list[float] = []
    request_ms: list[float] = []
    try:
        node = SonicSessionNode(
            context=graph.context,
            parameter_overrides=[
                Parameter("endpoint_uri", value=emu.endpoint_uri),
                Parameter("ca_bundle", value=emu.ca_file),
                # As on a robot: the start-up check opens (and closes) one stream first,
                # so the SDK client and credentials are warm for the first visitor.
                Parameter("check_on_start", value=True),
                Parameter("memory_s", value=0.0),
                Parameter("idle_timeout_s", value=600.0),
            ],
        )
        graph.add(node)
        bench = graph.node("engage_bench")
        mic = bench.create_publisher(UInt8MultiArray, MIC_TOPIC, AUDIO_QOS)
        release = bench.create_client(Trigger, "/sonic_session/release")
        if not wait_for(lambda: mic.get_subscription_count() > 0 and node._active, 30):
            raise SystemExit("sonic_session did not come up")
        if not emu.wait_for(lambda: emu.records and emu.records[0].end_reason, 30):
            raise SystemExit("the start-up check did not run")
        engaged_at: list[int] = []
        engage = node.conversation.engage  # every trigger, speech included, goes through it

        def stamp_engage(trigger: str) -> None:
            if node.eng.phase == "idle":
                engaged_at.append(time.perf_counter_ns())
            engage(trigger)

        node.conversation.engage = stamp_engage
        seq = 0
        for trial in range(trials):
            quiet = np.zeros(int(0.6 * RATE), np.int16)
            audio = np.concatenate([quiet, speech_like(1.0, RATE, 10 + trial), quiet])
            frames = [audio[i : i + FRAME] for i in range(0, len(audio) - FRAME + 1, FRAME)]
            onset_i = next(i for i, f in enumerate(frames) if np.abs(f).max() > 300)
            stamps: dict[int, int] = {}
            base = seq
            t_next = time.perf_counter()
            for i, f in enumerate(frames):
                t_next += FRAME / RATE
                stamps[base + i] = time.perf_counter_ns()
                mic.publish(pcm_msg(tag(f, base + i)))
                time.sleep(max(0.0, t_next - time.perf_counter()))
            seq += len(frames)
            index = trial + 1  # records[0] is the start-up check
            if not emu.wait_for(
                lambda i=index: len(emu.records) > i and emu.records[i].audio_input_ns, 20
            ):
                raise SystemExit(f"trial {trial}: no stream reached the stand-in")
            rec = emu.records[index]
            onset_ns = stamps[base + onset_i]
            first_ms.append((rec.audio_input_ns[0] - onset_ns) / 1e6)
            decide_ms.append((engaged_at[-1] - onset_ns) / 1e6)
            opens.append((rec.audio_input_ns[0] - engaged_at[-1]) / 1e9)
            request_ms.append((rec.started_ns - engaged_at[-1]) / 1e6)
            last = base + len(frames) - 1
            emu.wait_for(lambda r=rec, x=last: x in _tags(r), 10)
            got = _tags(rec)
            want = range(base + onset_i, last + 1)
            lost += sum(1 for s in want if s not in got)
            twice += len(got) - len(set(got))
            fut = release.call_async(Trigger.Request())
            wait_for(fut.done, 10)
            if not emu.wait_for(lambda r=rec: r.end_reason == "sessionEnd", 20):
                raise SystemExit(f"trial {trial}: the stream was not closed")
            wait_for(lambda: node.eng.phase == "idle", 10)
            time.sleep(0.3)
    finally:
        graph.close()
        emu.stop()
    figure("engaged_to_request_at_stand_in_p50", pct(request_ms, 50), "ms")
    return first_ms, decide_ms, lost, twice, float(np.median(opens))


def _tags(rec: Any) -> list[int]:
    import numpy as np

    a = np.frombuffer(bytes(rec.pcm), "<i2")
    out = []
    for i in range(0, len(a) - FRAME + 1, FRAME):
        s = read_tag(a[i : i + FRAME])
        if s is not None:
            out.append(s)
    return out


# --------------------------------------------------------------------------- part 2
def scripted_day(open_s: float, seed: int = 13) -> tuple[float, float, int]:
    """(streamed s per hour with the lifecycle, streamed s per hour always on, visits)."""
    from sonic_voice.sonic import engagement as eng

    rng = random.Random(seed)
    step = 0.1
    day = 24 * 3600.0
    # Events: (t, kind, value). Speech engages through the VAD (its ~0.3 s decision is
    # included in "user" speech: the stream opens open_s after the decision).
    events: list[tuple[float, str, float]] = []
    visits = 20
    starts = sorted(rng.uniform(8 * 3600, 18 * 3600) for _ in range(visits))
    for start in starts:
        t = start
        for k in range(rng.randint(3, 8)):
            said = rng.uniform(1.5, 4.0)
            events.append((t, "user", said))
            t += said + rng.uniform(0.6, 1.5)  # the model's response time
            answer = rng.uniform(2.0, 8.0)
            events.append((t, "robot", answer))
            t += answer
            if k == 1 and rng.random() < 0.4:  # "take me to ...": a navigation goal
                trip = rng.uniform(30, 120)
                events.append((t, "tool", trip))
                t += trip
                events.append((t, "robot", 3.0))  # "we have arrived"
                t += 3.0
            t += rng.uniform(1.0, 6.0)  # the visitor thinks
        if rng.random() < 0.25:  # comes back within a minute with one more question
            t += rng.uniform(25, 55)
            events.append((t, "user", 2.5))
            events.append((t + 3.5, "robot", 4.0))
    events.sort()
    clock = [0.0]
    e = eng.Engagement(eng.EngagementConfig(idle_timeout_s=20.0, memory_s=60.0), lambda: clock[0])
    streamed = 0.0
    opening_until = None
    i = 0
    tools_end: list[float] = []
    while clock[0] < day:
        now = clock[0]
        while i < len(events) and events[i][0] <= now:
            _t, kind, value = events[i]
            i += 1
            if kind == "user":
                if e.engage("speech"):
                    opening_until = now + open_s
                e.activity()
            elif kind == "robot":
                e.robot_audio(value)
            elif kind == "tool":
                e.tool_started()
                tools_end.append(now + value)
        for end in [x for x in tools_end if x <= now]:
            tools_end.remove(end)
            e.tool_finished()
        if e.phase == eng.ENGAGING and opening_until is not None and now >= opening_until:
            e.opened()
        if e.timed_out() and e.release():
            e.closed([("USER", "...")])  # a polite close takes well under a step
        if e.phase in (eng.CONVERSING, eng.CLOSING):
            streamed += step
        clock[0] += step
    streamed += 1.0  # check_on_start: one stream opened and closed at activation
    return streamed / 24, 3600.0, e.conversations


def main() -> None:
    isolate()
    setup_path()
    home = tempfile.mkdtemp(prefix="sv-bench-")
    os.environ.setdefault("ROS_HOME", home)
    os.environ.setdefault("ROS_LOG_DIR", os.path.join(home, "log"))
    for var in ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_SESSION_TOKEN"):
        os.environ.pop(var, None)
    os.environ["AWS_CONFIG_FILE"] = os.path.join(home, "aws-config-none")
    os.environ["AWS_SHARED_CREDENTIALS_FILE"] = os.path.join(home, "aws-credentials-none")
    os.environ["AWS_EC2_METADATA_DISABLED"] = "true"
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    trials = int(args[0]) if args else 12
    first, decide, lost, twice, open_s = onset_latency(trials)
    per_hour, always, conversations = scripted_day(open_s)
    print(f"trials: {trials} engagements from idle, each on a fresh stream", flush=True)
    figure("onset_to_first_frame_p50", pct(first, 50), "ms", "<= 600")
    figure("onset_to_first_frame_p99", pct(first, 99), "ms")
    figure("onset_to_engaged_p50", pct(decide, 50), "ms", "the VAD's decision")
    figure("stream_open_to_first_frame_p50", open_s * 1000, "ms")
    figure("frames_lost_from_onset", lost, "frames", "0")
    figure("frames_sent_twice", twice, "frames", "0")
    figure("day_conversations", conversations, "conversations", "20 visits, some return")
    figure("streamed_per_hour_lifecycle", per_hour, "s")
    figure("streamed_per_hour_always_on", always, "s")
    figure("streamed_reduction", always / per_hour, "x", ">= 10")


if __name__ == "__main__":
    main()
