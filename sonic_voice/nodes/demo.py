"""The offline demo: the whole stack on this machine, no AWS account needed.

Started by ``sonic-voice`` when no AWS configuration is found (or with ``--offline``):

- the Nova Sonic stand-in runs in-process (real HTTP/2 + TLS + SigV4 + event stream, so the
  session talks to it through the real SDK) and answers from a scenario
  (``config/scenarios/offline_demo.yaml``);
- a private PulseAudio server gives a virtual microphone and speaker (unless
  ``--real-devices``); the visitor's words — each speech turn's ``user`` line, synthesized
  in its language with espeak-ng, or the WAV files given with ``--wav`` — are played into
  the microphone, so they go through ``audio_io`` like real speech;
- the simulated base serves ``nav2_msgs/action/NavigateToPose`` and publishes odometry, so
  the ``navigate_to`` tool drives it for real over ROS 2.

It ends when every turn of the scenario has been answered (and the base stopped), printing
a summary; exit status 0 on success.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from sonic_voice.nodes.bringup import RunLog, _node, _stack, make_monitor, node_params, share_dir

log = logging.getLogger("sonic_voice")

DEMO_LIMIT_S = 180.0
MIC_RATE = 16000

# A few very common words per language: enough to say which language a demo line is in.
_WORDS = {
    "es": {"el", "la", "los", "las", "de", "que", "me", "te", "por", "favor", "hola", "sí",
           "claro", "hemos", "llegado", "puedes", "llevar", "a", "es", "una", "gracias"},
    "en": {"the", "a", "to", "you", "is", "are", "i", "am", "can", "how", "help", "hello",
           "we", "here", "please", "me", "take"},
    "fr": {"le", "la", "les", "de", "je", "vous", "est", "bonjour", "merci", "nous", "à"},
    "de": {"der", "die", "das", "und", "ich", "sie", "ist", "hallo", "bitte", "wir", "zu"},
}  # fmt: skip


def guess_language(text: str) -> str:
    """The language of a demo line by its common words ('' when unsure)."""
    words = [w.strip("¿?¡!.,;:\"'").lower() for w in text.split()]
    scores = {lang: sum(w in vocab for w in words) for lang, vocab in _WORDS.items()}
    best = max(scores, key=lambda k: scores[k])
    return best if scores[best] > 0 else ""


def read_wav_16k(path: Path) -> np.ndarray:
    """A 16-bit WAV file (any rate, mono or stereo) as 16 kHz mono int16."""
    from sonic_voice.emulators.sonic.audio import load_wav

    return np.frombuffer(load_wav(path, MIC_RATE), "<i2")


def synthesize(text: str, voice: str) -> np.ndarray:
    """The visitor's line in ``voice`` (an espeak-ng language), 16 kHz mono int16."""
    from sonic_voice.emulators.sonic import audio as synth

    if not synth.espeak_available():
        raise RuntimeError(
            "espeak-ng is not installed (sudo apt-get install espeak-ng), so the visitor "
            "cannot speak: give recordings with --wav FILE"
        )
    return np.frombuffer(asyncio.run(synth.synthesize(text, voice, 160, MIC_RATE)), "<i2")


