"""What the stand-in saw and did on each stream, for tests to assert on."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class InputEvent:
    name: str  # sessionStart, promptStart, contentStart, textInput, audioInput, ...
    body: dict[str, Any]  # the parsed JSON body (audioInput's base64 content kept)
    t_ns: int  # time.perf_counter_ns() when the frame's last byte arrived


@dataclass
class ToolResultRecord:
    tool_use_id: str
    tool_name: str
    content: str  # raw toolResult content (stringified JSON)
    parsed: Any  # json.loads(content)
    t_ns: int


@dataclass
class ErrorRecord:
    kind: str  # validationException, ..., or "http", "reset", "drop"
    message: str
    t_ns: int
    status: int = 0  # HTTP status for errors before the stream


@dataclass
class StreamRecord:
    """One ``invoke-with-bidirectional-stream`` request and everything on it."""

    index: int  # 0-based, in arrival order across the emulator's life
    stream_id: int  # HTTP/2 stream id
    model_id: str  # percent-decoded
    path: str  # as received
    started_ns: int
    http_status: int = 0
    request_signature_ok: bool = False
    chunk_signatures_ok: bool = True  # False as soon as one envelope fails
    signed_frames: int = 0  # envelopes whose chunk signature verified
    end_frame_received: bool = False  # the signed empty envelope closing the input
    input_ended: bool = False  # client END_STREAM seen
    events: list[InputEvent] = field(default_factory=list)
    # Input events that arrived after the service ended the response (e.g. the polite
    # contentEnd/promptEnd/sessionEnd a client sends after an error frame): not checked.
    late_events: list[InputEvent] = field(default_factory=list)
    session_start: dict[str, Any] = field(default_factory=dict)
    prompt_start: dict[str, Any] = field(default_factory=dict)
    system_prompt: str = ""
    history: list[tuple[str, str]] = field(default_factory=list)  # (role, text) before audio
    interactive_texts: list[str] = field(default_factory=list)
    audio_started: bool = False
    audio_frames: int = 0  # audioInput events
    audio_bytes: int = 0
    pcm: bytearray = field(default_factory=bytearray)  # all decoded input PCM, in order
    audio_input_ns: list[int] = field(default_factory=list)  # arrival time per audioInput
    utterances: int = 0  # end-of-utterance decisions
    turns_fired: list[int] = field(default_factory=list)  # scenario turn indexes run here
    tool_uses: list[dict[str, Any]] = field(default_factory=list)  # {toolUseId, name, input}
    tool_results: list[ToolResultRecord] = field(default_factory=list)
    barge_ins: int = 0
    audio_after_interrupt_bytes: int = 0  # audio sent after the barge-in marker
    output_events: list[tuple[str, int]] = field(default_factory=list)  # (name, t_ns)
    audio_out_frames: int = 0
    audio_out_bytes: int = 0
    errors_sent: list[ErrorRecord] = field(default_factory=list)
    ended_ns: int = 0
    end_reason: str = ""  # "input-ended", "sessionEnd", exception kind, "reset", "stopped"

    @property
    def event_names(self) -> list[str]:
        return [e.name for e in self.events]

    @property
    def signature_chain_ok(self) -> bool:
        """Request and every envelope verified (and at least one envelope arrived)."""
        return self.request_signature_ok and self.chunk_signatures_ok and self.signed_frames > 0

    @property
    def late_names(self) -> list[str]:
        return [e.name for e in self.late_events]

    @property
    def output_names(self) -> list[str]:
        return [n for n, _ in self.output_events]
