"""The Nova Sonic input protocol's ordering and field rules, as a pure state machine.

No sockets, no asyncio, no scenario: :class:`ProtocolRules` takes the client's input
events one by one (name and JSON body), records them in a :class:`StreamRecord`, raises
:class:`ProtocolViolation` with the service's wording where the service answers with a
validationException, and otherwise returns what the event means for the playback side
(audio to listen to, interactive text, a tool result, the end of the session).

Two users: the HTTP/2 stand-in (``stream.py``) and the in-process fake stream
(``fake.py``) that unit tests of ``SonicSession`` open through its ``opener`` hook. Both
therefore refuse exactly the same inputs. Rules are from
shared/reference/nova-sonic-protocol.md sections 2, 3, 8, 10; where the service is strict
the rules are strict too (issue 16): a promptStart that declares tools must say how tool
use comes back (``toolUseOutputConfiguration``), audio configurations must be complete.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass, field
from typing import Any

from sonic_voice.emulators.sonic.records import InputEvent, StreamRecord, ToolResultRecord
from sonic_voice.sonic.events import ENDPOINTING, V1_VOICES, V2_VOICES, is_nova2

HISTORY_ERROR = "Chat history should be sent completely before streaming audio."
V1_MAX_HISTORY_MESSAGES, V1_MAX_MESSAGE_BYTES = 40, 1000
V2_MAX_MESSAGE_BYTES, V2_MAX_HISTORY_BYTES = 50 * 1024, 200 * 1024
RATES = (8000, 16000, 24000)


class ProtocolViolation(Exception):
    """An input the service answers with a validationException (the stream then ends)."""


@dataclass
class Action:
    """What an accepted input event asks of the playback side.

    ``kind``: ``audio`` (``pcm``), ``audio_open`` (``rate``), ``text`` (interactive
    ``text``), ``tool_result`` (``tool_use_id``, ``text`` = the raw content),
    ``session_end``.
    """

    kind: str
    pcm: bytes = b""
    rate: int = 0
    text: str = ""
    tool_use_id: str = ""


@dataclass
class _Block:
    name: str
    type: str
    role: str
    interactive: bool
    parts: list[str] = field(default_factory=list)
    tool_use_id: str = ""
    results: list[str] = field(default_factory=list)


def _need(cond: bool, message: str) -> None:
    if not cond:
        raise ProtocolViolation(message)


class ProtocolRules:
    """One stream's input side: ``accept(name, body, t_ns)`` per event, in arrival order."""

    def __init__(self, record: StreamRecord) -> None:
        self.rec = record
        self.model_id = record.model_id
        self.nova2 = is_nova2(record.model_id)
        self.phase = "new"  # new -> session -> prompt -> prompt_ended -> ended
        self.prompt_name = ""
        self.blocks: dict[str, _Block] = {}
        self.names_seen: set[str] = set()
        self.audio_block: str | None = None
        self.out_rate = 24000
        self.in_rate = 16000
        self.history_bytes = 0
        self.tools: set[str] = set()
        self.tool_names: dict[str, str] = {}  # toolUseId -> name, of toolUse events sent

    # ------------------------------------------------------------------ public
    def tool_use_sent(self, tool_use_id: str, name: str) -> None:
        """The service side asked for a tool: its toolUseId may now get a result."""
        self.tool_names[tool_use_id] = name

    def accept(self, name: str, body: dict[str, Any], t_ns: int = 0) -> Action | None:
        """Check one input event against the rules; raises ProtocolViolation."""
        if not isinstance(body, dict):
            raise ProtocolViolation(f"Invalid input request: {name} must be an object")
        self.rec.events.append(InputEvent(name, body, t_ns))
        if name == "sessionStart":
            self._session_start(body)
            return None
        _need(self.phase != "new", "The first event must be sessionStart.")
        _need(self.phase != "ended", f"{name} received after sessionEnd.")
        if name == "promptStart":
            self._prompt_start(body)
            return None
        if name == "sessionEnd":
            _need(self.phase == "prompt_ended", "sessionEnd received before promptEnd.")
            self.phase = "ended"
            self.rec.end_reason = "sessionEnd"
            return Action("session_end")
        _need(self.phase != "session", f"{name} received before promptStart.")
        if body.get("promptName") != self.prompt_name:
            raise ProtocolViolation(
                f"Invalid promptName {body.get('promptName')!r} in {name}; "
                f"expected {self.prompt_name!r}."
            )
        _need(self.phase != "prompt_ended", f"{name} received after promptEnd.")
        handler = {
            "contentStart": self._content_start,
            "textInput": self._text_input,
            "audioInput": self._audio_input,
            "toolResult": self._tool_result,
            "contentEnd": self._content_end,
            "promptEnd": self._prompt_end,
        }.get(name)
        if handler is None:
            raise ProtocolViolation(f"Unknown input event {name!r}.")
        return handler(body, t_ns)

    # ------------------------------------------------------------------ session / prompt
    def _session_start(self, body: dict[str, Any]) -> None:
        _need(self.phase == "new", "sessionStart must be sent once, as the first event.")
        inf = body.get("inferenceConfiguration", {})
        _need(isinstance(inf, dict), "inferenceConfiguration must be an object.")
        for key in ("topP", "temperature"):
            v = inf.get(key)
            ok = v is None or (isinstance(v, int | float) and not isinstance(v, bool))
            _need(
                ok and (v is None or 0.0 <= v <= 1.0),
                f"inferenceConfiguration.{key} must be in [0, 1].",
            )
        mt = inf.get("maxTokens")
        _need(
            mt is None or (isinstance(mt, int) and not isinstance(mt, bool) and mt > 0),
            "inferenceConfiguration.maxTokens must be a positive integer.",
        )
        td = body.get("turnDetectionConfiguration")
        if td is not None:
            _need(self.nova2, "turnDetectionConfiguration is not supported by this model.")
            _need(
                isinstance(td, dict) and td.get("endpointingSensitivity") in ENDPOINTING,
                "endpointingSensitivity must be HIGH, MEDIUM or LOW.",
            )
        self.rec.session_start = body
        self.phase = "session"

    def _prompt_start(self, body: dict[str, Any]) -> None:
        _need(self.phase == "session", "promptStart must follow sessionStart, once.")
        pn = body.get("promptName")
        _need(isinstance(pn, str) and bool(pn), "promptStart.promptName is required.")
        toc = body.get("textOutputConfiguration")
        if toc is not None:
            _need(
                isinstance(toc, dict) and toc.get("mediaType") == "text/plain",
                "textOutputConfiguration.mediaType must be text/plain.",
            )
        aoc = body.get("audioOutputConfiguration")
        if aoc is not None:
            _need(isinstance(aoc, dict), "audioOutputConfiguration must be an object.")
            for key in ("mediaType", "sampleRateHertz", "sampleSizeBits", "channelCount"):
                _need(key in aoc, f"audioOutputConfiguration.{key} is required.")
            for key in ("voiceId", "encoding"):
                _need(key in aoc, f"audioOutputConfiguration.{key} is required.")
            rate = aoc["sampleRateHertz"]
            _need(rate in RATES, f"Unsupported output sampleRateHertz {rate}.")
            _need(
                aoc["mediaType"] == "audio/lpcm",
                "audioOutputConfiguration.mediaType must be audio/lpcm.",
            )
            _need(
                aoc["sampleSizeBits"] == 16, "audioOutputConfiguration.sampleSizeBits must be 16."
            )
            _need(aoc["channelCount"] == 1, "audioOutputConfiguration.channelCount must be 1.")
            _need(aoc["encoding"] == "base64", "audioOutputConfiguration.encoding must be base64.")
            voices = V2_VOICES if self.nova2 else V1_VOICES
            voice = aoc["voiceId"]
            _need(voice in voices, f"Invalid voiceId {voice!r} for {self.model_id}.")
            self.out_rate = int(rate)
        tc = body.get("toolConfiguration")
        tools: list[Any] = []
        if tc is not None:
            _need(isinstance(tc, dict), "toolConfiguration must be an object.")
            tools = tc.get("tools", [])
            _need(isinstance(tools, list), "toolConfiguration.tools must be a list.")
        if tools:
            tuoc = body.get("toolUseOutputConfiguration")
            _need(
                isinstance(tuoc, dict) and tuoc.get("mediaType") == "application/json",
                "toolUseOutputConfiguration.mediaType (application/json) is required "
                "when tools are configured.",
            )
        for t in tools:
            spec = t.get("toolSpec", {}) if isinstance(t, dict) else {}
            _need(
                isinstance(spec, dict) and bool(spec.get("name")), "Each tool needs toolSpec.name."
            )
            schema = (spec.get("inputSchema") or {}).get("json")
            if isinstance(schema, str):
                try:
                    json.loads(schema)
                except ValueError:
                    raise ProtocolViolation(
                        f"Tool {spec['name']}: inputSchema.json is not valid JSON."
                    ) from None
            self.tools.add(spec["name"])
        self.prompt_name = pn
        self.rec.prompt_start = body
        self.phase = "prompt"

    # ------------------------------------------------------------------ content
    def _open_text(self) -> _Block | None:
        return next((b for b in self.blocks.values() if b.type in ("TEXT", "TOOL")), None)

    def _content_start(self, body: dict[str, Any], t_ns: int) -> Action | None:
        name, ctype = body.get("contentName"), body.get("type")
        _need(isinstance(name, str) and bool(name), "contentStart.contentName is required.")
        _need(name not in self.names_seen, f"Duplicate contentName {name!r}.")
        _need(ctype in ("TEXT", "AUDIO", "TOOL"), f"Invalid content type {ctype!r}.")
        role = body.get("role", "")
        interactive = bool(body.get("interactive", False))
        busy = self._open_text()
        action = None
        if ctype == "AUDIO":
            _need(busy is None, HISTORY_ERROR)
            _need(self.audio_block is None, "An audio content block is already open.")
            _need(role == "USER", "Audio input content must have role USER.")
            cfg = body.get("audioInputConfiguration") or {}
            _need(isinstance(cfg, dict), "audioInputConfiguration must be an object.")
            rate = cfg.get("sampleRateHertz")
            ok = (
                cfg.get("mediaType") == "audio/lpcm"
                and rate in RATES
                and cfg.get("sampleSizeBits") == 16
                and cfg.get("channelCount") == 1
                and cfg.get("encoding") == "base64"
            )
            _need(ok, f"Invalid audioInputConfiguration {cfg}.")
            self.in_rate = int(rate)  # type: ignore[arg-type]
            self.audio_block = name
            self.rec.audio_started = True
            action = Action("audio_open", rate=self.in_rate)
        else:
            if busy is not None:
                raise ProtocolViolation(
                    f"Content {busy.name!r} must end before content {name!r} starts."
                )
            if ctype == "TEXT":
                roles = ("SYSTEM", "USER", "ASSISTANT") + (("SYSTEM_SPEECH",) if self.nova2 else ())
                _need(role in roles, f"Invalid role {role!r} for TEXT content.")
                _need(
                    not interactive or self.nova2,
                    "Interactive text input is not supported by this model.",
                )
                _need(
                    not (role == "SYSTEM" and (self.rec.history or self.rec.audio_started)),
                    "The system prompt must come before history and audio.",
                )
                if role in ("USER", "ASSISTANT") and not interactive:
                    _need(
                        not self.rec.audio_started,
                        "Chat history must be sent before audio streaming starts.",
                    )
                    _need(
                        bool(self.rec.history) or role == "USER",
                        "Chat history must start with a USER message.",
                    )
                    _need(
                        not (self.rec.history and self.rec.history[-1][0] == role),
                        "Chat history roles must alternate between USER and ASSISTANT.",
                    )
            else:  # TOOL
                cfg = body.get("toolResultInputConfiguration") or {}
                _need(isinstance(cfg, dict), "toolResultInputConfiguration must be an object.")
                tid = cfg.get("toolUseId")
                _need(
                    isinstance(tid, str) and tid in self.tool_names,
                    f"Tool Response parsing error: unknown toolUseId {tid!r}.",
                )
                role = "TOOL"
        self.names_seen.add(name)  # type: ignore[arg-type]
        blk = _Block(name, ctype, role, interactive)  # type: ignore[arg-type]
        if ctype == "TOOL":
            blk.tool_use_id = body["toolResultInputConfiguration"]["toolUseId"]
        self.blocks[name] = blk  # type: ignore[index]
        return action

    def _block(self, body: dict[str, Any], want: str, event: str) -> _Block:
        name = body.get("contentName")
        blk = self.blocks.get(name) if isinstance(name, str) else None
        _need(blk is not None, f"{event}: no open content named {name!r}.")
        assert blk is not None
        _need(blk.type == want, f"{event} sent to {blk.type} content {name!r}.")
        return blk

    def _text_input(self, body: dict[str, Any], t_ns: int) -> None:
        blk = self._block(body, "TEXT", "textInput")
        text = body.get("content")
        _need(isinstance(text, str), "textInput.content must be a string.")
        blk.parts.append(text)  # type: ignore[arg-type]

    def _audio_input(self, body: dict[str, Any], t_ns: int) -> Action:
        busy = self._open_text()
        _need(busy is None or busy.type != "TEXT", HISTORY_ERROR)
        if self.audio_block is None or body.get("contentName") != self.audio_block:
            _need(self.rec.audio_started, HISTORY_ERROR)
            raise ProtocolViolation(
                f"audioInput: no open audio content named {body.get('contentName')!r}."
            )
        content = body.get("content", "")
        _need(isinstance(content, str), "audioInput.content must be a base64 string.")
        try:
            pcm = base64.b64decode(content, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolViolation("audioInput.content is not valid base64.") from None
        _need(len(pcm) % 2 == 0, "audioInput.content is not whole 16-bit samples.")
        rec = self.rec
        rec.audio_frames += 1
        rec.audio_bytes += len(pcm)
        rec.pcm += pcm
        rec.audio_input_ns.append(t_ns)
        body["content"] = f"<{len(pcm)} bytes>"  # keep records small; PCM is in rec.pcm
        return Action("audio", pcm=pcm)

    def _tool_result(self, body: dict[str, Any], t_ns: int) -> None:
        blk = self._block(body, "TOOL", "toolResult")
        content = body.get("content")
        _need(isinstance(content, str), "Tool Response parsing error: content must be a string.")
        try:
            parsed = json.loads(content)  # type: ignore[arg-type]
        except ValueError:
            raise ProtocolViolation(
                "Tool Response parsing error: content is not valid JSON."
            ) from None
        blk.results.append(content)  # type: ignore[arg-type]
        self.rec.tool_results.append(
            ToolResultRecord(
                blk.tool_use_id,
                self.tool_names.get(blk.tool_use_id, ""),
                content,  # type: ignore[arg-type]
                parsed,
                t_ns,
            )
        )

    def _content_end(self, body: dict[str, Any], t_ns: int) -> Action | None:
        name = body.get("contentName")
        blk = self.blocks.pop(name, None) if isinstance(name, str) else None
        _need(blk is not None, f"contentEnd: no open content named {name!r}.")
        assert blk is not None
        if blk.type == "AUDIO":
            self.audio_block = None
            return None
        text = "".join(blk.parts)
        if blk.type == "TOOL":
            _need(bool(blk.results), "Tool Response parsing error: no toolResult in content.")
            return Action("tool_result", text=blk.results[-1], tool_use_id=blk.tool_use_id)
        if blk.role == "SYSTEM":
            self.rec.system_prompt = text
        elif blk.role == "SYSTEM_SPEECH":
            pass
        elif blk.interactive:
            self.rec.interactive_texts.append(text)
            return Action("text", text=text)
        else:
            size = len(text.encode())
            limit = V2_MAX_MESSAGE_BYTES if self.nova2 else V1_MAX_MESSAGE_BYTES
            _need(
                size <= limit,
                f"Chat history message of {size} bytes exceeds the {limit}-byte limit.",
            )
            self.history_bytes += size
            _need(
                not (self.nova2 and self.history_bytes > V2_MAX_HISTORY_BYTES),
                "Chat history exceeds the 200 KB limit.",
            )
            _need(
                self.nova2 or len(self.rec.history) < V1_MAX_HISTORY_MESSAGES,
                "Chat history exceeds 40 messages.",
            )
            self.rec.history.append((blk.role, text))
        return None

    def _prompt_end(self, body: dict[str, Any], t_ns: int) -> None:
        if self.blocks:
            raise ProtocolViolation(
                f"promptEnd while content is open: {sorted(self.blocks)} (send contentEnd first)."
            )
        self.phase = "prompt_ended"