def visitor_lines(scenario_path: Path, wavs: list[Path]) -> list[tuple[str, np.ndarray]]:
    """(text, audio) for each speech turn of the scenario, in order."""
    from sonic_voice.emulators.sonic.scenario import Scenario

    lines = []
    speech_turns = [t for t in Scenario.load(scenario_path).turns if t.on != "text"]
    for i, turn in enumerate(speech_turns):
        text = turn.user or ""
        audio = read_wav_16k(wavs[i]) if i < len(wavs) else synthesize(text, turn.voice)
        pad = np.zeros(MIC_RATE // 4, np.int16)
        lines.append((text, np.concatenate([pad, audio, pad])))
    return lines


class Offline:
    """The pieces the offline demo starts besides the nodes."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stack = contextlib.ExitStack()
        self.audio: Any = None
        self.emu: Any = None
        self.kvs: Any = None
        self.viewer_url = ""

    def __enter__(self) -> Offline:
        from sonic_voice.emulators.sonic.server import (
            DEFAULT_ACCESS_KEY,
            DEFAULT_SECRET_KEY,
            EmulatorThread,
        )

        if not self.args.real_devices:
            from sonic_voice.audio.virtual import VirtualAudio

            self.audio = self.stack.enter_context(contextlib.closing(VirtualAudio()))
            self.audio.export()
            self.audio.warm_up()
        # The stand-in's throwaway keys, for this process only: the session signs with them
        # through botocore's environment provider, exactly as it would with real keys.
        os.environ["AWS_ACCESS_KEY_ID"] = DEFAULT_ACCESS_KEY
        os.environ["AWS_SECRET_ACCESS_KEY"] = DEFAULT_SECRET_KEY
        os.environ.pop("AWS_SESSION_TOKEN", None)
        self.emu = self.stack.enter_context(
            EmulatorThread(scenario=str(self.scenario_path), realtime=True)
        )
        self.kvs = None
        self.viewer_url = ""
        if self.args.kvs_channel:
            # Remote visitors too: the KVS stand-in (control plane + signaling) and the
            # viewer page, so a browser on this machine can join the conversation.
            from sonic_voice.emulators.kvs import KvsEmulatorThread
            from sonic_voice.web import serve_in_thread

            self.kvs = self.stack.enter_context(
                KvsEmulatorThread(channels=(self.args.kvs_channel,))
            )
            server, url = serve_in_thread()
            self.stack.callback(server.shutdown)
            em = self.kvs.emulator
            self.viewer_url = (
                f"{url}?endpoint={em.endpoint_url}&channel={self.args.kvs_channel}"
                f"&region={em.region}"
            )
        return self

    @property
    def scenario_path(self) -> Path:
        return scenario_path(self.args)

    def __exit__(self, *exc: object) -> None:
        self.stack.close()


def scenario_path(args: argparse.Namespace) -> Path:
    """The stand-in's scenario: ``--scenario`` or the shipped offline demo."""
    return Path(args.scenario or share_dir() / "config" / "scenarios" / "offline_demo.yaml")


def run_offline(args: argparse.Namespace) -> int:
    """The offline demo conversation, end to end. Returns the exit status."""
    from sonic_voice.nodes.audio_io import AudioIONode
    from sonic_voice.nodes.sim_base import SimBaseNode
    from sonic_voice.nodes.sonic_session import SonicSessionNode

    scenario = scenario_path(args)
    try:
        lines = [] if args.no_local_audio else visitor_lines(scenario, args.wav)
    except (RuntimeError, ValueError, OSError) as e:
        log.error("offline demo: %s", e)
        return 2
    cfg = share_dir() / "config"
    run = RunLog()
    log.info("sonic_voice offline demo: no AWS configuration, using the local stand-ins")
    log.info("  scenario %s: %d visitor line(s)", scenario, len(lines))
    if args.no_local_audio:
        log.info("  no local audio: the scripted visitor stays silent (join with a browser)")
    with Offline(args) as off, _stack() as stack:
        log.info("  Bedrock stand-in at %s", off.emu.endpoint_uri)
        session_params = node_params(args, "sonic_session")
        session_params.update(
            endpoint_uri=off.emu.endpoint_uri,
            ca_bundle=off.emu.ca_file,
            region=off.emu.emulator.region,
            aws_profile="",
        )
        if not session_params.get("tools_file"):
            session_params["tools_file"] = str(cfg / "tools.yaml")
        if not session_params.get("locations_file"):
            session_params["locations_file"] = str(cfg / "locations.yaml")
        if not session_params.get("greeting"):
            session_params["greeting"] = "A visitor has just walked up to you. Greet them."
        base_params = node_params(args, "sim_base")
        if not base_params.get("locations_file"):
            base_params["locations_file"] = session_params["locations_file"]
        if not args.no_local_audio:
            audio_params = node_params(args, "audio_io")
            # One process holds every node here (one GIL): a little more device latency
            # keeps the virtual devices from underrunning on a busy machine.
            if str(audio_params.get("latency", "0.015")) == "0.015":
                audio_params.update(latency="0.05", output_block_ms=20.0)
            _node(AudioIONode, stack, audio_params)
        base = _node(SimBaseNode, stack, base_params)
        if off.kvs is not None:
            from sonic_voice.nodes.kvs_webrtc import KvsWebrtcNode

            kvs_params = node_params(args, "kvs_webrtc")
            kvs_params.update(
                channel_name=args.kvs_channel,
                endpoint_url=off.kvs.emulator.endpoint_url,
                region=off.kvs.emulator.region,
                ice_servers="[]",  # host candidates only: everything stays on this machine
            )
            _node(KvsWebrtcNode, stack, kvs_params)
            log.info("  KVS stand-in at %s; a browser can join at", off.kvs.emulator.endpoint_url)
            log.info("  %s (any access key and secret)", off.viewer_url)
        session = _node(SonicSessionNode, stack, session_params)
        stack.add(make_monitor(run, stack.context))
        stack.start()
        ok = _converse(run, off, session, base, lines, args)
        if ok and args.stay:
            log.info("%s  scripted conversation done; still running (Ctrl-C to stop)", run.t())
            with contextlib.suppress(KeyboardInterrupt):
                while not getattr(session, "fatal_error", None):
                    time.sleep(0.5)
        if not ok:
            for r in off.emu.records:
                pcm = np.frombuffer(bytes(r.pcm), "<i2").astype(np.float32)
                blocks = pcm[: len(pcm) // 1600 * 1600].reshape(-1, 1600)
                level = 20 * np.log10(np.sqrt((blocks**2).mean(axis=1)) / 32768 + 1e-9)
                log.error(
                    "  stand-in stream %d: %d audio frames, %d utterance(s) heard, loudest "
                    "0.1 s of input %.1f dBFS",
                    r.index, r.audio_frames, r.utterances, level.max() if len(level) else -200,
                )  # fmt: skip
        _summary(run, base, ok)
    return 0 if ok else 1


def _wait(pred: Any, limit: float, run: RunLog, session: Any) -> bool:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        if pred():
            return True
        if getattr(session, "fatal_error", None):
            return False
        time.sleep(0.05)
    return False


def _settled(run: RunLog, quiet_s: float = 0.8) -> Any:
    """True once the robot is back to listening and has been for ``quiet_s``."""
    since: list[float] = []

    def pred() -> bool:
        with run.lock:
            state = run.states[-1] if run.states else ""
        if state != "listening":
            since.clear()
            return False
        if not since:
            since.append(time.monotonic())
        return time.monotonic() - since[0] >= quiet_s

    return pred


def _converse(
    run: RunLog, off: Offline, session: Any, base: Any, lines: list, args: argparse.Namespace
) -> bool:
    limit = args.duration or DEMO_LIMIT_S
    end = time.monotonic() + limit
    left = lambda: max(0.0, end - time.monotonic())  # noqa: E731
    # The robot speaks first (the greeting turn), then the visitor, turn by turn.
    if not _wait(lambda: run.finals("ASSISTANT"), left(), run, session):
        return _fail(run, session, "the robot never greeted")
    if not _wait(_settled(run), left(), run, session):
        return _fail(run, session, "the greeting did not finish")
    for i, (text, audio) in enumerate(lines):
        answered = len(run.finals("ASSISTANT"))
        log.info("%s  (visitor speaks into the microphone: %s)", run.t(), text)
        if off.audio is not None:
            off.audio.play_into_mic(audio, MIC_RATE).wait(timeout=len(audio) / MIC_RATE + 10)
        else:
            import sounddevice as sd

            sd.play(audio, MIC_RATE, blocking=True)
        if not _wait(lambda n=answered: len(run.finals("ASSISTANT")) > n, left(), run, session):
            return _fail(run, session, f"no answer to visitor line {i + 1}")
        if not _wait(_tools_done(run), left(), run, session):
            return _fail(run, session, "a tool call did not finish")
        if not _wait(_settled(run), left(), run, session):
            return _fail(run, session, "the robot did not finish speaking")
    with run.lock:
        failed = [
            e for e in run.tool_events if e.get("event") == "result" and e.get("status") != "ok"
        ]
    if failed:
        return _fail(run, session, f"tool call(s) failed: {[_short(e) for e in failed]}")
    return True


def _tools_done(run: RunLog) -> Any:
    def pred() -> bool:
        with run.lock:
            started = sum(e.get("event") == "start" for e in run.tool_events)
            ended = sum(e.get("event") == "result" for e in run.tool_events)
        return ended >= started

    return pred


def _fail(run: RunLog, session: Any, why: str) -> bool:
    fatal = getattr(session, "fatal_error", None)
    log.error("%s  demo failed: %s%s", run.t(), why, f" ({fatal})" if fatal else "")
    return False


def _summary(run: RunLog, base: Any, ok: bool) -> None:
    with run.lock:
        users = run.finals("USER")
        robot = run.finals("ASSISTANT")
        results = [e for e in run.tool_events if e.get("event") == "result"]
    log.info("-" * 72)
    log.info("summary (%.1f s)", time.monotonic() - run.started)
    for e in users:
        if not e.get("interactive"):
            log.info("  visitor [%s]: %s", guess_language(e["text"]) or "?", e["text"])
    for e in robot:
        log.info("  robot   [%s]: %s", guess_language(e["text"]) or "?", e["text"])
    for e in results:
        log.info("  tool %s -> %s %s", e.get("tool"), e.get("status"), _short(e.get("result", {})))
    log.info(
        "  base at (%.2f, %.2f), drove %.2f m",
        getattr(base, "x", 0.0),
        getattr(base, "y", 0.0),
        run.distance,
    )
    log.info("demo %s", "completed" if ok else "FAILED")


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) < 120 else text[:117] + "..."
