"""Nova Sonic input-event builders and output-event parsers (v1 and Nova 2).

Shapes follow the protocol reference (shared/reference/nova-sonic-protocol.md §3-4): every
event is ``{"event": {"<name>": {...}}}``. Builders return the JSON *bytes* the transport
sends; the parser returns small typed records and never raises on unknown events (they
come back as :class:`Unknown` and are logged at debug level by the session).
"""

from __future__ import annotations

import base64
import json
import logging
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

NOVA_SONIC_V1 = "amazon.nova-sonic-v1:0"
NOVA_2_SONIC = "amazon.nova-2-sonic-v1:0"
ENDPOINTING = ("HIGH", "MEDIUM", "LOW")
V1_VOICES = frozenset(
    "tiffany matthew amy ambre florian beatrice lorenzo greta lennart lupe carlos".split()
)
V2_VOICES = frozenset(
    "tiffany matthew amy olivia kiara arjun ambre florian beatrice lorenzo tina lennart lupe "
    "carlos carolina leo".split()
)


def is_nova2(model_id: str) -> bool:
    """Nova 2 (and later) adds cross-modal text, endpointing control and async tools."""
    return "nova-sonic-v1" not in model_id


def _ev(name: str, body: dict[str, Any]) -> bytes:
    return json.dumps({"event": {name: body}}, ensure_ascii=False, separators=(",", ":")).encode()


# --------------------------------------------------------------------------- input events
def session_start(
    max_tokens: int = 1024,
    top_p: float = 0.9,
    temperature: float = 0.7,
    endpointing: str | None = None,
) -> bytes:
    """``endpointing`` (Nova 2 only; never sent to v1): HIGH, MEDIUM or LOW."""
    body: dict[str, Any] = {
        "inferenceConfiguration": {
            "maxTokens": max_tokens,
            "topP": top_p,
            "temperature": temperature,
        }
    }
    if endpointing:
        if endpointing not in ENDPOINTING:
            raise ValueError(f"endpointing must be one of {ENDPOINTING}, not {endpointing!r}")
        body["turnDetectionConfiguration"] = {"endpointingSensitivity": endpointing}
    return _ev("sessionStart", body)


def prompt_start(
    prompt_name: str,
    voice_id: str,
    output_rate: int = 24000,
    tools: list[dict[str, Any]] | None = None,
) -> bytes:
    body: dict[str, Any] = {
        "promptName": prompt_name,
        "textOutputConfiguration": {"mediaType": "text/plain"},
        "audioOutputConfiguration": {
            "mediaType": "audio/lpcm",
            "sampleRateHertz": output_rate,
            "sampleSizeBits": 16,
            "channelCount": 1,
            "voiceId": voice_id,
            "encoding": "base64",
            "audioType": "SPEECH",
        },
    }
    if tools:
        body["toolUseOutputConfiguration"] = {"mediaType": "application/json"}
        body["toolConfiguration"] = {"tools": tools}
    return _ev("promptStart", body)


def text_content_start(prompt_name: str, content_name: str, role: str, interactive: bool) -> bytes:
    return _ev(
        "contentStart",
        {
            "promptName": prompt_name,
            "contentName": content_name,
            "type": "TEXT",
            "interactive": interactive,
            "role": role,
            "textInputConfiguration": {"mediaType": "text/plain"},
        },
    )


def audio_content_start(prompt_name: str, content_name: str, rate: int = 16000) -> bytes:
    return _ev(
        "contentStart",
        {
            "promptName": prompt_name,
            "contentName": content_name,
            "type": "AUDIO",
            "interactive": True,
            "role": "USER",
            "audioInputConfiguration": {
                "mediaType": "audio/lpcm",
                "sampleRateHertz": rate,
                "sampleSizeBits": 16,
                "channelCount": 1,
                "audioType": "SPEECH",
                "encoding": "base64",
            },
        },
    )


def tool_content_start(prompt_name: str, content_name: str, tool_use_id: str) -> bytes:
    return _ev(
        "contentStart",
        {
            "promptName": prompt_name,
            "contentName": content_name,
            "interactive": False,
            "type": "TOOL",
            "role": "TOOL",
            "toolResultInputConfiguration": {
                "toolUseId": tool_use_id,
                "type": "TEXT",
                "textInputConfiguration": {"mediaType": "text/plain"},
            },
        },
    )


