"""The Nova Sonic stand-in, driven through the real SDK (awscrt HTTP/2, SigV4, event stream).

Each test opens a real ``InvokeModelWithBidirectionalStream`` with aws-sdk-bedrock-runtime
against the stand-in on 127.0.0.1 and asserts on what the SDK returned and on what the
stand-in recorded.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
from typing import Any

import numpy as np
import pytest

from sonic_voice.emulators.sonic import (
    STREAM_FAULTS,
    EmulatorThread,
    Fault,
    Scenario,
    SonicEmulator,
)
from sonic_voice.emulators.sonic import audio as synth
from sonic_voice.emulators.sonic.scenario import DEFAULT_SCENARIO_FILE
from sonic_voice.sonic import events as E

PN = "prompt-1"
SPEECH = (np.sin(np.arange(8000) * 2 * np.pi * 300 / 16000) * 8000).astype("<i2").tobytes()
SILENCE = bytes(16000 * 2)  # 1 s: more than end_silence_ms


class Client:
    """The real SDK stream plus one reader task (receive() is never cancelled)."""

    def __init__(self, emu: SonicEmulator) -> None:
        self.emu = emu
        self.events: list[Any] = []
        self.error: BaseException | None = None
        self.ended = asyncio.Event()
        self._changed = asyncio.Event()
        self._reader: asyncio.Task | None = None

    async def open(
        self, secret: str | None = None, model_id: str = E.NOVA_2_SONIC, region: str = "us-east-1"
    ) -> Client:
        from aws_sdk_bedrock_runtime.client import AsyncBedrockRuntimeClient
        from aws_sdk_bedrock_runtime.config import AsyncBedrockRuntimeConfig
        from aws_sdk_bedrock_runtime.models import (
            InvokeModelWithBidirectionalStreamOperationInput,
        )
        from awscrt import io as crt_io
        from smithy_aws_core.identity import AWSCredentialsIdentity
        from smithy_aws_core.identity.static import StaticCredentialsResolver
        from smithy_http.aio.crt import AWSCRTHTTPClient, AWSCRTHTTPClientConfig

        ca = self.emu.ca_file

        class Transport(AWSCRTHTTPClient):
            def __init__(self) -> None:
                super().__init__(client_config=AWSCRTHTTPClientConfig(force_http_2=True))
                opts = crt_io.TlsContextOptions()
                opts.override_default_trust_store_from_path(ca_filepath=ca)
                self._tls_ctx = crt_io.ClientTlsContext(opts)

        self.http = Transport()
        config = await AsyncBedrockRuntimeConfig.resolve(
            endpoint_uri=self.emu.endpoint_uri,
            region=region,
            transport=self.http,
            aws_credentials_identity_resolver=StaticCredentialsResolver(
                AWSCredentialsIdentity(
                    access_key_id=self.emu.access_key,
                    secret_access_key=secret or self.emu.secret_key,
                )
            ),
        )
        client = AsyncBedrockRuntimeClient(config=config)
        self.stream = await client.invoke_model_with_bidirectional_stream(
            InvokeModelWithBidirectionalStreamOperationInput(model_id=model_id)
        )
        _, self.output = await asyncio.wait_for(self.stream.await_output(), 20)
        self._reader = asyncio.create_task(self._read())
        return self

    async def _read(self) -> None:
        try:
            while True:
                item = await self.output.receive()
                if item is None:
                    break
                self.events.append(E.parse_output(item.value.bytes_))
                self._changed.set()
        except Exception as e:  # noqa: BLE001 - kept for the test to assert on
            self.error = e
        finally:
            self.ended.set()
            self._changed.set()

    async def send(self, *events: bytes) -> None:
        from aws_sdk_bedrock_runtime.models import (
            BidirectionalInputPayloadPart,
            InvokeModelWithBidirectionalStreamInputChunk,
        )

        for ev in events:
            await self.stream.input_stream.send(
                InvokeModelWithBidirectionalStreamInputChunk(
                    value=BidirectionalInputPayloadPart(bytes_=ev)
                )
            )

    async def send_audio(self, pcm: bytes, chunk: int = 1024) -> int:
        n = 0
        for i in range(0, len(pcm), chunk):
            await self.send(E.audio_input(PN, "audio", pcm[i : i + chunk]))
            n += 1
        return n

    async def wait(self, pred: Any, timeout: float = 20.0) -> Any:  # noqa: ASYNC109
        async def loop() -> Any:
            while True:
                v = pred()
                if v or self.ended.is_set():
                    return v
                self._changed.clear()
                await self._changed.wait()

        return await asyncio.wait_for(loop(), timeout)

    async def wait_end(self, timeout: float = 20.0) -> None:  # noqa: ASYNC109
        await asyncio.wait_for(self.ended.wait(), timeout)

    def of(self, cls: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, cls)]

    async def start(self, history: list[tuple[str, str]] = (), tools: Any = None) -> None:
        await self.send(
            E.session_start(endpointing="MEDIUM"),
            E.prompt_start(PN, "matthew", tools=tools),
            E.text_content_start(PN, "sys", "SYSTEM", False),
            E.text_input(PN, "sys", "You are a robot."),
            E.content_end(PN, "sys"),
        )
        for i, (role, text) in enumerate(history):
            await self.send(
                E.text_content_start(PN, f"h{i}", role, False),
                E.text_input(PN, f"h{i}", text),
                E.content_end(PN, f"h{i}"),
            )
        await self.send(E.audio_content_start(PN, "audio"))

    async def close(self, polite: bool = True) -> None:
        with contextlib.suppress(Exception):
            if polite and not self.ended.is_set():
                await self.send(E.content_end(PN, "audio"), E.prompt_end(PN), E.session_end())
        with contextlib.suppress(Exception):
            await self.stream.input_stream.close()
        if self._reader is not None:  # drain to None (pitfall 2), never cancel receive()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self.ended.wait(), 10)
        with contextlib.suppress(Exception):
            await self.http.close()


@contextlib.asynccontextmanager
async def running(scenario: Any = None, **kw: Any) -> Any:
    kw.setdefault("realtime", False)
    emu = SonicEmulator(scenario if scenario is not None else {"turns": []}, **kw)
    await emu.start()
    clients: list[Client] = []

    async def connect(**okw: Any) -> Client:
        c = Client(emu)
        clients.append(c)
        return await c.open(**okw)

    try:
        yield emu, connect
    finally:
        for c in clients:
            await c.close(polite=False)
        await emu.stop()


def corr(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    a, b = a[:n].astype(float), b[:n].astype(float)
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-9))


TONE = {"tone": {"freq": 500, "duration_s": 0.6}}


async def test_whole_turn_speech_in_transcript_audio_out() -> None:
    sc = {
        "turns": [
            {"on": "speech", "user": "where is the lift", "say": "Behind you.", "audio": TONE}
        ]
    }
    async with running(sc) as (emu, connect):
        c = await connect()
        await c.start(history=[("USER", "hi"), ("ASSISTANT", "hello")])
        sent = await c.send_audio(SPEECH + SILENCE)
        await c.wait(lambda: c.of(E.CompletionEnd))
        users = [t for t in c.of(E.TextOutput) if t.role == "USER"]
        assert [t.text for t in users] == ["where is the lift"]
        stages = [(s.role, s.stage) for s in c.of(E.ContentStart) if s.type == "TEXT"]
        assert stages == [("USER", "FINAL"), ("ASSISTANT", "SPECULATIVE"), ("ASSISTANT", "FINAL")]
        pcm = b"".join(a.pcm for a in c.of(E.AudioOutput))
        expect = synth.tone(500, 0.6)
        assert len(pcm) == len(expect)
        assert corr(np.frombuffer(pcm, "<i2"), np.frombuffer(expect, "<i2")) > 0.99
        assert c.of(E.CompletionEnd)[0].stop_reason == "END_TURN"
        assert c.of(E.Usage) and c.of(E.Usage)[-1].total_tokens > 0
        await c.close()
        await emu.wait_for(lambda: emu.records[0].end_reason)
        rec = emu.records[0]
        assert rec.history == [("USER", "hi"), ("ASSISTANT", "hello")]
        assert rec.system_prompt == "You are a robot."
        assert rec.audio_frames == sent
        assert bytes(rec.pcm) == SPEECH + SILENCE
        assert len(rec.audio_input_ns) == sent
        assert rec.utterances == 1 and rec.turns_fired == [0]
        assert rec.request_signature_ok and rec.chunk_signatures_ok and rec.signature_chain_ok
        assert rec.signed_frames == len(rec.events) + 1  # + the signed empty end frame
        assert rec.end_frame_received
        assert rec.event_names[-3:] == ["contentEnd", "promptEnd", "sessionEnd"]
        assert rec.end_reason == "sessionEnd"


async def test_text_turn_cross_modal_nova2() -> None:
    sc = {"turns": [{"on": "text", "say": "Welcome!", "audio": TONE}]}
    async with running(sc) as (emu, connect):
        c = await connect()
        await c.start()
        await c.send_audio(bytes(3200))
        await c.send(
            E.text_content_start(PN, "t1", "USER", True),
            E.text_input(PN, "t1", "Greet the visitor"),
            E.content_end(PN, "t1"),
        )
        await c.wait(lambda: c.of(E.CompletionEnd))
        finals = [t.text for t in c.of(E.TextOutput) if t.role == "ASSISTANT"]
        assert finals == ["Welcome!", "Welcome!"]  # SPECULATIVE then FINAL
        assert emu.records[0].interactive_texts == ["Greet the visitor"]
        assert sum(len(a.pcm) for a in c.of(E.AudioOutput)) == len(synth.tone(500, 0.6))


async def test_tool_round_trip() -> None:
    sc = {
        "turns": [
            {
                "user": "go to the lobby",
                "tool": {"name": "navigate", "input": {"place": "lobby"}, "double_encode": True},
                "say": "I am there.",
                "audio": "none",
            }
        ]
    }
    tools = [E.tool_spec("navigate", "Go somewhere", {"type": "object"})]
    async with running(sc) as (emu, connect):
        c = await connect()
        await c.start(tools=tools)
        await c.send_audio(SPEECH + SILENCE)
        (use,) = await c.wait(lambda: c.of(E.ToolUseEvent))
        assert use.name == "navigate" and use.input == {"place": "lobby"} and not use.error
        assert not c.of(E.CompletionEnd)  # the model waits for the result
        await c.send(
            E.tool_content_start(PN, "r1", use.tool_use_id),
            E.tool_result(PN, "r1", {"status": "arrived"}),
            E.content_end(PN, "r1"),
        )
        await c.wait(lambda: c.of(E.CompletionEnd))
        assert [t.text for t in c.of(E.TextOutput) if t.role == "ASSISTANT"][-1] == "I am there."
        rec = emu.records[0]
        assert rec.tool_uses[0]["name"] == "navigate"
        (res,) = rec.tool_results
        assert (res.tool_use_id, res.tool_name, res.parsed) == (
            use.tool_use_id,
            "navigate",
            {"status": "arrived"},
        )


async def test_barge_in_sends_interruption_marker() -> None:
    sc = {
        "turns": [
            {
                "user": "tell me a story",
                "say": "Once upon a time",
                "audio": {"tone": {"duration_s": 4.0}},
            }
        ]
    }
    async with running(sc, realtime=True) as (emu, connect):
        c = await connect()
        await c.start()
        await c.send_audio(SPEECH + SILENCE)
        await c.wait(lambda: len(c.of(E.AudioOutput)) >= 3)
        await c.send_audio(SPEECH)  # the user talks over the reply
        await c.wait(lambda: any(t.interrupted for t in c.of(E.TextOutput)))
        await c.wait(lambda: c.of(E.CompletionEnd))
        marker = [t for t in c.of(E.TextOutput) if t.interrupted]
        assert marker[0].text == '{ "interrupted" : true }'
        ends = {(e.type, e.stop_reason) for e in c.of(E.ContentEnd)}
        assert ("AUDIO", "INTERRUPTED") in ends and ("TEXT", "INTERRUPTED") in ends
        assert c.of(E.CompletionEnd)[0].stop_reason == "INTERRUPTED"
        played = sum(len(a.pcm) for a in c.of(E.AudioOutput))
        assert 0 < played < len(synth.tone(440, 4.0)) / 2
        assert emu.records[0].barge_ins == 1


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("audio_in_history", "Chat history should be sent completely before streaming audio."),
        ("first_not_session_start", "The first event must be sessionStart."),
        ("history_starts_assistant", "Chat history must start with a USER message."),
        ("history_after_audio", "Chat history must be sent before audio streaming starts."),
        ("bad_tool_result", "Tool Response parsing error"),
        ("prompt_end_open_content", "promptEnd while content is open"),
        ("tools_without_tool_use_output", "toolUseOutputConfiguration.mediaType"),
        ("audio_output_without_encoding", "audioOutputConfiguration.encoding is required"),
    ],
)
async def test_ordering_violation_is_validation_exception(case: str, message: str) -> None:
    from aws_sdk_bedrock_runtime.models import ValidationException

    async with running() as (emu, connect):
        c = await connect()
        head = [E.session_start(), E.prompt_start(PN, "matthew")]
        if case == "audio_in_history":
            await c.send(*head, E.text_content_start(PN, "h", "USER", False))
            await c.send(E.text_input(PN, "h", "hi"), E.audio_input(PN, "h", bytes(640)))
        elif case == "first_not_session_start":
            await c.send(E.prompt_start(PN, "matthew"))
        elif case == "history_starts_assistant":
            await c.send(*head, E.text_content_start(PN, "h", "ASSISTANT", False))
        elif case == "history_after_audio":
            await c.send(*head, E.audio_content_start(PN, "audio"))
            await c.send(E.text_content_start(PN, "h", "USER", False))
        elif case == "bad_tool_result":
            await c.send(*head, E.tool_content_start(PN, "t", "no-such-tool-use"))
        elif case == "prompt_end_open_content":
            await c.send(*head, E.audio_content_start(PN, "audio"), E.prompt_end(PN))
        elif case in ("tools_without_tool_use_output", "audio_output_without_encoding"):
            # What the service requires of promptStart, enforced (issue 16, survivor d).
            tools = [E.tool_spec("navigate_to", "Drive.", {"type": "object"})]
            doc = json.loads(E.prompt_start(PN, "matthew", tools=tools))
            body = doc["event"]["promptStart"]
            if case == "tools_without_tool_use_output":
                del body["toolUseOutputConfiguration"]
            else:
                del body["audioOutputConfiguration"]["encoding"]
            await c.send(E.session_start(), json.dumps(doc).encode())
        await c.wait_end()
        assert isinstance(c.error, ValidationException)
        assert message in str(c.error)
        rec = emu.records[0]
        assert rec.errors_sent[0].kind == "validationException"
        assert message in rec.errors_sent[0].message


async def test_interactive_text_rejected_on_v1_and_v1_turn_works() -> None:
    from aws_sdk_bedrock_runtime.models import ValidationException

    sc = {"turns": [{"user": "hello", "say": "Hi.", "audio": TONE}]}
    async with running(sc) as (emu, connect):
        c = await connect(model_id=E.NOVA_SONIC_V1)
        await c.send(E.session_start(), E.prompt_start(PN, "matthew"))
        await c.send(E.audio_content_start(PN, "audio"))
        await c.send_audio(SPEECH + SILENCE)
        await c.wait(lambda: c.of(E.CompletionEnd))
        assert emu.records[0].model_id == E.NOVA_SONIC_V1
        await c.send(E.text_content_start(PN, "t", "USER", True))
        await c.wait_end()
        assert isinstance(c.error, ValidationException)
        assert "not supported" in str(c.error)


async def test_wrong_secret_is_an_auth_error() -> None:
    from smithy_core.exceptions import CallError

    async with running() as (emu, connect):
        with pytest.raises(CallError) as info:
            await connect(secret="not-the-secret")
        assert "403" in str(info.value) and "InvalidSignatureException" in str(info.value)
        rec = emu.records[0]
        assert rec.http_status == 403 and not rec.request_signature_ok
        assert not rec.events


async def test_unknown_model_and_wrong_region() -> None:
    from aws_sdk_bedrock_runtime.models import ValidationException
    from smithy_core.exceptions import CallError

    async with running() as (emu, connect):
        with pytest.raises(ValidationException, match="model identifier is invalid"):
            await connect(model_id="amazon.nova-sonic-v9:0")
        assert emu.records[0].model_id == "amazon.nova-sonic-v9:0"  # percent-decoded
        with pytest.raises(CallError, match="InvalidSignatureException"):
            await connect(region="eu-west-1")


@pytest.mark.parametrize("kind", list(STREAM_FAULTS))
async def test_stream_fault_frames(kind: str) -> None:
    import aws_sdk_bedrock_runtime.models as m

    etype, message = STREAM_FAULTS[kind]
    cls = getattr(m, etype[0].upper() + etype[1:])
    async with running() as (emu, connect):
        c = await connect()
        await c.start()
        await emu.wait_for(lambda: emu.records[0].audio_started)
        emu.inject(kind)
        await c.wait_end()
        assert type(c.error) is cls
        assert str(c.error) == message
        assert [e.kind for e in emu.records[0].errors_sent] == [etype]


@pytest.mark.parametrize(
    ("kind", "exc", "status"),
    [
        ("accessDenied", "AccessDeniedException", 403),
        ("unknownModel", "ValidationException", 400),
        ("resourceNotFound", "ResourceNotFoundException", 404),
        ("httpThrottling", "ThrottlingException", 429),
        ("modelNotReadyException", "ModelNotReadyException", 429),
        ("httpServiceUnavailable", "ServiceUnavailableException", 503),
    ],
)
async def test_http_faults_before_the_stream(kind: str, exc: str, status: int) -> None:
    import aws_sdk_bedrock_runtime.models as m

    async with running() as (emu, connect):
        emu.inject(kind)
        with pytest.raises(getattr(m, exc)):
            await connect()
        assert emu.records[0].http_status == status
        c = await connect()  # armed for one request only
        await c.start()
        await emu.wait_for(lambda: emu.records[1].audio_started)
        assert emu.records[1].http_status == 200


@pytest.mark.parametrize("kind", ["reset", "drop"])
async def test_reset_and_drop_end_the_stream(kind: str) -> None:
    async with running() as (emu, connect):
        c = await connect()
        await c.start()
        await emu.wait_for(lambda: emu.records[0].audio_started)
        emu.inject(kind)
        await c.wait_end()
        assert not c.of(E.CompletionStart)
        assert emu.records[0].errors_sent[0].kind == kind
        assert emu.records[0].end_reason == kind


async def test_time_limit_answers_like_the_service() -> None:
    from aws_sdk_bedrock_runtime.models import ModelTimeoutException

    async with running(session_limit_s=1.0) as (emu, connect):
        c = await connect()
        await c.start()
        await c.wait_end(timeout=20)
        assert isinstance(c.error, ModelTimeoutException)
        assert "timed out" in str(c.error)
        rec = emu.records[0]
        assert rec.end_reason == "timeLimit"
        assert (rec.ended_ns - rec.started_ns) / 1e9 >= 0.95


async def test_turn_fault_and_next_turn_injection() -> None:
    from aws_sdk_bedrock_runtime.models import ModelStreamErrorException

    sc = {"turns": [{"user": "x", "fault": "modelStreamErrorException"}]}
    async with running(sc) as (emu, connect):
        c = await connect()
        await c.start()
        await c.send_audio(SPEECH + SILENCE)
        await c.wait_end()
        assert isinstance(c.error, ModelStreamErrorException)
        assert emu.records[0].turns_fired == [0]


async def test_hooks_and_push_audio_output() -> None:
    arrivals: list[tuple[int, int]] = []
    writes: list[int] = []
    async with running() as (emu, connect):
        emu.on_audio_input(lambda rec, pcm, t: arrivals.append((len(pcm), t)))
        emu.on_audio_output(lambda rec, pcm, t: writes.append(len(pcm)))
        c = await connect()
        await c.start()
        n = await c.send_audio(bytes(640 * 10), chunk=640)
        await emu.wait_for(lambda: len(arrivals) == n)
        assert [a[0] for a in arrivals] == [640] * n
        assert all(b[1] >= a[1] for a, b in itertools.pairwise(arrivals))
        t = await emu.push_audio_output(b"\x01\x00" * 480)
        await c.wait(lambda: c.of(E.AudioOutput))
        assert c.of(E.AudioOutput)[0].pcm == b"\x01\x00" * 480 and writes == [960] and t > 0
        await emu.end_audio_output()
        await c.wait(lambda: c.of(E.CompletionEnd))


async def test_rotation_history_and_audio_continuity_are_recorded() -> None:
    """Two streams in turn: turn pointer shared, history and every PCM byte recorded."""
    sc = {
        "turns": [
            {"user": "one", "say": "A.", "audio": "none"},
            {"user": "two", "say": "B.", "audio": "none"},
        ]
    }
    async with running(sc) as (emu, connect):
        c1 = await connect()
        await c1.start()
        await c1.send_audio(SPEECH + SILENCE)
        await c1.wait(lambda: c1.of(E.CompletionEnd))
        await c1.close()
        c2 = await connect()
        await c2.start(history=[("USER", "one"), ("ASSISTANT", "A.")])
        await c2.send_audio(SPEECH + SILENCE)
        await c2.wait(lambda: c2.of(E.CompletionEnd))
        assert [t.text for t in c2.of(E.TextOutput) if t.role == "USER"] == ["two"]
        await c2.close()
        await emu.wait_for(lambda: emu.records[1].end_reason)
        r1, r2 = emu.records
        assert r2.history == [("USER", "one"), ("ASSISTANT", "A.")]
        assert bytes(r1.pcm) + bytes(r2.pcm) == (SPEECH + SILENCE) * 2
        assert (r1.turns_fired, r2.turns_fired) == ([0], [1])


def test_emulator_thread_serves_clients_on_other_loops() -> None:
    sc = {"turns": [{"user": "hi", "say": "Hello.", "audio": TONE}]}
    with EmulatorThread(scenario=sc, realtime=False) as et:

        async def client() -> list[str]:
            c = Client(et.emulator)
            await c.open()
            await c.start()
            await c.send_audio(SPEECH + SILENCE)
            await c.wait(lambda: c.of(E.CompletionEnd))
            await c.close()
            return [t.text for t in c.of(E.TextOutput) if t.role == "USER"]

        assert asyncio.run(client()) == ["hi"]
        rec = et.wait_for(lambda: et.records and et.records[0].end_reason)
        assert rec and et.records[0].utterances == 1
        f = et.inject("accessDenied")
        assert f.is_http


def test_scenario_validation_and_default() -> None:
    default = Scenario.load(None)
    assert default.name == "default" and default.turns[0].on == "text"
    assert default.turns[2].voice == "es"
    with pytest.raises(ValueError, match=r"turns/0/audio"):
        Scenario.load({"turns": [{"audio": {"tune": 1}}]})
    with pytest.raises(ValueError, match="unknown fault kind"):
        Fault.coerce("nope")
    with pytest.raises(ValueError, match="HTTP error"):
        Scenario.load({"turns": [{"fault": "accessDenied"}]})
    assert DEFAULT_SCENARIO_FILE.is_file()
    for path in DEFAULT_SCENARIO_FILE.parent.glob("*.yaml"):
        assert Scenario.load(path).turns, path
    demo = Scenario.load(DEFAULT_SCENARIO_FILE.parent / "robot_demo.yaml")
    assert demo.turns[1].tools[0].name == "navigate_to"
    assert demo.turns[3].fault is not None and demo.turns[3].fault.kind.startswith("modelStream")


def test_energy_detector_end_of_utterance() -> None:
    det = synth.EnergyDetector(end_silence_ms=500)
    events = det.feed(SPEECH) + det.feed(bytes(16000))  # 0.5 s speech, 0.5 s quiet
    assert [e.kind for e in events] == ["speech_start", "speech_end"]
    assert events[1].at_s == pytest.approx(1.0, abs=0.02)
    assert det.feed(bytes(32000)) == []  # silence alone is no utterance


@pytest.mark.skipif(not synth.espeak_available(), reason="espeak-ng not installed")
async def test_espeak_speaks_the_turn_language() -> None:
    es = await synth.synthesize("La recepción está a la izquierda.", "es")
    en = await synth.synthesize("La recepción está a la izquierda.", "en-us")
    assert len(es) > 24000 and synth.rms_dbfs(es) > -40
    assert es != en
    sc = {"turns": [{"user": "hola", "say": "Hola, bienvenido.", "voice": "es"}]}
    async with running(sc) as (_emu, connect):
        c = await connect()
        await c.start()
        await c.send_audio(SPEECH + SILENCE)
        await c.wait(lambda: c.of(E.CompletionEnd))
        pcm = b"".join(a.pcm for a in c.of(E.AudioOutput))
        assert pcm == await synth.synthesize("Hola, bienvenido.", "es")


def test_output_frames_are_the_service_shape() -> None:
    from io import BytesIO

    from smithy_aws_event_stream.events import Event

    from sonic_voice.emulators.sonic.stream import chunk_frame, exception_frame

    ev = Event.decode(BytesIO(chunk_frame({"event": {"textOutput": {"content": "hi"}}})))
    assert ev.message.headers[":event-type"] == "chunk"
    inner = json.loads(ev.message.payload)
    assert set(inner) == {"bytes"}
    ex = Event.decode(BytesIO(exception_frame("modelStreamErrorException", "x")))
    assert ex.message.headers[":exception-type"] == "modelStreamErrorException"
    assert json.loads(ex.message.payload)["originalStatusCode"] == 500


async def open_product_stream(transport: Any, emu: SonicEmulator) -> Any:
    """The product's transport opened on the stand-in, its audio input started."""
    st = await transport.open_stream(
        transport.BedrockSettings(
            region=emu.region,
            model_id=E.NOVA_2_SONIC,
            endpoint_uri=emu.endpoint_uri,
            ca_bundle=emu.ca_file,
            access_key_id=emu.access_key,
            secret_access_key=emu.secret_key,
        )
    )
    try:
        for ev in (
            E.session_start(),
            E.prompt_start(PN, "tiffany"),
            E.audio_content_start(PN, "audio"),
        ):
            await st.send(ev)
    except BaseException:
        await st.close()
        raise
    return st


