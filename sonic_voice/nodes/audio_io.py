"""audio_io: the robot's own microphone and speaker.

Lifecycle (driven from outside: ``ros2 run`` with ``autostart``, the runner, or a launch
file's ``LifecycleNode`` transitions):

- configure: open the devices (a missing device fails the transition with one line that
  lists the devices present), create publishers and subscriptions;
- activate: start the device streams; microphone blocks are published on ``audio/mic``;
- deactivate / cleanup / shutdown / SIGINT: stop and close the streams (queued output is
  dropped).

No asyncio here: PortAudio's (and libpulse's) threads hand blocks to the executor side and
back; the mic blocks are published from one thread of their own (docs/architecture.md).
The speaker is opened on ``speaker_backend`` (audio/devices.py ``open_playback``):
libpulse's own API where a PulseAudio server plays, so a flush also drops what the server
holds (docs/audio-quality.md, "Speaker path and barge-in").

Topics: publishes ``audio/mic`` (PCM16LE mono, ``mic_rate``, ``block_ms`` blocks) and
``audio_io/state`` (JSON, latched); subscribes ``audio/out`` (PCM16LE mono,
``out_rate``, any chunk size) and ``audio/flush`` (``std_msgs/Empty``).

A device that disappears mid-run (no callbacks for ``device_timeout_s``, or a stream that
stopped) is closed and re-opened every ``device_retry_s`` until it is back; the node
stays up and says so on ``audio_io/state``.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass

import numpy as np
from std_msgs.msg import UInt8MultiArray

from sonic_voice import contracts as c
from sonic_voice.audio.devices import (
    SPEAKER_BACKENDS,
    CaptureStream,
    DeviceNotFoundError,
    PlaybackStream,
    StreamSettings,
    open_playback,
    quiet_alsa,
    refresh_devices,
)
from sonic_voice.audio.echo import APM_RATES, EchoCanceller, tap_playback
from sonic_voice.audio.pulse import PulsePlayback, PulseUnavailableError
from sonic_voice.nodes.diagnostics import ERROR, OK, WARN, Diagnostics, DiagStatus
from sonic_voice.ros.bridge import Periodic
from sonic_voice.ros.node import ConfigError, VoiceNode, param
from sonic_voice.ros.runtime import run_node
from sonic_voice.ros.topics import follow_output, json_msg, msg_pcm, pcm_cdr, publisher

STATE_TOPIC = c.AUDIO_IO_STATE.name
WATCHDOG_S = 0.25  # how often the devices are looked at and the state published


@dataclass
class AudioParams:
    enable_input: bool = param(True, "Capture the microphone onto audio/mic.")
    enable_output: bool = param(True, "Play audio/out on the speaker.")
    input_device: str = param(
        "", "Microphone: PortAudio index, exact name or name substring; '' = default."
    )
    output_device: str = param(
        "",
        "Speaker: PortAudio index, exact name or name substring, or a PulseAudio sink name "
        "or description (speaker_backend pulse/auto); '' = default.",
    )
    speaker_backend: str = param(
        "auto",
        "Speaker path. 'pulse': libpulse's own API, a flush also drops what the sound server "
        "holds (flush -> silence p50 3-7 ms, bench/audio_flush.py); 'portaudio': PortAudio "
        "through ALSA (what the server holds still plays after a flush: p99 64-82 ms); "
        "'auto': pulse when a PulseAudio/pipewire-pulse server answers and output_device is "
        "'' or names one of its sinks, else portaudio.",
        choices=SPEAKER_BACKENDS,
    )
    mic_rate: int = param(
        c.MIC_RATE, "Sample rate of audio/mic (Nova Sonic takes 16000).", range=(8000, 48000)
    )
    out_rate: int = param(
        c.OUT_RATE, "Sample rate of audio/out (Nova Sonic speaks 24000).", range=(8000, 48000)
    )
    input_device_rate: int = param(
        0,
        "Rate to open the input device at; 0 = the topic rate when the device offers it, "
        "else the device's default (converted with soxr).",
        range=(0, 192000),
    )
    output_device_rate: int = param(
        0,
        "Rate to open the output device at; 0 = the topic rate when the device offers it, "
        "else the device's default (converted with soxr).",
        range=(0, 192000),
    )
    block_ms: float = param(32.0, "Microphone block length.", range=(10.0, 100.0))
    output_block_ms: float = param(
        20.0,
        "Speaker callback block; smaller flushes faster but costs CPU (5 ms doubled the "
        "output thread's and PulseAudio's CPU).",
        range=(2.5, 50.0),
    )
    latency: str = param(
        "0.015",
        "Device latency: 'low', 'high' or seconds ('0.03'); PortAudio's suggested latency, or "
        "the pulse stream's target beyond one output block. With portaudio it bounds how "
        "much audio still plays after a flush.",
    )
    input_gain: float = param(1.0, "Microphone gain.", range=(0.0, 8.0), live=True)
    output_gain: float = param(1.0, "Speaker gain.", range=(0.0, 8.0), live=True)
    echo_cancel: bool = param(
        True,
        "WebRTC echo cancellation + noise suppression + high-pass on audio/mic, fed with what "
        "the speaker plays (only when both devices are enabled). Turn off for robots with "
        "hardware AEC.",
    )
    device_timeout_s: float = param(
        3.0,
        "No callback for this long = device lost. A stream's first callback can take over a "
        "second on a busy machine (PulseAudio), so keep this above ~2 s.",
        range=(0.2, 30.0),
    )
    device_retry_s: float = param(1.0, "Re-open period for a lost device.", range=(0.1, 60.0))


class AudioIONode(VoiceNode):
    """Microphone -> ``audio/mic``; ``audio/out`` -> speaker; ``audio/flush`` -> silence."""

    Params = AudioParams

    def __init__(self, **kwargs) -> None:
        super().__init__("audio_io", **kwargs)
        quiet_alsa()  # underruns are counted and reported on audio_io/state instead
        self.capture: CaptureStream | None = None
        self.playback: PlaybackStream | PulsePlayback | None = None
        self.echo: EchoCanceller | None = None
        self._mic_pub = None
        self._subs: list = []
        self._timer: Periodic | None = None
        self._watchdog_job: asyncio.Future | None = None
        self._active = False
        self._mic_queue: queue.SimpleQueue[np.ndarray | None] = queue.SimpleQueue()
        self._mic_thread: threading.Thread | None = None
        self._status = {"input": "off", "output": "off"}
        self._errors = {"input": "", "output": ""}
        self._next_retry = 0.0
        self._lock = threading.RLock()
        self.mic_blocks = 0
        self._state_pub = publisher(self, c.AUDIO_IO_STATE)
        self.diag = Diagnostics(self, hardware_id="audio")
        self.diag.add("devices", self._diag_devices)

    # -- parameters -------------------------------------------------------------------
    def _p(self, name: str):
        return getattr(self.params, name)

    def _settings(self, kind: str) -> StreamSettings:
        latency = self._p("latency")
        try:
            latency = float(latency)
        except ValueError:
            pass
        if kind == "input":
            return StreamSettings(
                device=self._p("input_device"),
                rate=int(self._p("mic_rate")),
                block_ms=float(self._p("block_ms")),
                gain=float(self._p("input_gain")),
                latency=latency,
                device_rate=int(self._p("input_device_rate")),
            )
        return StreamSettings(
            device=self._p("output_device"),
            rate=int(self._p("out_rate")),
            block_ms=float(self._p("output_block_ms")),
            gain=float(self._p("output_gain")),
            latency=latency,
            device_rate=int(self._p("output_device_rate")),
        )

    # -- lifecycle --------------------------------------------------------------------
    def configure(self) -> None:
        """Open the devices; a missing one fails configuration with the list of devices."""
        self.echo = None
        rate = int(self._p("mic_rate"))
        if self._p("echo_cancel") and self._p("enable_input") and self._p("enable_output"):
            if rate in APM_RATES:
                self.echo = EchoCanceller(rate)
            else:
                self.get_logger().warning(f"echo_cancel needs mic_rate in {APM_RATES}: off")
        try:
            self._open("input")
            self._open("output")
        except (DeviceNotFoundError, PulseUnavailableError) as e:
            self._close_devices()
            raise ConfigError(str(e)) from None
        self._mic_pub = publisher(self, c.MIC, lifecycle=True)
        self._subs = follow_output(self, self._on_out, self._on_flush)
        self._timer = self.bridge.every(WATCHDOG_S, self._watchdog_tick)
        self._publish_state("inactive")

    def activate(self) -> None:
        """Start the streams and the microphone publisher."""
        self._mic_thread = threading.Thread(target=self._publish_mic, name="mic-pub", daemon=True)
        self._mic_thread.start()
        with self._lock:
            self._active = True
            for kind in ("input", "output"):
                self._start(kind)
        self._publish_state("active")

    def on_param_changed(self, name: str, value: object) -> None:
        for s in (self.capture, self.playback):
            if s is not None and name == ("input_gain" if s is self.capture else "output_gain"):
                s.settings.gain = float(value)  # type: ignore[arg-type]

    async def stop(self) -> None:
        """Stop and close the streams (PortAudio's close blocks: off the loop)."""
        await asyncio.to_thread(self._stop_streams)
        self._publish_state("inactive")

    def release(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self.diag.close()

    # -- devices ----------------------------------------------------------------------
    def _open(self, kind: str) -> None:
        if not self._p(f"enable_{kind}"):
            self._status[kind] = "disabled"
            return
        if kind == "input":
            self.capture = CaptureStream(self._settings("input"), self._on_mic_block)
            dev, rate = self.capture.device_name, self.capture.device_rate
        else:
            self.playback = open_playback(self._settings("output"), self._p("speaker_backend"))
            if self.echo is not None:
                tap_playback(self.playback, self.echo.process_far)
            dev, rate = self.playback.device_name, self.playback.device_rate
            dev = f"{dev} ({self.playback.backend})"
        self._status[kind] = "ok"
        self._errors[kind] = ""
        self.get_logger().info(f"{kind} device: {dev} at {rate} Hz")

    def _start(self, kind: str) -> None:
        stream = self.capture if kind == "input" else self.playback
        if stream is not None:
            stream.start()

    def _stop_streams(self) -> None:
        with self._lock:
            self._active = False
            for s in (self.capture, self.playback):
                if s is not None:
                    s.close()
            self.capture = self.playback = None
        if self._mic_thread is not None:
            self._mic_queue.put(None)
            self._mic_thread.join(1)
            self._mic_thread = None

    def _close_devices(self) -> None:
        with self._lock:
            for s in (self.capture, self.playback):
                if s is not None:
                    s.close()
            self.capture = self.playback = None

    def _watchdog_tick(self) -> None:
        """On the loop every ``WATCHDOG_S``: a look at the devices without their lock (a
        stale read only delays a decision by one tick) and the state with the queue depth;
        a device to close or re-open is dealt with by :meth:`_watchdog` in a worker thread,
        since PortAudio and libpulse block there (the loop carries everyone's audio)."""
        if not self._active:
            return
        if self._watchdog_job is not None:
            return  # still closing or re-opening a device
        if self._needs_care(time.monotonic()):
            job = self._watchdog_job = asyncio.ensure_future(asyncio.to_thread(self._watchdog))
            job.add_done_callback(self._watchdog_done)
            return
        self._publish_state("active")

    def _watchdog_done(self, job: asyncio.Future) -> None:
        self._watchdog_job = None
        if not job.cancelled() and job.exception() is not None:
            self.get_logger().error(f"device watchdog: {job.exception()!r}")

    def _needs_care(self, now: float) -> bool:
        timeout = float(self._p("device_timeout_s"))
        for kind in ("input", "output"):
            if not self._p(f"enable_{kind}"):
                continue
            stream = self.capture if kind == "input" else self.playback
            if stream is not None and (not stream.active or now - stream.last_callback > timeout):
                return True
            if self._status[kind] == "lost" and now >= self._next_retry:
                return True
        return False

    def _watchdog(self) -> None:
        """Close a device that stopped, re-open a lost one when its retry is due; publish
        state with the queue depth (a worker thread: see :meth:`_watchdog_tick`)."""
        if not self._active:
            return
        now = time.monotonic()
        timeout = float(self._p("device_timeout_s"))
        with self._lock:
            for kind in ("input", "output"):
                if not self._p(f"enable_{kind}"):
                    continue
                stream = self.capture if kind == "input" else self.playback
                if stream is not None and (
                    not stream.active or now - stream.last_callback > timeout
                ):
                    self.get_logger().warning(
                        f"{kind} device {stream.device_name!r} stopped delivering audio; "
                        "closing it and retrying"
                    )
                    stream.close()
                    if kind == "input":
                        self.capture = None
                    else:
                        self.playback = None
                    self._status[kind] = "lost"
                    self._next_retry = now
                    self._publish_state("active")  # before a re-open that may hang a while
                if self._status[kind] == "lost" and now >= self._next_retry:
                    self._retry(kind)
                    if self._status[kind] == "lost":
                        self._next_retry = now + float(self._p("device_retry_s"))
        self._publish_state("active")

    def _retry(self, kind: str) -> None:
        try:
            refresh_devices()
            self._open(kind)
            self._start(kind)
            self.get_logger().info(f"{kind} device is back")
        except Exception as e:  # noqa: BLE001 - any device error means "still lost"
            self._errors[kind] = str(e).splitlines()[0]
            if kind == "input":
                self.capture = None
            else:
                self.playback = None

    # -- data path --------------------------------------------------------------------
    def _on_mic_block(self, block: np.ndarray) -> None:
        # PortAudio's thread: hand over and return.
        self._mic_queue.put(block)

    def _publish_mic(self) -> None:
        while True:
            block = self._mic_queue.get()
            if block is None:
                return
            pub = self._mic_pub
            if pub is not None and self._active:
                if self.echo is not None:
                    block = self.echo.process_near(block)
                pub.publish(pcm_cdr(block))  # serialized by hand: ros/topics.py
                self.mic_blocks += 1

    def _on_out(self, msg: UInt8MultiArray) -> None:
        pb = self.playback
        if pb is not None and self._active:
            pb.write(msg_pcm(msg))

    def _on_flush(self) -> None:
        pb = self.playback
        if pb is not None:
            dropped = pb.flush()
            self.get_logger().debug(f"flush: dropped {dropped} queued samples")

    def _diag_devices(self) -> DiagStatus:
        """Device status, underruns and what is queued, for /diagnostics."""
        cap, pb = self.capture, self.playback
        values = {
            "input": self._status["input"],
            "output": self._status["output"],
            "mic_blocks": self.mic_blocks,
            "queued_ms": round(pb.buffer.queued_seconds * 1000, 1) if pb else 0.0,
            "input_overflows": cap.status_flags if cap else 0,
            "output_underruns": pb.status_flags if pb else 0,
            "speaker_backend": pb.backend if pb else "",
            "echo_cancel": self.echo is not None,
        }
        lost = [k for k in ("input", "output") if self._status[k] == "lost"]
        if lost:
            errors = "; ".join(self._errors[k] for k in lost if self._errors[k])
            return DiagStatus(ERROR, f"{' and '.join(lost)} device lost {errors}".strip(), values)
        if not self._active:
            return DiagStatus(WARN, "inactive", values)
        return DiagStatus(OK, "ok", values)

    def _publish_state(self, lifecycle: str) -> None:
        pb = self.playback
        self._state_pub.publish(
            json_msg(
                c.AUDIO_IO_STATE,
                {
                    "lifecycle": lifecycle,
                    "input": self._status["input"],
                    "output": self._status["output"],
                    "input_error": self._errors["input"],
                    "output_error": self._errors["output"],
                    "queued_ms": round(pb.buffer.queued_seconds * 1000, 1) if pb else 0.0,
                    "mic_blocks": self.mic_blocks,
                },
            )
        )


def main(args: list[str] | None = None) -> None:
    run_node(AudioIONode, args)


if __name__ == "__main__":
    main()