def text_input(prompt_name: str, content_name: str, text: str) -> bytes:
    return _ev(
        "textInput", {"promptName": prompt_name, "contentName": content_name, "content": text}
    )


def audio_input(prompt_name: str, content_name: str, pcm: bytes) -> bytes:
    # Built by hand: this runs ~31 times a second and base64 output needs no JSON escaping.
    b64 = base64.b64encode(pcm).decode("ascii")
    head = f'{{"event":{{"audioInput":{{"promptName":{json.dumps(prompt_name)},'
    return (f'{head}"contentName":{json.dumps(content_name)},"content":"{b64}"}}}}}}').encode()


def tool_result(prompt_name: str, content_name: str, result: dict[str, Any]) -> bytes:
    """``content`` is stringified JSON (plain strings cause "Tool Response parsing error")."""
    return _ev(
        "toolResult",
        {
            "promptName": prompt_name,
            "contentName": content_name,
            "content": json.dumps(result, ensure_ascii=False),
        },
    )


def content_end(prompt_name: str, content_name: str) -> bytes:
    return _ev("contentEnd", {"promptName": prompt_name, "contentName": content_name})


def prompt_end(prompt_name: str) -> bytes:
    return _ev("promptEnd", {"promptName": prompt_name})


def session_end() -> bytes:
    return _ev("sessionEnd", {})


def split_utf8(text: str, max_bytes: int) -> list[str]:
    """Split text into pieces of at most ``max_bytes`` UTF-8 bytes, never inside a character."""
    out, cur, size = [], [], 0
    for ch in text:
        n = len(ch.encode())
        if size + n > max_bytes and cur:
            out.append("".join(cur))
            cur, size = [], 0
        cur.append(ch)
        size += n
    if cur:
        out.append("".join(cur))
    return out or [""]


def tool_spec(name: str, description: str, schema: dict[str, Any]) -> dict[str, Any]:
    """A promptStart tool entry; the schema goes as a JSON *string* (proven on v1 and v2)."""
    return {
        "toolSpec": {
            "name": name,
            "description": description,
            "inputSchema": {"json": json.dumps(schema, ensure_ascii=False)},
        }
    }


# -------------------------------------------------------------------------- output events
@dataclass
class CompletionStart:
    completion_id: str
    session_id: str = ""


@dataclass
class ContentStart:
    content_id: str
    type: str  # TEXT | AUDIO | TOOL
    role: str  # USER | ASSISTANT | TOOL
    stage: str | None = None  # SPECULATIVE | FINAL (TEXT only)


@dataclass
class TextOutput:
    content_id: str
    role: str
    text: str
    interrupted: bool = False  # the barge-in marker {"interrupted": true}


@dataclass
class AudioOutput:
    content_id: str
    pcm: bytes


@dataclass
class ToolUseEvent:
    content_id: str
    tool_use_id: str
    name: str
    input: dict[str, Any]
    raw: str
    error: str = ""  # arguments that could not be decoded into an object


@dataclass
class ContentEnd:
    content_id: str
    type: str
    stop_reason: str  # PARTIAL_TURN | END_TURN | INTERRUPTED | TOOL_USE


@dataclass
class CompletionEnd:
    completion_id: str
    stop_reason: str


@dataclass
class Usage:
    total_input_tokens: int
    total_output_tokens: int
    total_tokens: int
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class Unknown:
    name: str
    body: Any


OutputEvent = (
    CompletionStart
    | ContentStart
    | TextOutput
    | AudioOutput
    | ToolUseEvent
    | ContentEnd
    | CompletionEnd
    | Usage
    | Unknown
)


