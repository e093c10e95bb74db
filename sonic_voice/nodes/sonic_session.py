"""sonic_session: one Nova Sonic conversation, wired to ROS 2.

The session engine (``sonic_voice.sonic.session``) runs on the process's asyncio loop
(``sonic_voice.ros.bridge``); ROS messages cross to it once, with ``call_soon_threadsafe``,
and the loop publishes results (rclpy publishers are thread-safe). See
docs/architecture.md for the threads and the path of one audio frame.

Lifecycle (driven from outside: ``ros2 run`` with ``autostart``, the runner, or a launch
file's ``LifecycleNode`` transitions):

- configure: check the settings (voice, model, tools file, credentials) and load the
  tools; any problem fails the transition with one line naming what to fix;
- activate: with ``always_on``, open the conversation in the background (``state`` says
  ``connecting``, then ``listening``; ``error`` with the cause when it cannot, e.g. no model
  access); otherwise wait, idle, with no Bedrock stream, until someone engages (the
  conversation lifecycle, ``sonic_voice.sonic.conversation`` (wired there, pure asyncio;
  this node is its ROS glue), ``sonic_voice.sonic.engagement`` and
  docs/conversation-lifecycle.md: local speech, a presence topic, the ``~/engage``
  service, a viewer joining, a typed line), and release after ``idle_timeout_s``;
- deactivate / cleanup / shutdown / SIGINT: running goals are cancelled first, then the
  stream is closed politely (within the process's shutdown budget).

Topics (names, types and JSON shapes in ``sonic_voice.contracts``):

- in: ``audio/mic`` and ``audio/remote`` (the active one is ``input_source``: ``auto`` =
  remote while ``kvs/viewers`` > 0, else local), ``kvs/viewers``, ``text_input`` and
  ``kvs/viewer_text`` (Nova 2 cross-modal text);
- out: ``audio/out``, ``audio/flush`` (on barge-in), ``transcript``, ``state`` (latched;
  ``engagement`` says idle/engaging/conversing/closing), ``usage``, ``usage/hourly``
  (latched: streamed seconds, tokens, estimated cost of the hour), ``conversation``
  (engaged / released with its figures), ``tool_events``, ``/diagnostics``;
- services: ``~/engage``, ``~/release`` (std_srvs/Trigger).
"""

from __future__ import annotations

import contextlib
import importlib
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rclpy.qos import QoSProfile, ReliabilityPolicy
from std_msgs.msg import Empty, Int32, String, UInt8MultiArray
from std_srvs.srv import Trigger

from sonic_voice import contracts as c
from sonic_voice.audio.vad import VadConfig, VoiceActivity
from sonic_voice.nodes.diagnostics import ERROR, OK, WARN, Diagnostics, DiagStatus
from sonic_voice.paths import resolve_config_path
from sonic_voice.ros.node import ConfigError, VoiceNode, param
from sonic_voice.ros.runtime import run_node
from sonic_voice.ros.topics import json_msg, msg_bytes, out_cdr, publisher, subscription
from sonic_voice.sonic import engagement as eng
from sonic_voice.sonic import events as ev
from sonic_voice.sonic.conversation import Conversation, ConversationConfig
from sonic_voice.sonic.session import (
    DEFAULT_SYSTEM_PROMPT,
    SessionConfig,
    SessionListener,
    SonicSession,
)
from sonic_voice.sonic.transport import BedrockSettings, have_credentials

SAFETY_REASON = "by the safety stop"  # the model reads "navigate_to was stopped (by the ...)"
REGION_RE = re.compile(r"^[a-z]{2}(-[a-z]+)+-\d+$")
# Where each model is known to run (shared reference, from pipecat; AWS adds regions, so an
# unknown one is a warning, not an error).
KNOWN_REGIONS = {
    ev.NOVA_2_SONIC: ("us-east-1", "us-west-2", "ap-northeast-1"),
    "amazon.nova-sonic-v1:0": ("us-east-1", "ap-northeast-1"),
}