async def test_product_transport_open_stream_against_the_stand_in() -> None:
    """The product's own transport (sonic_voice.sonic.transport) reaches the stand-in."""
    transport = pytest.importorskip("sonic_voice.sonic.transport")
    sc = {"turns": [{"user": "hi", "say": "Hello.", "audio": TONE}]}
    async with running(sc) as (emu, _connect):
        st = await open_product_stream(transport, emu)
        try:
            for i in range(0, len(SPEECH + SILENCE), 1024):
                await st.send(E.audio_input(PN, "audio", (SPEECH + SILENCE)[i : i + 1024]))
            got = []
            while not got or not isinstance(got[-1], E.CompletionEnd):
                raw = await asyncio.wait_for(st.receive(), 20)
                assert raw is not None
                got.append(E.parse_output(raw))
            assert [g.text for g in got if isinstance(g, E.TextOutput) and g.role == "USER"] == [
                "hi"
            ]
            assert emu.records[0].signature_chain_ok
        finally:
            await st.close()


@pytest.mark.parametrize("gone", ["ended", "ended-then-server-gone"])
async def test_product_transport_closes_a_stream_the_service_ended_promptly(gone: str) -> None:
    """Closing a stream the service already ended returns at once, even when its server has
    gone since: the SDK's body writer is then dead (AWS_ERROR_HTTP_STREAM_HAS_COMPLETED) and
    an unbounded close of our input waited until it was cancelled (5 s in the tests, the
    whole stop budget of a robot told to stop)."""
    transport = pytest.importorskip("sonic_voice.sonic.transport")
    async with running() as (emu, _connect):
        st = await open_product_stream(transport, emu)
        try:
            await emu.wait_for(lambda: emu.records[0].audio_started)
            emu.inject("drop")
            with contextlib.suppress(Exception):
                while await asyncio.wait_for(st.receive(), 10) is not None:
                    pass
            if gone == "ended-then-server-gone":
                await emu.stop()
            # What a polite close sends first (the session's _retire): it may still go out.
            for ev in (E.content_end(PN, "audio"), E.prompt_end(PN), E.session_end()):
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(st.send(ev), 1)
            t0 = asyncio.get_running_loop().time()
            await asyncio.wait_for(st.close(), 10)
            took = asyncio.get_running_loop().time() - t0
            # The service ended it: our end frame is a courtesy, bounded by CLOSE_ENDED_S.
            assert took <= transport.CLOSE_ENDED_S + 0.5, f"close took {took:.2f} s"
        finally:
            await st.close()
