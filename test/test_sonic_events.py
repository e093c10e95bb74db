"""Nova Sonic event builders/parsers and history sanitizing (pure, no network)."""

from __future__ import annotations

import base64
import json

import pytest

from sonic_voice.sonic import events as ev
from sonic_voice.sonic.session import HistoryLimits, SessionConfig, sanitize_history


def body(raw: bytes) -> tuple[str, dict]:
    doc = json.loads(raw)
    ((name, b),) = doc["event"].items()
    return name, b


def test_session_start_endpointing_only_when_asked() -> None:
    name, b = body(ev.session_start(2048, 0.9, 0.7, "LOW"))
    assert name == "sessionStart"
    assert b["inferenceConfiguration"] == {"maxTokens": 2048, "topP": 0.9, "temperature": 0.7}
    assert b["turnDetectionConfiguration"] == {"endpointingSensitivity": "LOW"}
    assert "turnDetectionConfiguration" not in body(ev.session_start())[1]
    with pytest.raises(ValueError, match="endpointing"):
        ev.session_start(endpointing="FAST")


def test_prompt_start_with_tools_uses_string_schema() -> None:
    spec = ev.tool_spec("navigate_to", "Go somewhere", {"type": "object", "properties": {}})
    name, b = body(ev.prompt_start("p1", "matthew", 24000, [spec]))
    assert name == "promptStart" and b["promptName"] == "p1"
    assert b["audioOutputConfiguration"]["voiceId"] == "matthew"
    assert b["audioOutputConfiguration"]["sampleRateHertz"] == 24000
    tool = b["toolConfiguration"]["tools"][0]["toolSpec"]
    assert isinstance(tool["inputSchema"]["json"], str)
    assert json.loads(tool["inputSchema"]["json"])["type"] == "object"
    assert "toolConfiguration" not in body(ev.prompt_start("p1", "matthew"))[1]


def test_audio_input_round_trips_pcm() -> None:
    pcm = bytes(range(256)) * 4
    name, b = body(ev.audio_input("p", 'c"x', pcm))
    assert name == "audioInput" and b["contentName"] == 'c"x'
    assert base64.b64decode(b["content"]) == pcm


def test_tool_result_content_is_stringified_json() -> None:
    _, b = body(ev.tool_result("p", "c", {"status": "ok", "distance": 3.5}))
    assert json.loads(b["content"]) == {"status": "ok", "distance": 3.5}
    _, start = body(ev.tool_content_start("p", "c", "tu-1"))
    assert start["toolResultInputConfiguration"]["toolUseId"] == "tu-1"
    assert start["type"] == "TOOL" and start["role"] == "TOOL"


def out(name: str, **fields) -> bytes:
    return json.dumps({"event": {name: fields}}).encode()


def test_parse_text_stages_and_interruption() -> None:
    cs = ev.parse_output(
        out("contentStart", contentId="c1", type="TEXT", role="ASSISTANT",
            additionalModelFields='{"generationStage":"SPECULATIVE"}')
    )  # fmt: skip
    assert cs == ev.ContentStart("c1", "TEXT", "ASSISTANT", "SPECULATIVE")
    t = ev.parse_output(out("textOutput", contentId="c1", role="ASSISTANT", content="Hola"))
    assert t == ev.TextOutput("c1", "ASSISTANT", "Hola", False)
    for marker in ('{ "interrupted" : true }', '{"interrupted":true}'):
        assert ev.parse_output(out("textOutput", contentId="c1", content=marker)).interrupted
    assert not ev.is_interruption("I was interrupted yesterday")
    end = ev.parse_output(out("contentEnd", contentId="c1", type="TEXT", stopReason="INTERRUPTED"))
    assert end == ev.ContentEnd("c1", "TEXT", "INTERRUPTED")


