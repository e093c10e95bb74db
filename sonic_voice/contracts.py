"""Every inter-node topic of sonic_voice: name, type, rate, QoS and JSON message shape.

Defined once, here, and used on both ends: a publisher builds its message with
:func:`encode` and a subscriber reads it with :func:`decode`, both validating against the
same JSON Schema (the ``jsonschema`` library), so two nodes can never disagree about a
format again (the viewer chat once reached nobody: ``kvs_webrtc`` sent ``{"text",
"viewer"}`` while ``sonic_session`` wanted ``"type": "text"``).
``test/test_contracts.py`` runs the real publisher node against the real subscriber node
for each JSON topic.

Pure data: no rclpy here (``audio/``, ``sonic/`` and ``kvs/`` may import it);
:mod:`sonic_voice.ros.qos` turns the QoS rows into ``QoSProfile`` objects.

Audio topics carry raw PCM16LE mono in ``std_msgs/msg/UInt8MultiArray`` (no standard
audio message ships with core ROS 2); ``audio/out`` chunks carry the answer's epoch in the
layout's one dimension label (``epoch:<n>``, see ``sonic_voice.ros.audio``).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fastjsonschema
import jsonschema

MIC_RATE = 16000  # audio/mic and audio/remote, Hz (what Nova Sonic takes)
OUT_RATE = 24000  # audio/out, Hz (what Nova Sonic speaks)
MIC_BLOCK_MS = 32.0


@dataclass(frozen=True)
class Qos:
    """A QoS row: depth, reliable?, latched (transient local)?"""

    depth: int
    reliable: bool = True
    latched: bool = False


# Audio: reliable (a lost block is speech the model never hears) and deep enough for
# seconds of burst output; volatile, since stale audio is worse than none.
AUDIO = Qos(depth=200)
# Events (flush, transcript, tool events): reliable, small.
EVENTS = Qos(depth=50)
# The latest value for late joiners (state, viewer count): a dashboard or a viewer that
# arrives after the robot still sees it.
LATCHED = Qos(depth=1, latched=True)


@dataclass(frozen=True)
class Topic:
    """One topic: its (relative) name, ROS type, QoS, and JSON schema when it is JSON."""

    name: str
    type: str
    qos: Qos
    doc: str
    schema: dict[str, Any] | None = None


_str = {"type": "string"}
_num = {"type": "number"}
_int = {"type": "integer", "minimum": 0}

TRANSCRIPT_SCHEMA = {
    "type": "object",
    "properties": {
        "t": _num,
        "role": {"enum": ["USER", "ASSISTANT", "SYSTEM", "TOOL"]},
        "stage": {"enum": ["FINAL", "SPECULATIVE"]},
        "text": _str,
        "language": _str,
        "interactive": {"type": "boolean"},
    },
    "required": ["role", "stage", "text"],
}
STATES = (
    "inactive",
    "idle",
    "connecting",
    "listening",
    "thinking",
    "speaking",
    "acting",
    "error",
)
ENGAGEMENT_PHASES = ("off", "idle", "engaging", "conversing", "closing")
STATE_SCHEMA = {
    "type": "object",
    "properties": {
        "state": {"enum": list(STATES)},
        "source": {"enum": ["local", "remote"]},
        "viewers": _int,
        "error": _str,
        # The conversation lifecycle (docs/conversation-lifecycle.md), optional for older
        # publishers: "off" (always-on mode or inactive), idle (no Bedrock stream), engaging,
        # conversing, closing; and what engaged it (speech, topic, service, viewer, text).
        "engagement": {"enum": list(ENGAGEMENT_PHASES)},
        "trigger": _str,
    },
    "required": ["state", "source", "viewers", "error"],
}
TOOL_EVENT_SCHEMA = {
    "type": "object",
    "properties": {
        "t": _num,
        "event": {"enum": ["start", "progress", "result"]},
        "tool": _str,
        "tool_use_id": _str,
        "input": {},
        "text": _str,
        "data": {"type": "object"},
        "status": _str,
        "result": {},
    },
    "required": ["event", "tool", "tool_use_id"],
    "allOf": [
        {"if": {"properties": {"event": {"const": "result"}}}, "then": {"required": ["status"]}}
    ],
}
USAGE_SCHEMA = {
    "type": "object",
    "properties": {
        "input_tokens": _int,
        "output_tokens": _int,
        "total_tokens": _int,
        "details": {},
    },
    "required": ["input_tokens", "output_tokens", "total_tokens"],
}
_figures = {
    "conversations": _int,
    "streamed_s": _num,
    "speech_input": _int,
    "text_input": _int,
    "speech_output": _int,
    "text_output": _int,
    "input_tokens": _int,
    "output_tokens": _int,
    "cost_usd": _num,
}
USAGE_HOURLY_SCHEMA = {
    "type": "object",
    "properties": {"hour": _str, **_figures},
    "required": ["hour", "conversations", "streamed_s", "input_tokens", "output_tokens",
                 "cost_usd"],
}  # fmt: skip
CONVERSATION_SCHEMA = {
    "type": "object",
    "properties": {
        "t": _num,
        "event": {"enum": ["engaged", "released"]},
        "trigger": _str,
        "reason": _str,
        "memory": _int,
        **_figures,
    },
    "required": ["t", "event", "trigger"],
}
VIEWER_TEXT_SCHEMA = {
    "type": "object",
    "properties": {
        "type": {"const": "text"},
        "text": {"type": "string", "minLength": 1, "pattern": r"\S"},
        "viewer": _str,
    },
    "required": ["type", "text"],
}

AUDIO_IO_STATE_SCHEMA = {
    "type": "object",
    "properties": {
        "lifecycle": {"enum": ["inactive", "active"]},
        "input": _str,
        "output": _str,
        "input_error": _str,
        "output_error": _str,
        "queued_ms": _num,
        "mic_blocks": _int,
    },
    "required": ["lifecycle", "input", "output"],
}

MIC = Topic("audio/mic", "std_msgs/msg/UInt8MultiArray", AUDIO, "robot microphone, 16 kHz")
REMOTE = Topic(
    "audio/remote", "std_msgs/msg/UInt8MultiArray", AUDIO, "viewers' speech mixed, 16 kHz"
)
OUT = Topic("audio/out", "std_msgs/msg/UInt8MultiArray", AUDIO, "what the robot says, 24 kHz")
FLUSH = Topic("audio/flush", "std_msgs/msg/Empty", EVENTS, "drop queued output now")
TRANSCRIPT = Topic("transcript", "std_msgs/msg/String", EVENTS, "who said what", TRANSCRIPT_SCHEMA)
STATE = Topic("state", "std_msgs/msg/String", LATCHED, "conversation state", STATE_SCHEMA)
TOOL_EVENTS = Topic(
    "tool_events", "std_msgs/msg/String", EVENTS, "tool start/progress/result", TOOL_EVENT_SCHEMA
)
USAGE = Topic("usage", "std_msgs/msg/String", EVENTS, "token usage per turn", USAGE_SCHEMA)
VIEWER_TEXT = Topic(
    "kvs/viewer_text", "std_msgs/msg/String", EVENTS, "a viewer's chat line", VIEWER_TEXT_SCHEMA
)
TEXT_INPUT = Topic(
    "text_input",
    "std_msgs/msg/String",
    EVENTS,
    "text for the model: plain text, or the viewer-text JSON shape",
    VIEWER_TEXT_SCHEMA,
)
VIEWERS = Topic("kvs/viewers", "std_msgs/msg/Int32", LATCHED, "viewers connected")
USAGE_HOURLY = Topic(
    "usage/hourly",
    "std_msgs/msg/String",
    LATCHED,
    "streamed seconds, tokens and estimated cost of the current clock hour",
    USAGE_HOURLY_SCHEMA,
)
CONVERSATION = Topic(
    "conversation",
    "std_msgs/msg/String",
    EVENTS,
    "a conversation engaged (trigger, history replayed) or released (its figures)",
    CONVERSATION_SCHEMA,
)
# Services of sonic_session (std_srvs/srv/Trigger), private to the node: a touch screen or
# a button engages and releases the conversation.
ENGAGE_SERVICE = "~/engage"
RELEASE_SERVICE = "~/release"
AUDIO_IO_STATE = Topic(
    "audio_io/state", "std_msgs/msg/String", LATCHED, "devices, queue", AUDIO_IO_STATE_SCHEMA
)

ALL = (
    MIC,
    REMOTE,
    OUT,
    FLUSH,
    TRANSCRIPT,
    STATE,
    TOOL_EVENTS,
    USAGE,
    VIEWER_TEXT,
    TEXT_INPUT,
    VIEWERS,
    AUDIO_IO_STATE,
    USAGE_HOURLY,
    CONVERSATION,
)


class ContractError(ValueError):
    """A message that does not match its topic's contract; ``str()`` says why."""


