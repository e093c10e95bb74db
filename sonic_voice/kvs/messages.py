"""What may travel on a viewer's data channel.

Out (robot -> viewers): JSON objects the robot chooses (transcripts, state).
In (viewer -> robot): only the small set below, each validated by its JSON Schema. Anything
else is rejected with a reason, so a viewer can never inject raw Nova Sonic events or tool
results.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema

TEXT_MAX_CHARS = 2000


def inbound_schemas(text_max_chars: int = TEXT_MAX_CHARS) -> dict[str, dict[str, Any]]:
    """Schema per accepted ``type``: chat text (Nova 2 text turns) and mute/unmute."""
    flag = {
        "type": "object",
        "properties": {"type": {"type": "string"}},
        "required": ["type"],
        "additionalProperties": False,
    }
    return {
        "text": {
            "type": "object",
            "properties": {
                "type": {"const": "text"},
                "text": {
                    "type": "string",
                    "minLength": 1,
                    "maxLength": text_max_chars,
                    "pattern": r"\S",
                },
            },
            "required": ["type", "text"],
            "additionalProperties": False,
        },
        "mute": flag,
        "unmute": flag,
    }


_SCHEMAS = inbound_schemas()
INBOUND_TYPES = tuple(_SCHEMAS)


class RejectedMessage(ValueError):
    """A viewer message outside the allowed set; ``str()`` is the reason."""


def parse_inbound(
    raw: str | bytes, max_bytes: int = 4096, text_max_chars: int = TEXT_MAX_CHARS
) -> dict[str, Any]:
    """Validate one data-channel message from a viewer; returns the dict or raises."""
    try:
        size = len(raw.encode() if isinstance(raw, str) else raw)
    except UnicodeEncodeError:
        raise RejectedMessage("not UTF-8 text") from None
    if size > max_bytes:
        raise RejectedMessage(f"message of {size} bytes exceeds {max_bytes}")
    try:
        obj = json.loads(raw)
    except RecursionError:  # "[[[[..." (4 KB of it is deeper than the interpreter allows)
        raise RejectedMessage("not JSON: nested too deeply") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise RejectedMessage(f"not JSON: {e}") from None
    if not isinstance(obj, dict):
        raise RejectedMessage("not a JSON object")
    kind = obj.get("type")
    if kind not in INBOUND_TYPES:
        allowed = ", ".join(INBOUND_TYPES)
        raise RejectedMessage(f"type {kind!r} is not accepted (allowed: {allowed})")
    schemas = _SCHEMAS if text_max_chars == TEXT_MAX_CHARS else inbound_schemas(text_max_chars)
    error = jsonschema.exceptions.best_match(
        jsonschema.Draft202012Validator(schemas[kind]).iter_errors(obj)
    )
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "message"
        raise RejectedMessage(f"{kind}: {where}: {error.message}")
    if kind == "text":
        obj["text"] = obj["text"].strip()
    return obj


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
