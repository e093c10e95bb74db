"""Scenarios: what the stand-in says, and when.

A scenario is a list of turns played in order (optionally looping). A turn fires on the
user's end of utterance (``on: speech``), on interactive text (``on: text``, Nova 2
cross-modal input; a greeting is a text turn), or on either (``on: any``). The pointer is
shared by all streams of one emulator, so after a rotation the conversation goes on.

YAML (or the same as a dict)::

    name: demo
    loop: false
    vad: {threshold_dbfs: -35, min_speech_ms: 60, end_silence_ms: 600}
    audio: {chunk_ms: 40, lead_ms: 200, after_interrupt_ms: 0}  # audio sent past a barge-in
    tool_timeout_s: 30
    faults:                       # stream faults on a timer (seconds after stream start)
      - {kind: modelStreamErrorException, at_s: 5, stream: 0}
      - {kind: internalServerException, after_frames: 3}   # every stream, after 3 frames
    turns:
      - on: text                  # greeting on the first interactive text
        say: Hello, how can I help?
      - on: speech
        user: where is the lift       # the USER transcript sent back
        say_before: Let me look.      # spoken first, then the tool call(s), then ``say``
        tool: {name: find_place, input: {place: lift}}
        say: The lift is behind you.  # SPECULATIVE text, then audio, then FINAL text
        final: The lift is behind you.   # default: same as say
        audio: {tone: {freq: 440, duration_s: 1.2}}  # or {wav: f.wav} {espeak: {voice: es}}
                                                     # {silence_s: 1} or "auto"
        voice: es                 # espeak voice/language when audio is espeak/auto
      - on: speech
        fault: modelTimeoutException  # fire a fault instead of replying
      - on: speech
        say_before: Follow me.
        tool: {name: navigate_to, input: {location: kitchen}, wait: false}  # asynchronous:
                                  # the turn ends without the result, the talk goes on
      - on: tool_result           # a result no call waits for (wait: false, or late)
        match: navigate_to        # only when the result (or text) contains this
        say: We are there.

``on: text`` also fires on the session's text (e.g. a result sent as text after a
rotation); ``on: any`` is speech or text, never a tool result.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from sonic_voice.emulators.sonic.faults import ALL_FAULTS, HTTP_FAULTS, Fault

_AUDIO_SCHEMA = {
    "oneOf": [
        {"enum": ["auto", "none", "espeak", "tone"]},
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "tone": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "freq": {"type": "number", "exclusiveMinimum": 0},
                        "duration_s": {"type": "number", "exclusiveMinimum": 0},
                        "amp": {"type": "number", "minimum": 0, "maximum": 1},
                    },
                },
                "wav": {"type": "string"},
                "espeak": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "voice": {"type": "string"},
                        "speed_wpm": {"type": "integer", "minimum": 80, "maximum": 500},
                    },
                },
                "silence_s": {"type": "number", "minimum": 0},
            },
            "minProperties": 1,
            "maxProperties": 1,
        },
    ]
}

_FAULT_SCHEMA = {
    "oneOf": [
        {"enum": list(ALL_FAULTS)},
        {
            "type": "object",
            "required": ["kind"],
            "properties": {
                "kind": {"enum": list(ALL_FAULTS)},
                "after_frames": {"type": "integer", "minimum": 0},
            },
        },
    ]
}

SCHEMA: dict[str, Any] = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "loop": {"type": "boolean"},
        "tool_timeout_s": {"type": "number", "exclusiveMinimum": 0},
        "vad": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "threshold_dbfs": {"type": "number", "maximum": 0},
                "min_speech_ms": {"type": "number", "minimum": 10},
                "end_silence_ms": {"type": "number", "minimum": 10},
            },
        },
        "audio": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "chunk_ms": {"type": "number", "minimum": 5, "maximum": 1000},
                "lead_ms": {"type": "number", "minimum": 0},
                "after_interrupt_ms": {"type": "number", "minimum": 0},
            },
        },
        "faults": {"type": "array", "items": _FAULT_SCHEMA},
        "turns": {
            "type": "array",
            "items": {
                "type": "object",
                "additionalProperties": False,
                "properties": {
                    "on": {"enum": ["speech", "text", "any", "tool_result"]},
                    "match": {"type": "string", "minLength": 1},
                    "user": {"type": "string"},
                    "tool": {"$ref": "#/$defs/tool"},
                    "tools": {"type": "array", "items": {"$ref": "#/$defs/tool"}},
                    "say": {"type": "string"},
                    "say_before": {"type": "string"},
                    "final": {"type": "string"},
                    "audio": _AUDIO_SCHEMA,
                    "voice": {"type": "string"},
                    "fault": _FAULT_SCHEMA,
                    "usage": {"type": "boolean"},
                },
            },
        },
    },
    "$defs": {
        "tool": {
            "type": "object",
            "additionalProperties": False,
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "minLength": 1},
                "input": {"type": "object"},
                "double_encode": {"type": "boolean"},
                "wait": {"type": "boolean"},
            },
        }
    },
}


@dataclass
class ToolCall:
    name: str
    input: dict[str, Any] = field(default_factory=dict)
    double_encode: bool = False  # send the arguments JSON-encoded twice (seen in the wild)
    wait: bool = True  # False: do not wait for the result (an asynchronous Nova 2 call)


@dataclass
class Turn:
    on: str = "speech"
    user: str | None = None
    tools: list[ToolCall] = field(default_factory=list)
    say: str = ""
    say_before: str = ""  # spoken before the tool calls (then ``say`` after their results)
    final: str | None = None
    audio: Any = "auto"
    voice: str = "en-us"
    fault: Fault | None = None
    usage: bool = True
    match: str = ""  # text and tool_result turns: only when the trigger's text contains it

    def fires_on(self, trigger: str, text: str = "") -> bool:
        if not (self.on == trigger or (self.on == "any" and trigger in ("speech", "text"))):
            return False
        return not self.match or self.match in text


@dataclass
class Scenario:
    name: str = "scenario"
    turns: list[Turn] = field(default_factory=list)
    loop: bool = False
    tool_timeout_s: float = 30.0
    threshold_dbfs: float = -35.0
    min_speech_ms: float = 60.0
    end_silence_ms: float = 600.0
    chunk_ms: float = 40.0
    lead_ms: float = 200.0
    # A real service may keep sending audio of the interrupted answer after the barge-in
    # marker; this much of it follows the marker (0: the stream stops at the marker).
    after_interrupt_ms: float = 0.0
    faults: list[Fault] = field(default_factory=list)
    base_dir: Path = field(default_factory=Path.cwd)  # WAV paths resolve from here

    @classmethod
    def from_dict(cls, doc: dict[str, Any], base_dir: Path | None = None) -> Scenario:
        """Validate ``doc`` against :data:`SCHEMA`; raise ValueError naming the bad field."""
        doc = copy.deepcopy(doc or {})
        for t in doc.get("turns", []) if isinstance(doc.get("turns"), list) else []:
            if isinstance(t, dict) and True in t:  # YAML 1.1 reads a bare `on:` key as True
                t["on"] = t.pop(True)
        try:
            jsonschema.validate(doc, SCHEMA)
        except jsonschema.ValidationError as e:
            where = "/".join(str(p) for p in e.absolute_path) or "(top)"
            raise ValueError(f"scenario: {where}: {e.message}") from None
        turns = []
        for i, t in enumerate(doc.get("turns", [])):
            tools = [ToolCall(**x) for x in ([t["tool"]] if "tool" in t else t.get("tools", []))]
            fault = Fault.coerce(t["fault"]) if "fault" in t else None
            if fault is not None and fault.kind in HTTP_FAULTS:
                raise ValueError(f"scenario: turns/{i}/fault: {fault.kind} is an HTTP error")
            turns.append(
                Turn(
                    on=t.get("on", "speech"),
                    user=t.get("user"),
                    tools=tools,
                    say=t.get("say", ""),
                    say_before=t.get("say_before", ""),
                    final=t.get("final"),
                    audio=t.get("audio", "auto"),
                    voice=t.get("voice", "en-us"),
                    fault=fault,
                    usage=t.get("usage", True),
                    match=t.get("match", ""),
                )
            )
        vad, audio = doc.get("vad", {}), doc.get("audio", {})
        return cls(
            name=doc.get("name", "scenario"),
            turns=turns,
            loop=doc.get("loop", False),
            tool_timeout_s=float(doc.get("tool_timeout_s", 30.0)),
            threshold_dbfs=float(vad.get("threshold_dbfs", -35.0)),
            min_speech_ms=float(vad.get("min_speech_ms", 60.0)),
            end_silence_ms=float(vad.get("end_silence_ms", 600.0)),
            chunk_ms=float(audio.get("chunk_ms", 40.0)),
            lead_ms=float(audio.get("lead_ms", 200.0)),
            after_interrupt_ms=float(audio.get("after_interrupt_ms", 0.0)),
            faults=[Fault.coerce(f) for f in doc.get("faults", [])],
            base_dir=base_dir or Path.cwd(),
        )

    @classmethod
    def load(cls, source: str | Path | dict[str, Any] | Scenario | None) -> Scenario:
        """A Scenario from a YAML path, a dict, a Scenario, or None (the default one)."""
        if isinstance(source, Scenario):
            return source
        if source is None:
            if not DEFAULT_SCENARIO_FILE.is_file():  # installed without the config dir
                return cls.from_dict(BUILTIN_DEFAULT)
            source = DEFAULT_SCENARIO_FILE
        if isinstance(source, dict):
            return cls.from_dict(source)
        path = Path(source)
        try:
            doc = yaml.safe_load(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise ValueError(f"scenario file {path}: {e.strerror}") from None
        except yaml.YAMLError as e:
            raise ValueError(f"scenario file {path}: {e}") from None
        if not isinstance(doc, dict):
            raise ValueError(f"scenario file {path}: expected a mapping at the top")
        try:
            return cls.from_dict(doc, base_dir=path.parent)
        except ValueError as e:
            raise ValueError(f"{path}: {e}") from None


DEFAULT_SCENARIO_FILE = (
    Path(__file__).resolve().parents[3] / "config" / "scenarios" / "default.yaml"
)

# Used when config/scenarios/default.yaml is not next to the package (installed wheel).
BUILTIN_DEFAULT: dict[str, Any] = {
    "name": "default",
    "loop": True,
    "turns": [
        {"on": "text", "say": "Hello! I am the local Nova Sonic stand-in. How can I help?"},
        {
            "on": "speech",
            "user": "Hello robot.",
            "say": "Hello! This is the offline stand-in speaking. Everything works.",
        },
    ],
}