_validators: dict[str, jsonschema.protocols.Validator] = {}
# The same schemas compiled to Python by fastjsonschema: ~5 us a message where jsonschema's
# validator takes ~190 us (its generic walk and reference resolution); every JSON message is
# checked where it is published and where it is read, tens a second in a conversation.
# jsonschema still names what is wrong in a message that fails (best_match, its wording);
# test_contracts checks both accept and refuse the same payloads.
_fast: dict[str, Callable[[Any], Any]] = {}


def _validator(topic: Topic) -> Any:
    v = _validators.get(topic.name)
    if v is None:
        assert topic.schema is not None, f"{topic.name} is not a JSON topic"
        cls = jsonschema.validators.validator_for(topic.schema)
        v = _validators[topic.name] = cls(topic.schema)
    return v


def _fast_validator(topic: Topic) -> Callable[[Any], Any]:
    v = _fast.get(topic.name)
    if v is None:
        assert topic.schema is not None, f"{topic.name} is not a JSON topic"
        v = _fast[topic.name] = fastjsonschema.compile(topic.schema)
    return v


def check(topic: Topic, payload: Any) -> dict[str, Any]:
    """``payload`` if it matches ``topic``'s schema, else :class:`ContractError`."""
    try:
        _fast_validator(topic)(payload)
        return payload
    except fastjsonschema.JsonSchemaException:
        pass  # say why in jsonschema's words
    err = jsonschema.exceptions.best_match(_validator(topic).iter_errors(payload))
    if err is not None:
        where = "/".join(str(p) for p in err.absolute_path) or "message"
        raise ContractError(f"{topic.name}: {where}: {err.message}")
    return payload


def encode(topic: Topic, payload: dict[str, Any]) -> str:
    """The JSON text to publish on ``topic`` (validated: a bug here is ours, so it raises)."""
    return json.dumps(check(topic, payload), ensure_ascii=False, separators=(",", ":"))


def decode(topic: Topic, data: str) -> dict[str, Any]:
    """A received message of ``topic`` as a dict, or :class:`ContractError` saying why."""
    try:
        payload = json.loads(data)
    except ValueError as e:
        raise ContractError(f"{topic.name}: not JSON ({e})") from None
    return check(topic, payload)


def text_input(data: str) -> str:
    """The text of a ``text_input`` / ``kvs/viewer_text`` message: plain text (for
    ``ros2 topic pub``), or the viewer-text JSON shape; '' when it holds no words."""
    stripped = data.strip()
    if stripped.startswith("{"):
        return decode(VIEWER_TEXT, stripped)["text"].strip()
    return stripped


def viewer_text(text: str, viewer: str) -> str:
    """What ``kvs_webrtc`` publishes on ``kvs/viewer_text`` for a viewer's chat line."""
    return encode(VIEWER_TEXT, {"type": "text", "text": text, "viewer": viewer})
