"""sonic_session: one Nova Sonic conversation, wired to ROS 2.

The session engine (``sonic_voice.sonic.session``) runs on an asyncio loop in its own
thread; the rclpy executor runs elsewhere. They cross over with ``call_soon_threadsafe`` /
``run_coroutine_threadsafe`` only: audio callbacks hand each block to the loop, the loop
publishes results (rclpy publishers are thread-safe).

Lifecycle: configure builds the settings, the tool provider and the publishers; activate
opens the conversation (the state topic says ``connecting`` until the stream is up, and
``error`` with the reason if it cannot be); deactivate ends it (running goals are
cancelled); cleanup/shutdown stop the loop.

Topics:

- in: ``audio/mic`` and ``audio/remote`` (PCM16LE mono 16 kHz); the active source is
  ``input_source``: ``auto`` (remote while ``kvs/viewers`` > 0, else local), ``local`` or
  ``remote``; ``kvs/viewers`` (Int32); ``text_input`` and ``kvs/viewer_text`` (String:
  plain text or ``{"type": "text", "text": ...}``; Nova 2 cross-modal input);
- out: ``audio/out`` (PCM16LE mono 24 kHz), ``audio/flush`` (Empty, on barge-in),
  ``transcript``, ``state`` (latched), ``usage``, ``tool_events`` (String JSON).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
from rclpy.callback_groups import ReentrantCallbackGroup
from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor
from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from rclpy.node import Node
from rclpy.parameter import Parameter
from std_msgs.msg import Empty, Int32, String, UInt8MultiArray

from sonic_voice.nodes.common import (
    AUDIO_QOS,
    EVENT_QOS,
    FLUSH_TOPIC,
    LATCHED_QOS,
    MIC_TOPIC,
    OUT_TOPIC,
    REMOTE_TOPIC,
    descriptor,
    json_msg,
    msg_pcm,
    out_msg,
    run_node,
)
from sonic_voice.nodes.diagnostics import ERROR, OK, WARN, Diagnostics, DiagStatus
from sonic_voice.sonic import events as ev
from sonic_voice.sonic.session import (
    DEFAULT_SYSTEM_PROMPT,
    SessionConfig,
    SessionListener,
    SonicSession,
)
from sonic_voice.sonic.transport import BedrockSettings

VIEWERS_TOPIC = "kvs/viewers"
VIEWER_TEXT_TOPIC = "kvs/viewer_text"


class _RosListener(SessionListener):
    """Session callbacks -> ROS topics (called on the session's loop thread)."""

    def __init__(self, node: SonicSessionNode) -> None:
        self.node = node

    def on_audio(self, pcm: bytes) -> None:
        if self.node._user_final_t is not None:
            # The model's response time as the robot sees it: the person's final transcript
            # (end of their turn) to the first audio of the answer.
            self.node.last_response_ms = (time.monotonic() - self.node._user_final_t) * 1000
            self.node._user_final_t = None
        self.node.out_pub.publish(out_msg(pcm, self.node.out_epoch))
        self.node.out_chunks += 1

    def on_interrupted(self) -> None:
        # A new epoch, announced in order on audio/out (chunks still in flight are dropped
        # by the players), then the fast path: audio/flush.
        self.node.out_epoch += 1
        self.node.out_pub.publish(out_msg(b"", self.node.out_epoch))
        self.node.flush_pub.publish(Empty())
        self.node.get_logger().info("barge-in: output flushed")

    def on_transcript(self, entry: dict[str, Any]) -> None:
        self.node.transcript_pub.publish(json_msg({"t": time.time(), **entry}))
        if entry.get("role") == "USER" and entry.get("stage") == "FINAL":
            self.node._user_final_t = time.monotonic()
        if entry.get("stage") == "FINAL":
            self.node.get_logger().info(f"{entry.get('role', '?')}: {entry.get('text', '')}")

    def on_state(self, state: str) -> None:
        self.node.publish_state(state)

    def on_usage(self, usage: dict[str, Any]) -> None:
        self.node.usage_pub.publish(json_msg(usage))

    def on_tool_event(self, event: dict[str, Any]) -> None:
        self.node.tool_pub.publish(json_msg({"t": time.time(), **event}))

    def on_error(self, message: str, fatal: bool) -> None:
        log = self.node.get_logger()
        (log.error if fatal else log.warning)(message)
        self.node.last_error = message
        if fatal:
            self.node._fatal_error = message


class _AudioInput:
    """``audio/mic`` and ``audio/remote`` taken on a thread of their own.

    Why: on the node's MultiThreadedExecutor every audio message waits for a wake-up of its
    wait loop (which rebuilds the wait set over all of the node's entities) and a hop to a
    pool thread; on a 2-core robot that hop alone measured p99 9-23 ms, against ~3 ms for a
    SingleThreadedExecutor that waits on these two subscriptions only
    (bench/sonic_latency.py). The helper node ignores the process's global arguments (a
    launch file's ``__node:=`` would rename it too); the topics are resolved, remappings
    included, through the session node.
    """

    def __init__(self, parent: SonicSessionNode) -> None:
        self.node = Node(
            f"{parent.get_name()}_audio_in",
            context=parent.context,
            namespace=parent.get_namespace(),
            use_global_arguments=False,
            start_parameter_services=False,
            enable_rosout=False,
            parameter_overrides=[
                Parameter("start_type_description_service", Parameter.Type.BOOL, False)
            ],
            allow_undeclared_parameters=True,
        )
        for topic, source in ((MIC_TOPIC, "local"), (REMOTE_TOPIC, "remote")):
            self.node.create_subscription(
                UInt8MultiArray,
                parent.resolve_topic_name(topic),
                lambda m, s=source: parent._on_audio(m, s),
                AUDIO_QOS,
            )
        self.executor = SingleThreadedExecutor(context=parent.context)
        self.executor.add_node(self.node)
        self._log = parent.get_logger()
        self._stopping = False
        self.thread = threading.Thread(target=self._spin, name="sonic-audio-in", daemon=True)
        self.thread.start()

    def _spin(self) -> None:
        while not self._stopping and self.node.context.ok():
            try:
                self.executor.spin_once(timeout_sec=0.2)
            except ExternalShutdownException:
                break
            except Exception as e:  # noqa: BLE001 - a bad message must not stop the audio
                if self._stopping:
                    break
                self._log.error(f"audio input: {e!r}")

    def close(self) -> None:
        self._stopping = True
        self.executor.wake()
        self.thread.join(2)
        try:
            self.executor.shutdown(timeout_sec=1)
        except Exception:  # noqa: BLE001 - the context may already be shut down
            pass
        self.node.destroy_node()


class SonicSessionNode(LifecycleNode):
    """Runs the Nova Sonic conversation for the robot."""

    def __init__(self, tool_provider_factory: Any = None, **kwargs: Any) -> None:
        super().__init__("sonic_session", **kwargs)
        self._declare_parameters()
        # A factory (node -> ToolProvider) lets the all-in-one runner and tests inject the
        # provider; by default the YAML-declared ROS tools are loaded from tools_file.
        self._tool_factory = tool_provider_factory
        self.tools: Any = None
        self.session: SonicSession | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: threading.Thread | None = None
        self._viewers = 0
        self._state = "idle"
        self.last_error = ""
        self._fatal_error: str | None = None
        self.out_chunks = 0
        self.out_epoch = 0
        self.last_response_ms: float | None = None
        self._user_final_t: float | None = None
        self.diag: Diagnostics | None = None
        self.mic_frames = 0
        self._last_push = 0.0
        self._pubs_ready = False
        self._audio_in: _AudioInput | None = None
        if self.get_parameter("autostart").value:
            if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                self.trigger_activate()

    # ------------------------------------------------------------------ parameters
    def _declare_parameters(self) -> None:
        d = self.declare_parameter
        d("autostart", True, descriptor("Configure and activate at start-up."))
        d("model_id", ev.NOVA_2_SONIC, descriptor("Bedrock model id (Nova 2 Sonic or v1)."))
        d("region", "us-east-1", descriptor("AWS region of the Bedrock runtime."))
        d(
            "endpoint_uri",
            "",
            descriptor("Bedrock runtime endpoint; '' = the region's public endpoint."),
        )
        d("ca_bundle", "", descriptor("PEM file of extra CAs to trust (stand-in, proxy)."))
        d("aws_profile", "", descriptor("AWS profile; '' = the default credential chain."))
        d("voice_id", "tiffany", descriptor("Nova Sonic voice (tiffany/matthew are polyglot)."))
        d("language", "", descriptor("Default locale until the person speaks, e.g. en-US."))
        d("system_prompt", DEFAULT_SYSTEM_PROMPT, descriptor("System prompt."))
        d("system_prompt_file", "", descriptor("File whose text replaces system_prompt."))
        d(
            "endpointing",
            "MEDIUM",
            descriptor(
                "Nova 2 end-of-turn sensitivity: HIGH, MEDIUM, LOW or '' (model default).",
                additional_constraints="HIGH|MEDIUM|LOW|''",
            ),
        )
        d("max_tokens", 1024, descriptor("Max output tokens.", int_range=(1, 10000, 0)))
        d("top_p", 0.9, descriptor("Nucleus sampling.", float_range=(0.0, 1.0, 0.0)))
        d("temperature", 0.7, descriptor("Sampling temperature.", float_range=(0.0, 1.0, 0.0)))
        d(
            "rotate_after_s",
            360.0,
            descriptor(
                "Renew the Bedrock stream after this long, at a pause (limit is 8 min).",
                float_range=(1.0, 470.0, 0.0),
            ),
        )
        d(
            "rotate_deadline_s",
            450.0,
            descriptor("Renew by this age even mid-turn.", float_range=(1.0, 475.0, 0.0)),
        )
        d("greeting", "", descriptor("Nova 2: text sent at start so the robot speaks first."))
        d(
            "tool_timeout_s",
            120.0,
            descriptor("Upper bound for any tool call.", float_range=(1.0, 3600.0, 0.0)),
        )
        d(
            "cancel_tools_on_barge_in",
            True,
            descriptor("Cancel running goals when the person interrupts the robot."),
        )
        d("speak_progress", True, descriptor("Nova 2: speak rate-limited tool progress."))
        d(
            "input_source",
            "auto",
            descriptor(
                "auto (remote while a viewer is connected, else local), local or remote.",
                additional_constraints="auto|local|remote",
            ),
        )
        d(
            "fill_silence",
            True,
            descriptor("Stream silence when the input source stalls (keeps the stream alive)."),
        )
        d("tools_file", "", descriptor("YAML tool declarations; '' = no tools."))
        d("locations_file", "", descriptor("YAML named locations for navigation tools."))

    def _p(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _session_config(self) -> SessionConfig:
        prompt = self._p("system_prompt")
        if self._p("system_prompt_file"):
            prompt = Path(self._p("system_prompt_file")).read_text().strip()
        return SessionConfig(
            model_id=self._p("model_id"),
            voice_id=self._p("voice_id"),
            system_prompt=prompt,
            language=self._p("language"),
            endpointing=self._p("endpointing") or None,
            max_tokens=int(self._p("max_tokens")),
            top_p=float(self._p("top_p")),
            temperature=float(self._p("temperature")),
            rotate_after_s=float(self._p("rotate_after_s")),
            rotate_deadline_s=float(self._p("rotate_deadline_s")),
            greeting=self._p("greeting"),
            tool_timeout_s=float(self._p("tool_timeout_s")),
            cancel_tools_on_barge_in=bool(self._p("cancel_tools_on_barge_in")),
            speak_progress=bool(self._p("speak_progress")),
        )

    def _bedrock_settings(self) -> BedrockSettings:
        return BedrockSettings(
            region=self._p("region"),
            model_id=self._p("model_id"),
            endpoint_uri=self._p("endpoint_uri") or None,
            ca_bundle=self._p("ca_bundle") or None,
            profile=self._p("aws_profile") or None,
        )

    # ------------------------------------------------------------------ lifecycle
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Validate settings, load tools, create publishers and subscriptions."""
        try:
            self.config = self._session_config()
            self.config.validate()
            self.bedrock = self._bedrock_settings()
            self.tools = self._make_tools()
        except Exception as e:  # noqa: BLE001 - any configuration error fails the transition
            self.get_logger().error(f"configuration failed: {e}")
            return TransitionCallbackReturn.FAILURE
        self.out_pub = self.create_publisher(UInt8MultiArray, OUT_TOPIC, AUDIO_QOS)
        self.flush_pub = self.create_publisher(Empty, FLUSH_TOPIC, EVENT_QOS)
        self.transcript_pub = self.create_publisher(String, "transcript", EVENT_QOS)
        self.state_pub = self.create_publisher(String, "state", LATCHED_QOS)
        self.usage_pub = self.create_publisher(String, "usage", EVENT_QOS)
        self.tool_pub = self.create_publisher(String, "tool_events", EVENT_QOS)
        self._pubs_ready = True
        if self.diag is None:
            self.diag = Diagnostics(self, hardware_id="bedrock")
            self.diag.add("bedrock stream", self._diag_stream)
        if self._audio_in is None:
            self._audio_in = _AudioInput(self)
        other = ReentrantCallbackGroup()
        self.create_subscription(
            Int32, VIEWERS_TOPIC, self._on_viewers, LATCHED_QOS, callback_group=other
        )
        for topic in ("text_input", VIEWER_TEXT_TOPIC):
            self.create_subscription(String, topic, self._on_text, EVENT_QOS, callback_group=other)
        self.publish_state("idle")
        return TransitionCallbackReturn.SUCCESS

    def _make_tools(self) -> Any:
        if self._tool_factory is not None:
            return self._tool_factory(self)
        if not self._p("tools_file"):
            return None
        from sonic_voice.tools import load_provider  # rclpy-side; imported only when used

        return load_provider(self, self._p("tools_file"), self._p("locations_file") or None)

    @property
    def fatal_error(self) -> str | None:
        """Why the conversation stopped for good (bad credentials, no model access...), or
        None while it runs or can recover; cleared by the next activation."""
        return self._fatal_error

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Start the loop thread and open the conversation (without blocking)."""
        self._fatal_error = None
        self._start_loop()
        self.session = SonicSession(self.bedrock, self.config, self.tools, _RosListener(self))
        fut = asyncio.run_coroutine_threadsafe(self._run_session(), self.loop)
        fut.add_done_callback(self._session_ended)
        if self._p("fill_silence"):
            asyncio.run_coroutine_threadsafe(self._silence_filler(), self.loop)
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """End the conversation: goals cancelled, stream closed politely."""
        self._stop_session()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.shutdown_resources()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self.shutdown_resources()
        return TransitionCallbackReturn.SUCCESS

    def shutdown_resources(self) -> None:
        """End the session (cancelling running goals), stop the audio and loop threads."""
        if self._audio_in is not None:
            self._audio_in.close()
            self._audio_in = None
        self._stop_session()
        if self.diag is not None:
            self.diag.close()
            self.diag = None
        if self.tools is not None and hasattr(self.tools, "shutdown"):
            try:
                self.tools.shutdown()
            except Exception as e:  # noqa: BLE001
                self.get_logger().warning(f"tool shutdown: {e}")
        if self.loop is not None:
            if self.loop.is_running():
                with contextlib.suppress(Exception):
                    asyncio.run_coroutine_threadsafe(_cancel_tasks(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            if self._loop_thread is not None:
                self._loop_thread.join(5)
            self.loop = None
            self._loop_thread = None

    # ------------------------------------------------------------------ loop side
    def _start_loop(self) -> None:
        if self.loop is not None:
            return
        self.loop = asyncio.new_event_loop()
        self._loop_thread = threading.Thread(
            target=self.loop.run_forever, name="sonic-session-loop", daemon=True
        )
        self._loop_thread.start()

    async def _run_session(self) -> None:
        assert self.session is not None
        try:
            await self.session.start()
        except Exception as e:  # noqa: BLE001 - reported on state/log; the node stays up
            self.last_error = str(e)
            self._fatal_error = str(e)
            self.publish_state("error")
            self.get_logger().error(f"Nova Sonic session could not start: {e}")

    def _session_ended(self, fut: Future) -> None:
        exc = fut.exception()
        if exc is not None:
            self.get_logger().error(f"session task failed: {exc!r}")

    def _stop_session(self) -> None:
        session, loop = self.session, self.loop
        self.session = None
        if session is None or loop is None or not loop.is_running():
            return
        fut = asyncio.run_coroutine_threadsafe(session.stop(), loop)
        try:
            fut.result(timeout=15)
        except Exception as e:  # noqa: BLE001 - shutting down regardless
            self.get_logger().warning(f"session stop: {e!r}")

    async def _silence_filler(self) -> None:
        """Nova Sonic expects a continuous stream; when the input stalls (device lost, no
        viewer yet) stream silence so server-side endpointing and timeouts behave."""
        frame = np.zeros(512, dtype=np.int16)
        while self.session is not None:
            await asyncio.sleep(0.032)
            s = self.session
            if s is not None and time.monotonic() - self._last_push > 0.25:
                s.push_audio(frame)

    # ------------------------------------------------------------------ ROS callbacks
    def _active_source(self) -> str:
        src = self._p("input_source")
        if src == "auto":
            return "remote" if self._viewers > 0 else "local"
        return src

    def _on_audio(self, msg: UInt8MultiArray, source: str) -> None:
        session, loop = self.session, self.loop
        if session is None or loop is None or source != self._active_source():
            return
        pcm = msg_pcm(msg)
        self._last_push = time.monotonic()
        self.mic_frames += 1
        loop.call_soon_threadsafe(session.push_audio, pcm)

    def _on_viewers(self, msg: Int32) -> None:
        if msg.data != self._viewers:
            self.get_logger().info(f"viewers connected: {msg.data}")
            self._viewers = msg.data
            self.publish_state(self._state)  # the state carries source and viewer count

    def _on_text(self, msg: String) -> None:
        text = msg.data
        try:
            doc = json.loads(text)
            if isinstance(doc, dict):
                if doc.get("type") != "text" or not isinstance(doc.get("text"), str):
                    self.get_logger().warning(f"text input ignored (not a text message): {text!r}")
                    return
                text = doc["text"]
        except json.JSONDecodeError:
            pass
        session, loop = self.session, self.loop
        if session is None or loop is None or not text.strip():
            return
        if not self.config.nova2:
            self.get_logger().warning(f"{self.config.model_id} takes no text input; ignored")
            return
        asyncio.run_coroutine_threadsafe(session.send_text(text.strip()), loop)

    def _diag_stream(self) -> DiagStatus:
        """Bedrock stream health for /diagnostics."""
        s = self.session
        values: dict[str, Any] = {
            "state": self._state,
            "model": self._p("model_id"),
            "source": self._active_source(),
            "viewers": self._viewers,
            "audio_out_chunks": self.out_chunks,
        }
        if self.last_response_ms is not None:
            values["last_response_ms"] = round(self.last_response_ms, 1)
        if s is not None:
            values.update(
                stream_age_s=round(s.stream_age, 1),
                rotations=s.rotations,
                recoveries=s.recoveries,
                barge_ins=s.barge_ins,
                frames_sent=s.frames_pushed,
                frames_dropped=s.frames_dropped,
            )
        if self._fatal_error:
            return DiagStatus(ERROR, self._fatal_error, values)
        if s is None:
            return DiagStatus(WARN, "no conversation (inactive)", values)
        if self._state == "connecting":
            return DiagStatus(
                WARN, f"connecting ({self.last_error or 'opening the stream'})", values
            )
        return DiagStatus(OK, self._state, values)

    def publish_state(self, state: str) -> None:
        self._state = state
        if not self._pubs_ready:
            return
        self.state_pub.publish(
            json_msg(
                {
                    "state": state,
                    "source": self._active_source(),
                    "viewers": self._viewers,
                    "error": self.last_error if state == "error" else "",
                }
            )
        )


async def _cancel_tasks() -> None:
    """Cancel what still runs on the session loop (silence filler, late tool tasks)."""
    me = asyncio.current_task()
    tasks = [t for t in asyncio.all_tasks() if t is not me]
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def main(args: list[str] | None = None) -> None:
    run_node(SonicSessionNode, args)


if __name__ == "__main__":
    main()
