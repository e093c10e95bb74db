"""Property-based fuzzing (hypothesis) of what Nova Sonic sends back: malformed JSON, wrong
types, unknown events, huge strings. Invariants: the parser returns an event or raises
BadOutputEvent naming the field (nothing else escapes); fed to a live session through the
fake stream, no exception escapes, no reconnect, each rejection is logged, and the session
still works afterwards (issue 11, fuzzing). Example counts keep this to a few seconds."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sonic_voice.emulators.sonic.fake import FakeService
from sonic_voice.sonic import events as ev
from sonic_voice.sonic.session import SessionConfig, SonicSession
from sonic_voice.sonic.transport import BedrockSettings

from test.test_sonic_session import Recorder

pytestmark = pytest.mark.timeout(120)

NAMES = [
    "audioOutput",
    "textOutput",
    "contentStart",
    "contentEnd",
    "toolUse",
    "completionStart",
    "completionEnd",
    "usageEvent",
]
KEYS = [
    "contentId",
    "content",
    "role",
    "type",
    "stopReason",
    "additionalModelFields",
    "toolUseId",
    "toolName",
    "completionId",
    "totalInputTokens",
    "totalOutputTokens",
    "totalTokens",
    "details",
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(
        ["AUDIO", "TEXT", "TOOL", "ASSISTANT", "USER", "INTERRUPTED", "END_TURN", "AAA=", "A"]
    )
    | st.sampled_from(['{ "interrupted" : true }', '{"generationStage":"FINAL"}', "[[[[", "{}"]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
huge = st.sampled_from([10_000, 300_000, 2_000_000]).map(lambda n: "A" * n)
bodies = st.dictionaries(st.sampled_from(KEYS), json_values | huge, max_size=6)
events = st.builds(
    lambda name, body: {"event": {name: body}},
    st.sampled_from(NAMES) | st.text(max_size=12),
    bodies | json_values,
)
raw_events = (
    events.map(lambda d: json.dumps(d).encode())
    | st.binary(max_size=64)
    | st.text(max_size=64).map(str.encode)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.just(b"[" * 5000 + b"]" * 5000)  # nesting deeper than the parser's recursion
)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(raw_events)
def test_parse_output_returns_an_event_or_a_clear_rejection(raw: bytes) -> None:
    try:
        out = ev.parse_output(raw)
    except ev.BadOutputEvent as e:
        assert str(e), "a rejection says why"
        return
    assert isinstance(
        out,
        ev.AudioOutput
        | ev.TextOutput
        | ev.ContentStart
        | ev.ContentEnd
        | ev.ToolUseEvent
        | ev.CompletionStart
        | ev.CompletionEnd
        | ev.Usage
        | ev.Unknown,
    )
    if isinstance(out, ev.AudioOutput):
        assert len(out.pcm) % 2 == 0


def expected_rejections(batch: list[bytes]) -> int:
    n = 0
    for raw in batch:
        try:
            ev.parse_output(raw)
        except ev.BadOutputEvent:
            n += 1
    return n


async def run_batch(batch: list[bytes]) -> tuple[SonicSession, Recorder, FakeService]:
    svc = FakeService()
    rec = Recorder()
    session = SonicSession(BedrockSettings(), SessionConfig(), None, rec, opener=svc.open)
    await session.start()
    try:
        s = svc.current
        for raw in batch:
            s.emit_raw(raw)
        # Afterwards the session still hears the service: a normal turn gets through.
        s.start_completion()
        s.text("ASSISTANT", "still here")
        s.end_completion()
        for _ in range(500):
            if "still here" in [t["text"] for t in rec.transcripts]:
                break
            await asyncio.sleep(0.002)
    finally:
        await session.stop()
    return session, rec, svc


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(raw_events, min_size=1, max_size=12))
def test_session_survives_any_output_events(batch: list[bytes]) -> None:
    handler = _Capture()
    logging.getLogger("sonic_voice.sonic.session").addHandler(handler)
    try:
        session, rec, svc = asyncio.run(run_batch(batch))
    finally:
        logging.getLogger("sonic_voice.sonic.session").removeHandler(handler)
    assert svc.opens == 1 and session.recoveries == 0, "a bad event never causes a reconnect"
    assert session.fatal_error is None
    assert "still here" in [t["text"] for t in rec.transcripts]
    bad = expected_rejections(batch)
    assert session.events_rejected >= bad
    rejected_logs = [m for m in handler.messages if "rejected" in m]
    assert len(rejected_logs) == session.events_rejected, "each rejection logged once"


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_known_bad_event_is_logged_with_its_field(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    batch = [
        json.dumps({"event": {"audioOutput": {"contentId": "c", "content": 12}}}).encode(),
        b"{not json",
        json.dumps({"event": {"usageEvent": {"totalTokens": "many"}}}).encode(),
    ]
    session, _, svc = asyncio.run(run_batch(batch))
    assert session.events_rejected == 3
    text = caplog.text
    assert "audioOutput.content must be a string" in text
    assert "not JSON" in text
    assert "usageEvent.totalTokens" in text
    assert svc.opens == 1
