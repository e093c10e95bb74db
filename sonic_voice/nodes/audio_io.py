"""audio_io: the robot's own microphone and speaker.

Lifecycle (managed node, brought up by itself when ``autostart`` is true):

- configure: read parameters, open the devices (a missing device fails the transition
  with an error that lists the devices present), create publishers and subscriptions;
- activate: start the device streams; microphone blocks are published on ``audio/mic``;
- deactivate: stop the streams (queued output is dropped);
- cleanup / shutdown: close the devices.

Topics: publishes ``audio/mic`` (PCM16LE mono, ``mic_rate``, ``block_ms`` blocks) and
``audio_io/state`` (JSON, latched); subscribes ``audio/out`` (PCM16LE mono,
``out_rate``, any chunk size) and ``audio/flush`` (``std_msgs/Empty``).

A device that disappears mid-run (no callbacks for ``device_timeout_s``, or a stream that
stopped) is closed and re-opened every ``device_retry_s`` until it is back; the node
stays up and says so on ``audio_io/state``.
"""

from __future__ import annotations

import queue
import threading
import time

import numpy as np
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from std_msgs.msg import String, UInt8MultiArray

from sonic_voice.audio.devices import (
    CaptureStream,
    DeviceNotFoundError,
    PlaybackStream,
    StreamSettings,
    quiet_alsa,
    refresh_devices,
)
from sonic_voice.audio.echo import APM_RATES, EchoCanceller, tap_playback
from sonic_voice.nodes.common import (
    AUDIO_QOS,
    LATCHED_QOS,
    MIC_RATE,
    MIC_TOPIC,
    OUT_RATE,
    descriptor,
    follow_output,
    json_msg,
    msg_pcm,
    pcm_msg,
    run_node,
)
from sonic_voice.nodes.diagnostics import ERROR, OK, WARN, Diagnostics, DiagStatus

STATE_TOPIC = "audio_io/state"