def decode_tool_input(raw: Any) -> tuple[dict[str, Any], str]:
    """Tool arguments arrive as a JSON string, sometimes encoded twice; unwrap up to twice.

    Returns (arguments, error); error is "" when the result is a JSON object.
    """
    value = raw
    for _ in range(3):
        if isinstance(value, dict):
            return value, ""
        if not isinstance(value, str):
            break
        if not value.strip():
            return {}, ""
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            return {}, f"tool arguments are not valid JSON ({e.msg} at position {e.pos})"
        except RecursionError:
            return {}, "tool arguments are nested too deeply"
    return {}, f"tool arguments must be a JSON object, got {type(value).__name__}"


def is_interruption(text: str) -> bool:
    """The barge-in marker arrives as textOutput content ``{ "interrupted" : true }``."""
    t = text.strip()
    if not (t.startswith("{") and "interrupted" in t):
        return False
    try:
        return json.loads(t).get("interrupted") is True
    except (json.JSONDecodeError, AttributeError, RecursionError):
        return False


class BadOutputEvent(ValueError):
    """An output event that is not what the protocol says (the reason names the field)."""


def _str(body: dict[str, Any], key: str, name: str, default: str = "") -> str:
    v = body.get(key, default)
    if v is None:
        return default
    if not isinstance(v, str):
        raise BadOutputEvent(f"{name}.{key} must be a string, not {type(v).__name__}")
    return v


def _count(body: dict[str, Any], key: str) -> int:
    v = body.get(key, 0)
    if v is None:
        return 0
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v < 2**63:
        raise BadOutputEvent(f"usageEvent.{key} must be a non-negative number, not {v!r:.40}")
    return int(v)


def parse_output(raw: bytes | str) -> OutputEvent:
    """Parse one output event's JSON.

    Unknown events come back as :class:`Unknown`; a known event with a field of the wrong
    type or undecodable JSON/base64 raises :class:`BadOutputEvent` (a ValueError) naming
    the field, so the session logs it once and drops it (fuzzed in test_sonic_fuzz.py).
    """
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise BadOutputEvent(f"not JSON: {str(e)[:80]}") from None
    event = doc.get("event", doc) if isinstance(doc, dict) else {}
    if not isinstance(event, dict) or not event:
        return Unknown("", doc)
    name, body = next(iter(event.items()))
    if not isinstance(body, dict):
        return Unknown(name, body)
    cid = _str(body, "contentId", name)
    if name == "audioOutput":
        content = _str(body, "content", name)
        try:
            pcm = base64.b64decode(content, validate=True)
        except ValueError:
            raise BadOutputEvent("audioOutput.content is not valid base64") from None
        if len(pcm) % 2:
            raise BadOutputEvent("audioOutput.content is not whole 16-bit samples")
        return AudioOutput(cid, pcm)
    if name == "textOutput":
        text = _str(body, "content", name)
        return TextOutput(cid, _str(body, "role", name), text, is_interruption(text))
    if name == "contentStart":
        stage = None
        extra = body.get("additionalModelFields")
        if isinstance(extra, str) and extra:
            try:
                fields = json.loads(extra)
            except (ValueError, RecursionError):
                fields = None
            stage = fields.get("generationStage") if isinstance(fields, dict) else None
        elif isinstance(extra, dict):
            stage = extra.get("generationStage")
        if stage is not None and not isinstance(stage, str):
            stage = None
        return ContentStart(cid, _str(body, "type", name), _str(body, "role", name), stage)
    if name == "contentEnd":
        return ContentEnd(cid, _str(body, "type", name), _str(body, "stopReason", name))
    if name == "toolUse":
        raw_args = body.get("content", "")
        args, err = decode_tool_input(raw_args)
        return ToolUseEvent(
            cid,
            _str(body, "toolUseId", name),
            _str(body, "toolName", name),
            args,
            raw_args if isinstance(raw_args, str) else json.dumps(raw_args),
            err,
        )
    if name == "completionStart":
        return CompletionStart(_str(body, "completionId", name), _str(body, "sessionId", name))
    if name == "completionEnd":
        return CompletionEnd(_str(body, "completionId", name), _str(body, "stopReason", name))
    if name == "usageEvent":
        details = body.get("details", {}) or {}
        return Usage(
            _count(body, "totalInputTokens"),
            _count(body, "totalOutputTokens"),
            _count(body, "totalTokens"),
            details if isinstance(details, dict) else {},
        )
    return Unknown(name, body)