@dataclass
class SessionParams:
    model_id: str = param(ev.NOVA_2_SONIC, "Bedrock model id (Nova 2 Sonic or v1).")
    region: str = param("us-east-1", "AWS region of the Bedrock runtime.")
    endpoint_uri: str = param("", "Bedrock runtime endpoint; '' = the region's public endpoint.")
    ca_bundle: str = param("", "PEM file of extra CAs to trust (stand-in, proxy).")
    aws_profile: str = param("", "AWS profile; '' = the default credential chain.")
    voice_id: str = param("tiffany", "Nova Sonic voice (tiffany/matthew are polyglot).")
    language: str = param("", "Default locale until the person speaks, e.g. en-US.")
    system_prompt: str = param(DEFAULT_SYSTEM_PROMPT, "System prompt.")
    system_prompt_file: str = param("", "File whose text replaces system_prompt.")
    endpointing: str = param(
        "MEDIUM",
        "Nova 2 end-of-turn sensitivity: HIGH, MEDIUM, LOW or '' (model default).",
        choices=("HIGH", "MEDIUM", "LOW", ""),
    )
    max_tokens: int = param(1024, "Max output tokens.", range=(1, 10000))
    top_p: float = param(0.9, "Nucleus sampling.", range=(0.0, 1.0))
    temperature: float = param(0.7, "Sampling temperature.", range=(0.0, 1.0))
    rotate_after_s: float = param(
        360.0,
        "Renew the Bedrock stream after this long, at a pause (limit is 8 min).",
        range=(1.0, 470.0),
    )
    rotate_deadline_s: float = param(450.0, "Renew by this age even mid-turn.", range=(1.0, 475.0))
    greeting: str = param(
        "",
        "Nova 2: text sent when a conversation starts so the robot speaks first (always_on: "
        "at start; else after a trigger listed in greet_on).",
    )
    tool_timeout_s: float = param(120.0, "Upper bound for any tool call.", range=(1.0, 3600.0))
    cancel_tools_on_barge_in: bool = param(
        False,
        "A barge-in flushes speech only; true also cancels running tools whose "
        "cancel_on_barge_in is unset (a tool's own cancel_on_barge_in always wins).",
    )
    speak_progress: bool = param(True, "Nova 2: speak rate-limited tool progress.")
    input_source: str = param(
        "auto",
        "auto (remote while a viewer is connected, else local), local or remote.",
        choices=("auto", "local", "remote"),
        live=True,
    )
    fill_silence: bool = param(
        True, "Stream silence when the input source stalls (keeps the stream alive)."
    )
    max_retries: int = param(
        5,
        "Consecutive Bedrock stream failures retried (exponential backoff with jitter) before "
        "the session stops with an error naming the cause.",
        range=(0, 100),
    )
    retry_cap_s: float = param(10.0, "Longest wait between two retries, s.", range=(0.5, 300.0))
    safety_stop_topic: str = param(
        "", "Topic of a local safety stop (e-stop, stop button); '' = none."
    )
    safety_stop_type: str = param(
        "std_msgs/msg/Empty",
        "Its type: std_msgs/msg/Empty (every message stops) or std_msgs/msg/Bool (true stops).",
        choices=("std_msgs/msg/Empty", "std_msgs/msg/Bool"),
    )
    safety_stop_service: str = param(
        "~/safety_stop", "std_srvs/srv/Trigger service of the local safety stop; '' = none."
    )
    tools_file: str = param("", "YAML tool declarations; '' = no tools.")
    locations_file: str = param("", "YAML named locations for navigation tools.")
    # ---- conversation lifecycle (docs/conversation-lifecycle.md)
    always_on: bool = param(
        False,
        "Keep a Bedrock stream open while active (the old behaviour); false = idle with no "
        "stream until someone engages, released after idle_timeout_s.",
    )
    check_on_start: bool = param(
        True,
        "Without always_on: open and close one stream at activation, so no model access or "
        "bad credentials fail at start rather than at the first visitor.",
    )
    engage_on_speech: bool = param(True, "Engage when the local VAD hears someone speak.")
    engage_on_viewer: bool = param(True, "Engage when a remote viewer joins (kvs/viewers > 0).")
    engage_on_text: bool = param(True, "Engage on a text_input or viewer chat line.")
    engage_services: bool = param(True, "Offer ~/engage and ~/release (std_srvs/Trigger).")
    presence_topic: str = param("", "Topic that engages (e.g. a person detector); '' = none.")
    presence_type: str = param("std_msgs/msg/Bool", "Message type of presence_topic.")
    presence_field: str = param(
        "data", "Field of it (dotted path) that is true or non-zero while someone is there."
    )
    release_on_absence: bool = param(False, "Release when presence_field turns false.")
    greet_on: list = param(  # noqa: RUF009 - param() is a dataclasses.field
        ["topic", "service", "viewer"],
        "Triggers after which the robot greets (with greeting): speech, topic, service, "
        "viewer, text. Someone who speaks first is answered, not greeted.",
    )
    goodbye: str = param("", "Nova 2: text sent before a release ('' = close at once).")
    idle_timeout_s: float = param(
        20.0, "Release after this long without speech (either side) and no running tool.",
        range=(1.0, 3600.0),
    )  # fmt: skip
    memory_s: float = param(
        60.0, "Keep a released conversation's history this long (0 = forget at once).",
        range=(0.0, 86400.0),
    )  # fmt: skip
    preroll_s: float = param(2.0, "Microphone audio kept while idle, s.", range=(0.5, 10.0))
    preroll_lead_s: float = param(
        0.3, "Audio sent from this long before the speech onset, s.", range=(0.0, 2.0)
    )
    vad_aggressiveness: int = param(3, "webrtcvad mode (3 = strictest).", range=(0, 3))
    vad_min_dbfs: float = param(-50.0, "Quieter audio is never speech.", range=(-90.0, 0.0))
    vad_snr_db: float = param(10.0, "Speech is this far above the noise floor.", range=(0.0, 40.0))
    vad_voiced_ms: int = param(180, "Voiced ms in vad_window_ms to engage.", range=(30, 2000))
    vad_window_ms: int = param(300, "VAD decision window, ms.", range=(30, 3000))
    echo_tail_s: float = param(
        0.5, "After the robot's own speech, the VAD stays deaf this long.", range=(0.0, 5.0)
    )
    price_speech_input: float = param(0.0034, "USD per 1000 speech input tokens.")
    price_speech_output: float = param(0.0136, "USD per 1000 speech output tokens.")
    price_text_input: float = param(0.00006, "USD per 1000 text input tokens.")
    price_text_output: float = param(0.00024, "USD per 1000 text output tokens.")