class AudioIONode(LifecycleNode):
    """Microphone -> ``audio/mic``; ``audio/out`` -> speaker; ``audio/flush`` -> silence."""

    def __init__(self, **kwargs) -> None:
        super().__init__("audio_io", **kwargs)
        quiet_alsa()  # underruns are counted and reported on audio_io/state instead
        self.declare_parameter("autostart", True, descriptor("Configure and activate at start-up."))
        self.declare_parameter(
            "enable_input", True, descriptor("Capture the microphone onto audio/mic.")
        )
        self.declare_parameter("enable_output", True, descriptor("Play audio/out on the speaker."))
        self.declare_parameter(
            "input_device",
            "",
            descriptor("Microphone: PortAudio index, exact name or name substring; '' = default."),
        )
        self.declare_parameter(
            "output_device",
            "",
            descriptor("Speaker: PortAudio index, exact name or name substring; '' = default."),
        )
        self.declare_parameter(
            "mic_rate",
            MIC_RATE,
            descriptor(
                "Sample rate of audio/mic (Nova Sonic takes 16000).",
                int_range=(8000, 48000, 0),
            ),
        )
        self.declare_parameter(
            "out_rate",
            OUT_RATE,
            descriptor(
                "Sample rate of audio/out (Nova Sonic speaks 24000).", int_range=(8000, 48000, 0)
            ),
        )
        for kind in ("input", "output"):
            self.declare_parameter(
                f"{kind}_device_rate",
                0,
                descriptor(
                    f"Rate to open the {kind} device at; 0 = the topic rate when the device "
                    "offers it, else the device's default (converted with soxr).",
                    int_range=(0, 192000, 0),
                ),
            )
        self.declare_parameter(
            "block_ms", 32.0, descriptor("Microphone block length.", float_range=(10.0, 100.0, 0.0))
        )
        self.declare_parameter(
            "output_block_ms",
            5.0,
            descriptor(
                "Speaker callback block; smaller flushes faster.", float_range=(2.5, 50.0, 0.0)
            ),
        )
        self.declare_parameter(
            "latency",
            "0.015",
            descriptor(
                "PortAudio suggested latency: 'low', 'high' or seconds ('0.03'). Bounds how "
                "much audio is already in the device when a flush comes."
            ),
        )
        self.declare_parameter(
            "input_gain", 1.0, descriptor("Microphone gain.", float_range=(0.0, 8.0, 0.0))
        )
        self.declare_parameter(
            "output_gain", 1.0, descriptor("Speaker gain.", float_range=(0.0, 8.0, 0.0))
        )
        self.declare_parameter(
            "echo_cancel",
            True,
            descriptor(
                "WebRTC echo cancellation + noise suppression + high-pass on audio/mic, fed "
                "with what the speaker plays (only when both devices are enabled). Turn off "
                "for robots with hardware AEC."
            ),
        )
        self.declare_parameter(
            "device_timeout_s",
            3.0,
            descriptor(
                "No callback for this long = device lost. A stream's first callback can take "
                "over a second on a busy machine (PulseAudio), so keep this above ~2 s.",
                float_range=(0.2, 30.0, 0.0),
            ),
        )
        self.declare_parameter(
            "device_retry_s",
            1.0,
            descriptor("Re-open period for a lost device.", float_range=(0.1, 60.0, 0.0)),
        )
        self.capture: CaptureStream | None = None
        self.playback: PlaybackStream | None = None
        self.echo: EchoCanceller | None = None
        self._mic_pub = None
        self._state_pub = None
        self.diag: Diagnostics | None = None
        self._subs: list = []
        self._timer = None
        self._active = False
        self._mic_queue: queue.SimpleQueue[np.ndarray | None] = queue.SimpleQueue()
        self._mic_thread: threading.Thread | None = None
        self._status = {"input": "off", "output": "off"}
        self._errors = {"input": "", "output": ""}
        self._next_retry = 0.0
        self._lock = threading.RLock()
        self.mic_blocks = 0
        if self.get_parameter("autostart").value:
            # Brought up from the constructor, as nav2's lifecycle manager would.
            if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                self.trigger_activate()

    # -- parameters -------------------------------------------------------------------
    def _p(self, name: str):
        return self.get_parameter(name).value

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
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
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
        except DeviceNotFoundError as e:
            self.get_logger().error(str(e))
            self._close_devices()
            return TransitionCallbackReturn.FAILURE
        self._mic_pub = self.create_lifecycle_publisher(UInt8MultiArray, MIC_TOPIC, AUDIO_QOS)
        self._state_pub = self.create_publisher(String, STATE_TOPIC, LATCHED_QOS)
        self._subs = follow_output(self, self._on_out, self._on_flush)
        self._timer = self.create_timer(0.25, self._watchdog)
        if self.diag is None:
            self.diag = Diagnostics(self, hardware_id="audio")
            self.diag.add("devices", self._diag_devices)
        self._publish_state("inactive")
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Start the streams and the microphone publisher."""
        self._mic_thread = threading.Thread(target=self._publish_mic, name="mic-pub", daemon=True)
        self._mic_thread.start()
        with self._lock:
            self._active = True
            for kind in ("input", "output"):
                self._start(kind)
        super().on_activate(state)
        self._publish_state("active")
        return TransitionCallbackReturn.SUCCESS

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Stop the streams; queued output is dropped."""
        self._stop_streams()
        super().on_deactivate(state)
        self._publish_state("inactive")
        return TransitionCallbackReturn.SUCCESS

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def shutdown_resources(self) -> None:
        """Called by the entry point before the node is destroyed."""
        self._stop_streams()
        self._close_devices()

    def _teardown(self) -> None:
        self._stop_streams()
        self._close_devices()
        if self._timer is not None:
            self.destroy_timer(self._timer)
            self._timer = None
        for s in self._subs:
            self.destroy_subscription(s)
        self._subs = []
        if self._mic_pub is not None:
            self.destroy_lifecycle_publisher(self._mic_pub)
            self._mic_pub = None
        if self.diag is not None:
            self.diag.close()
            self.diag = None

    # -- devices ----------------------------------------------------------------------
    def _open(self, kind: str) -> None:
        if not self._p(f"enable_{kind}"):
            self._status[kind] = "disabled"
            return
        if kind == "input":
            self.capture = CaptureStream(self._settings("input"), self._on_mic_block)
            dev, rate = self.capture.device_name, self.capture.device_rate
        else:
            self.playback = PlaybackStream(self._settings("output"))
            if self.echo is not None:
                tap_playback(self.playback, self.echo.process_far)
            dev, rate = self.playback.device_name, self.playback.device_rate
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
            self._mic_thread.join(2)
            self._mic_thread = None

    def _close_devices(self) -> None:
        with self._lock:
            for s in (self.capture, self.playback):
                if s is not None:
                    s.close()
            self.capture = self.playback = None

    def _watchdog(self) -> None:
        """Detect a lost device and re-open it; publish state with the queue depth."""
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
                pub.publish(pcm_msg(block))
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
        if self._state_pub is None:
            return
        pb = self.playback
        self._state_pub.publish(
            json_msg(
                {
                    "lifecycle": lifecycle,
                    "input": self._status["input"],
                    "output": self._status["output"],
                    "input_error": self._errors["input"],
                    "output_error": self._errors["output"],
                    "queued_ms": round(pb.buffer.queued_seconds * 1000, 1) if pb else 0.0,
                    "mic_blocks": self.mic_blocks,
                }
            )
        )


def main(args: list[str] | None = None) -> None:
    run_node(AudioIONode, args)


if __name__ == "__main__":
    main()