def test_parse_tool_use_single_and_double_encoded() -> None:
    args = {"location": "pharmacy"}
    once = ev.parse_output(
        out(
            "toolUse",
            contentId="t",
            toolUseId="u1",
            toolName="navigate_to",
            content=json.dumps(args),
        )
    )
    twice = ev.parse_output(
        out("toolUse", contentId="t", toolUseId="u1", toolName="navigate_to",
            content=json.dumps(json.dumps(args)))
    )  # fmt: skip
    assert once.input == args and twice.input == args and not once.error and not twice.error
    bad = ev.parse_output(out("toolUse", contentId="t", toolUseId="u2", toolName="x", content="{"))
    assert bad.input == {} and "not valid JSON" in bad.error
    arr = ev.parse_output(
        out("toolUse", contentId="t", toolUseId="u3", toolName="x", content="[1]")
    )
    assert "JSON object" in arr.error


def test_parse_audio_usage_completion_and_unknown() -> None:
    pcm = b"\x01\x00\x02\x00"
    a = ev.parse_output(out("audioOutput", contentId="a", content=base64.b64encode(pcm).decode()))
    assert a == ev.AudioOutput("a", pcm)
    u = ev.parse_output(
        out("usageEvent", totalInputTokens=10, totalOutputTokens=5, totalTokens=15,
            details={"delta": {}})
    )  # fmt: skip
    assert (u.total_input_tokens, u.total_output_tokens, u.total_tokens) == (10, 5, 15)
    c = ev.parse_output(out("completionEnd", completionId="x", stopReason="END_TURN"))
    assert c == ev.CompletionEnd("x", "END_TURN")
    unk = ev.parse_output(out("somethingNew", a=1))
    assert isinstance(unk, ev.Unknown) and unk.name == "somethingNew"


def test_split_utf8_never_breaks_characters() -> None:
    text = "ñandú " * 400
    parts = ev.split_utf8(text, 1000)
    assert "".join(parts) == text
    assert all(len(p.encode()) <= 1000 for p in parts) and len(parts) > 1


@pytest.mark.timeout(10)  # a trimming loop that never ends fails here, not at 300 s
def test_history_rules() -> None:
    lim = HistoryLimits(max_messages=4, max_message_bytes=20, max_total_bytes=60)
    h = [
        ("ASSISTANT", "Hello, I am the robot."),  # leading ASSISTANT dropped
        ("USER", "hi"),
        ("USER", "there"),  # merged with the previous USER
        ("ASSISTANT", "How can I help?"),
        ("USER", "x" * 50),  # trimmed to 20 bytes (the end kept)
        ("ASSISTANT", "ok"),
        ("USER", "  "),  # empty: skipped
    ]
    got = sanitize_history(h, lim)
    assert got[0] == ("USER", "hi there")
    assert [r for r, _ in got] == ["USER", "ASSISTANT", "USER", "ASSISTANT"]
    assert got[2] == ("USER", "x" * 20)
    # Oldest first out when over the total, and the result still starts with USER.
    tight = HistoryLimits(max_messages=10, max_message_bytes=20, max_total_bytes=25)
    assert sanitize_history(h, tight) == [("USER", "x" * 20), ("ASSISTANT", "ok")]
    # A trailing USER whose audio is replayed is dropped on request.
    assert sanitize_history([("USER", "a"), ("ASSISTANT", "b"), ("USER", "c")], lim, True) == [
        ("USER", "a"),
        ("ASSISTANT", "b"),
    ]


def test_config_validation_is_specific() -> None:
    with pytest.raises(ValueError, match=r"voice 'greta' is not available on amazon\.nova-2"):
        SessionConfig(voice_id="greta").validate()
    SessionConfig(model_id=ev.NOVA_SONIC_V1, voice_id="greta", endpointing=None).validate()
    with pytest.raises(ValueError, match="cross-modal"):
        SessionConfig(model_id=ev.NOVA_SONIC_V1, greeting="hi").validate()
    assert "answer in the language they use" in SessionConfig(language="en-US").full_system_prompt()