class _RosListener(SessionListener):
    """Session callbacks -> ROS topics (called on the loop; the conversation's own listener
    wraps it for the lifecycle's bookkeeping)."""

    def __init__(self, node: SonicSessionNode) -> None:
        self.node = node

    def on_audio(self, pcm: bytes) -> None:
        n = self.node
        if n._user_final_t is not None:
            # The model's response time as the robot sees it: the person's final transcript
            # (end of their turn) to the first audio of the answer.
            n.last_response_ms = (time.monotonic() - n._user_final_t) * 1000
            n._user_final_t = None
        n.out_pub.publish(out_cdr(pcm, n.out_epoch))  # serialized: ros/topics.py
        n.out_chunks += 1

    def on_interrupted(self) -> None:
        # A new epoch, announced in order on audio/out (chunks still in flight are dropped
        # by the players), then the fast path: audio/flush.
        n = self.node
        n.out_epoch += 1
        n.out_pub.publish(out_cdr(b"", n.out_epoch))
        n.flush_pub.publish(Empty())
        n.get_logger().info("barge-in: output flushed")

    def on_transcript(self, entry: dict[str, Any]) -> None:
        n = self.node
        n.transcript_pub.publish(json_msg(c.TRANSCRIPT, {"t": time.time(), **entry}))
        if entry.get("role") == "USER" and entry.get("stage") == "FINAL":
            n._user_final_t = time.monotonic()
        if entry.get("stage") == "FINAL":
            n.get_logger().info(f"{entry.get('role', '?')}: {entry.get('text', '')}")

    def on_state(self, state: str) -> None:
        self.node.publish_state(state)

    def on_usage(self, usage: dict[str, Any]) -> None:
        self.node.usage_pub.publish(json_msg(c.USAGE, usage))

    def on_tool_event(self, event: dict[str, Any]) -> None:
        self.node.tool_pub.publish(json_msg(c.TOOL_EVENTS, {"t": time.time(), **event}))

    def on_error(self, message: str, fatal: bool) -> None:
        n = self.node
        n.last_error = message
        if fatal:
            n.fail(message)
            n.publish_state("error")
        else:
            n.get_logger().warning(message)


class SonicSessionNode(VoiceNode):
    """Runs the Nova Sonic conversation for the robot."""

    Params = SessionParams
    stop_order = 0  # cancels its goals first

    def __init__(self, tool_provider_factory: Any = None, **kwargs: Any) -> None:
        super().__init__("sonic_session", **kwargs)
        # A factory (node -> ToolProvider) lets tests and benchmarks inject the provider; by
        # default the YAML-declared tools are loaded from tools_file.
        self._tool_factory = tool_provider_factory
        self.tools: Any = None
        self._viewers = 0
        self._state = "inactive"
        self.last_error = ""
        self.out_chunks = 0
        self.out_epoch = 0
        self.last_response_ms: float | None = None
        self._user_final_t: float | None = None
        self.mic_frames = 0
        self.safety_stops = 0
        self._ros: list[Any] = []
        self._present = False
        # The conversation lifecycle (sessions, phase machine, ledger, pre-roll): pure
        # asyncio, talks back through the ConversationHost methods below; configure()
        # applies the parameters.
        self.conversation = Conversation(self)
        self.state_pub = publisher(self, c.STATE)
        # Diagnostics from the start: an unconfigured node (bad file, no credentials) still
        # says why on /diagnostics.
        self.diag = Diagnostics(self, hardware_id="bedrock")
        self.diag.add("bedrock stream", self._diag_stream)
        self.diag.add("conversation", self._diag_conversation)
        self.publish_state("inactive")

    # ------------------------------------------------------------------ the conversation's parts
    # (read by tests, benchmarks, the demo and diagnostics)
    @property
    def session(self) -> SonicSession | None:
        return self.conversation.session

    @property
    def eng(self) -> eng.Engagement:
        return self.conversation.eng

    @property
    def ledger(self) -> eng.Ledger:
        return self.conversation.ledger

    @property
    def vad(self) -> VoiceActivity | None:
        return self.conversation.vad

    @property
    def preroll(self) -> eng.PreRoll:
        return self.conversation.preroll

    @property
    def preroll_frames_sent(self) -> int:
        return self.conversation.preroll_frames_sent

    @property
    def assistant_finals(self) -> int:
        return self.conversation.assistant_finals

    @property
    def _active(self) -> bool:
        return self.conversation.active

    # ------------------------------------------------------------------ ConversationHost
    def listener(self) -> SessionListener:
        return _RosListener(self)

    def publish_conversation(self, event: dict[str, Any]) -> None:
        self.conversation_pub.publish(json_msg(c.CONVERSATION, event))

    def publish_hourly(self, report: dict[str, Any]) -> None:
        if hasattr(self, "hourly_pub"):
            self.hourly_pub.publish(json_msg(c.USAGE_HOURLY, report))

    def log(self, message: str) -> None:
        self.get_logger().info(message)

    def start_failed(self, error: Exception) -> None:
        if not self.fatal_error:  # the listener has not said it already
            self.last_error = str(error)
            self.fail(f"Nova Sonic session could not start: {error}")

    # ------------------------------------------------------------------ settings
    def _session_config(self) -> SessionConfig:
        p = self.params
        prompt = p.system_prompt
        if p.system_prompt_file:
            path = resolve_config_path(p.system_prompt_file)
            try:
                prompt = path.read_text().strip()
            except OSError as e:
                raise ConfigError(f"system_prompt_file {path}: {e.strerror or e}") from None
        cfg = SessionConfig(
            model_id=p.model_id,
            voice_id=p.voice_id,
            system_prompt=prompt,
            language=p.language,
            endpointing=p.endpointing or None,
            max_tokens=p.max_tokens,
            top_p=p.top_p,
            temperature=p.temperature,
            rotate_after_s=p.rotate_after_s,
            rotate_deadline_s=p.rotate_deadline_s,
            greeting=p.greeting,
            tool_timeout_s=p.tool_timeout_s,
            cancel_tools_on_barge_in=p.cancel_tools_on_barge_in,
            speak_progress=p.speak_progress,
            max_retries=p.max_retries,
            retry_cap_s=p.retry_cap_s,
        )
        try:
            cfg.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        if p.goodbye and not cfg.nova2:
            raise ConfigError("goodbye (the robot says goodbye) needs Nova 2 cross-modal text")
        return cfg

    def _lifecycle_config(self) -> None:
        """The conversation lifecycle's settings (docs/conversation-lifecycle.md)."""
        p = self.params
        bad = [t for t in p.greet_on if t not in eng.TRIGGERS]
        if bad:
            raise ConfigError(
                f"greet_on: unknown trigger(s) {bad}; choose from {', '.join(eng.TRIGGERS)}"
            )
        cfg = eng.EngagementConfig(
            idle_timeout_s=p.idle_timeout_s,
            memory_s=p.memory_s,
            preroll_s=p.preroll_s,
            lead_s=p.preroll_lead_s,
        )
        vad = VadConfig(
            aggressiveness=p.vad_aggressiveness,
            min_dbfs=p.vad_min_dbfs,
            snr_db=p.vad_snr_db,
            voiced_ms=p.vad_voiced_ms,
            window_ms=p.vad_window_ms,
        )
        try:
            cfg.validate()
            vad.validate()
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.eng.config = cfg
        self.vad_config = vad
        self.ledger.prices = eng.Prices(
            speech_input=p.price_speech_input,
            speech_output=p.price_speech_output,
            text_input=p.price_text_input,
            text_output=p.price_text_output,
        )

    def _presence(self) -> list[Any]:
        """The presence topic's subscription (a person detector), checked: the type must
        import and the field must exist, else one line says which."""
        p = self.params
        if not p.presence_topic:
            return []
        try:
            pkg, kind, name = p.presence_type.split("/")
            msg_type = getattr(importlib.import_module(f"{pkg}.{kind}"), name)
        except (ValueError, ImportError, AttributeError):
            raise ConfigError(
                f"presence_type {p.presence_type!r}: not an importable message type "
                "(write it as package/msg/Name, e.g. std_msgs/msg/Bool)"
            ) from None
        try:
            _field_value(msg_type(), p.presence_field)
        except AttributeError:
            raise ConfigError(
                f"presence_field {p.presence_field!r}: {p.presence_type} has no such field"
            ) from None
        # Best effort takes both reliable and best-effort publishers (detectors often
        # publish as sensor data).
        qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.BEST_EFFORT)
        return [self.bridge.subscribe(self, msg_type, p.presence_topic, qos, self._on_presence)]

    def _bedrock_settings(self) -> BedrockSettings:
        p = self.params
        if not p.endpoint_uri and not REGION_RE.match(p.region):
            raise ConfigError(f"region {p.region!r} is not an AWS region name (e.g. us-east-1)")
        known = KNOWN_REGIONS.get(p.model_id)
        if not p.endpoint_uri and known and p.region not in known:
            self.get_logger().warning(
                f"{p.model_id} is known in {', '.join(known)}, not {p.region}: if the stream "
                "fails with access denied or not found, check the region (docs/aws-setup.md)"
            )
        if p.ca_bundle and not Path(p.ca_bundle).is_file():
            raise ConfigError(f"ca_bundle {p.ca_bundle}: no such file")
        return BedrockSettings(
            region=p.region,
            model_id=p.model_id,
            endpoint_uri=p.endpoint_uri or None,
            ca_bundle=p.ca_bundle or None,
            profile=p.aws_profile or None,
        )

    # ------------------------------------------------------------------ lifecycle
    def configure(self) -> None:
        """Validate settings and credentials, load tools, create topics."""
        self.config = self._session_config()
        self._lifecycle_config()
        self.bedrock = self._bedrock_settings()
        if not have_credentials(self.params.aws_profile or None):
            raise ConfigError(
                "no AWS credentials found (environment, ~/.aws profile, SSO or "
                "credential_process); see docs/aws-setup.md, or run `sonic-voice` without "
                "credentials for the offline demo"
            )
        presence = self._presence()
        self.tools = self._make_tools()
        p = self.params
        self.conversation.config = ConversationConfig(
            session=self.config,
            bedrock=self.bedrock,
            always_on=p.always_on,
            check_on_start=p.check_on_start,
            engage_on_speech=p.engage_on_speech,
            greet_on=tuple(p.greet_on),
            goodbye=p.goodbye,
            fill_silence=p.fill_silence,
            echo_tail_s=p.echo_tail_s,
            preroll_s=p.preroll_s,
            vad=self.vad_config,
        )
        self.conversation.tools = self.tools
        self.out_pub = publisher(self, c.OUT)
        self.flush_pub = publisher(self, c.FLUSH)
        self.transcript_pub = publisher(self, c.TRANSCRIPT)
        self.usage_pub = publisher(self, c.USAGE)
        self.tool_pub = publisher(self, c.TOOL_EVENTS)
        self.hourly_pub = publisher(self, c.USAGE_HOURLY)
        self.conversation_pub = publisher(self, c.CONVERSATION)
        b = self.bridge
        self._ros = [
            self.out_pub,
            self.flush_pub,
            self.transcript_pub,
            self.usage_pub,
            self.tool_pub,
            self.hourly_pub,
            self.conversation_pub,
            b.subscribe(self, UInt8MultiArray, c.MIC.name, _qos(c.MIC), self._audio_local, True),
            b.subscribe(
                self, UInt8MultiArray, c.REMOTE.name, _qos(c.REMOTE), self._audio_remote, True
            ),
            subscription(self, c.VIEWERS, self._on_viewers),
            b.subscribe(self, String, c.TEXT_INPUT.name, _qos(c.TEXT_INPUT), self._on_text),
            b.subscribe(self, String, c.VIEWER_TEXT.name, _qos(c.VIEWER_TEXT), self._on_text),
            *presence,
        ]
        if self.params.engage_services:
            self._ros += [
                self.create_service(Trigger, c.ENGAGE_SERVICE, self._srv_engage),
                self.create_service(Trigger, c.RELEASE_SERVICE, self._srv_release),
            ]
        self._ros += self._safety_stop_entities()
        self.publish_state("idle")

    # ------------------------------------------------------------------ safety stop
    def _safety_stop_entities(self) -> list[Any]:
        """The local safety stop: a topic and/or a Trigger service that cancel every
        running tool that moves the robot, with no model involved (issue 15)."""
        p, out = self.params, []
        if p.safety_stop_topic:
            from rclpy.qos import QoSProfile, ReliabilityPolicy

            if p.safety_stop_type.endswith("/Bool"):
                from std_msgs.msg import Bool as msg_cls
            else:
                msg_cls = Empty
            qos = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
            # On the executor thread, not the loop: the cancel requests go out from there.
            on_msg = self._on_safety_stop_msg
            out.append(self.create_subscription(msg_cls, p.safety_stop_topic, on_msg, qos))
        if p.safety_stop_service:
            from std_srvs.srv import Trigger

            out.append(
                self.create_service(Trigger, p.safety_stop_service, self._on_safety_stop_srv)
            )
        return out

    def _on_safety_stop_msg(self, msg: Any) -> None:
        """Executor thread: a safety stop message (a Bool false releases nothing: ignored)."""
        if getattr(msg, "data", True) is False:
            return
        self.safety_stop("topic")

    def _on_safety_stop_srv(self, _req: Any, resp: Any) -> Any:
        """Executor thread: stop, then answer at once (never waits on the loop)."""
        n = self.safety_stop("service")
        resp.success = self.tools is not None
        resp.message = (
            f"safety stop: cancelling {n} running motion(s)"
            if self.tools is not None
            else "no tools configured"
        )
        return resp

    def safety_stop(self, source: str) -> int:
        """Any thread: cancel every running call that moves the robot, at once (the cancel
        requests leave from this thread). Each one's toolResult tells the model it was
        stopped by the safety stop. Returns how many."""
        self.safety_stops += 1
        tools = self.tools
        if tools is None or not hasattr(tools, "stop_motion"):
            return 0
        n = tools.stop_motion(SAFETY_REASON)
        self.get_logger().warning(f"safety stop ({source}): cancelling {n} running motion(s)")
        return n

    def on_config_failed(self) -> None:
        self.publish_state("error")

    def _make_tools(self) -> Any:
        if self._tool_factory is not None:
            return self._tool_factory(self)
        if not self.params.tools_file:
            return None
        from sonic_voice.tools import ToolConfigError, load_provider

        tools_file = resolve_config_path(self.params.tools_file)
        locations = self.params.locations_file
        try:
            return load_provider(
                self, str(tools_file), str(resolve_config_path(locations)) if locations else None
            )
        except (ToolConfigError, OSError) as e:
            raise ConfigError(str(e)) from None

    def activate(self) -> None:
        """always_on: open the conversation on the loop; else wait for someone, idle."""
        self.last_error = ""
        self.conversation.activate(self.bridge.submit, self.bridge.call)

    async def stop(self) -> None:
        """Running goals cancelled first, then the stream closed politely."""
        await self.conversation.stop()

    def release(self) -> None:
        if self.tools is not None and hasattr(self.tools, "shutdown"):
            with contextlib.suppress(Exception):
                self.tools.shutdown()
            self.tools = None
        self.conversation.tools = None
        self.diag.close()

    # ------------------------------------------------------------------ lifecycle of a conversation
    def _engage(self, trigger: str) -> None:
        """On the loop: a trigger fired (viewer, topic, service)."""
        self.conversation.engage(trigger)

    def _release(self, reason: str) -> None:
        """On the loop: a release (service, absence)."""
        self.conversation.release(reason)

    # ------------------------------------------------------------------ ROS -> loop
    def _active_source(self) -> str:
        src = self.params.input_source
        if src == "auto":
            return "remote" if self._viewers > 0 else "local"
        return src

    def _audio_local(self, msg: UInt8MultiArray) -> None:
        self._on_audio(msg, "local")

    def _audio_remote(self, msg: UInt8MultiArray) -> None:
        self._on_audio(msg, "remote")

    def _on_audio(self, msg: UInt8MultiArray, source: str) -> None:
        """On the loop: one frame from the active source into the session (conversing) or
        the pre-roll and the VAD (idle)."""
        if source != self._active_source() or not self._active:
            return
        pcm = msg_bytes(msg)
        self.mic_frames += 1
        self.conversation.push_audio(pcm)

    def _on_viewers(self, msg: Int32) -> None:
        if msg.data != self._viewers:
            self.get_logger().info(f"viewers connected: {msg.data}")
            joined = msg.data > self._viewers
            self._viewers = msg.data
            self.publish_state(self._state)  # the state carries source and viewer count
            if joined and self.params.engage_on_viewer:
                self.bridge.call(self._engage, "viewer")

    def _on_presence(self, msg: Any) -> None:
        """On the loop: the presence topic (engages on its rising edge)."""
        try:
            present = bool(_field_value(msg, self.params.presence_field))
        except AttributeError:
            return
        was, self._present = self._present, present
        if present and not was:
            self._engage("topic")
        elif was and not present and self.params.release_on_absence:
            self._release("absence")

    def _srv_engage(self, request: Any, response: Any) -> Any:
        """``~/engage`` (executor thread): ask the loop; answer with the phase it was in."""
        return self._phase_request("engage", self._engage, response)

    def _srv_release(self, request: Any, response: Any) -> Any:
        """``~/release`` (executor thread), as ``~/engage``."""
        return self._phase_request("release", self._release, response)

    def _phase_request(self, verb: str, act: Any, response: Any) -> Any:
        response.success = self._active and not self.params.always_on
        response.message = (
            f"{verb} requested (was {self.eng.phase})"
            if response.success
            else ("always_on: the conversation is always open" if self._active else "inactive")
        )
        if response.success:
            self.bridge.call(act, "service")
        return response

    def _on_text(self, msg: String) -> None:
        """On the loop: a text line for the model (``text_input``, a viewer's chat)."""
        try:
            text = c.text_input(msg.data)
        except c.ContractError as e:
            self.get_logger().warning(f"text input ignored: {e}")
            return
        if not text or not self._active:
            return
        if not self.config.nova2:
            self.get_logger().warning(f"{self.config.model_id} takes no text input; ignored")
            return
        session = self.session
        if self.params.always_on:
            if session is not None:
                self.bridge.submit(self.conversation.send_text(session, text))
            return
        self.conversation.text(text, self.params.engage_on_text)

    # ------------------------------------------------------------------ status
    def _diag_stream(self) -> DiagStatus:
        """Bedrock stream health for /diagnostics."""
        s = self.session
        values: dict[str, Any] = {
            "state": self._state,
            "engagement": self._engagement(),
            "model": self.params.model_id,
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
                results_held=s.results_held,
                safety_stops=self.safety_stops,
                frames_sent=s.frames_pushed,
                frames_dropped=s.frames_dropped,
            )
        if self.fatal_error:
            return DiagStatus(ERROR, self.fatal_error, values)
        if self.config_error:
            return DiagStatus(ERROR, self.config_error, values)
        if s is None:
            if self._active and not self.params.always_on:
                return DiagStatus(OK, "idle: no stream until someone engages", values)
            return DiagStatus(WARN, "no conversation (inactive)", values)
        if self._state == "connecting":
            return DiagStatus(
                WARN, f"connecting ({self.last_error or 'opening the stream'})", values
            )
        return DiagStatus(OK, self._state, values)

    def _diag_conversation(self) -> DiagStatus:
        """The conversation lifecycle and this hour's usage for /diagnostics."""
        hour = self.ledger.hour_report()
        values: dict[str, Any] = {
            "engagement": self._engagement(),
            "trigger": self.eng.trigger if self.eng.phase != eng.IDLE else "",
            "idle_s": round(self.eng.idle_for(), 1) if self.eng.phase == eng.CONVERSING else 0,
            "tools_running": self.eng.tools_running,
            "memory_messages": len(self.eng.memory.history) if self.eng.memory else 0,
            "preroll_chunks_sent": self.preroll_frames_sent,
            **{f"hour_{k}": v for k, v in hour.items()},
        }
        last = self.conversation.last_conversation
        if last:
            values.update({f"last_{k}": v for k, v in last.items()})
        return DiagStatus(OK, f"{self._engagement()}; ~${hour['cost_usd']:.4f} this hour", values)

    def _engagement(self) -> str:
        if self.params.always_on or not self._active:
            return "off"
        return self.eng.phase

    def publish_state(self, state: str | None = None) -> None:
        """Publish ``state`` on ``state`` (``None``: the current one again, e.g. the
        engagement phase changed)."""
        if state is None:
            if not hasattr(self, "state_pub"):
                return
            state = self._state
        self._state = state
        error = (
            (self.fatal_error or self.last_error or self.config_error) if state == "error" else ""
        )
        payload = {
            "state": state,
            "source": self._active_source(),
            "viewers": self._viewers,
            "error": error,
            "engagement": self._engagement(),
        }
        if payload["engagement"] not in ("off", eng.IDLE):
            payload["trigger"] = self.eng.trigger
        self.state_pub.publish(json_msg(c.STATE, payload))


def _field_value(msg: Any, path: str) -> Any:
    value = msg
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _qos(topic: c.Topic) -> Any:
    from sonic_voice.ros.topics import qos

    return qos(topic.qos)


def main(args: list[str] | None = None) -> None:
    run_node(SonicSessionNode, args)


if __name__ == "__main__":
    main()
