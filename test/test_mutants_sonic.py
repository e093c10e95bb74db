"""Sonic layer: the cases bench/mutation.py found untested (issue 16), in milliseconds.

- the transcript ``stage`` a listener sees (SPECULATIVE passed through; a TEXT content
  without ``generationStage`` counts as FINAL), through ``SonicSession``'s ``opener`` hook
  and the in-process fake stream;
- the re-read period of static credentials (``STATIC_REREAD_S``, 30 s): reused while
  fresh (the SDK asks for every signed 32 ms frame), read again after it (a rotated key
  is used), with botocore's real credential chain reading the environment and a fake
  monotonic clock.
"""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from sonic_voice.emulators.sonic.fake import FakeService
from sonic_voice.sonic import transport
from sonic_voice.sonic.transport import BotocoreCredentialsResolver

from test.test_sonic_session_unit import make, until

pytestmark = pytest.mark.timeout(60)


async def test_transcript_stage_is_passed_through_and_defaults_to_final() -> None:
    """Kills ``stage or 'FINAL'`` -> ``stage and 'FINAL'`` (session.py, _on_text): a
    SPECULATIVE assistant transcript would be reported as FINAL (a viewer shows the
    answer twice) and a transcript without a stage as ``None``."""
    svc = FakeService()
    session, rec = make(svc)
    await session.start()
    try:
        s = svc.current
        s.start_completion()
        s.text("ASSISTANT", "Welcome!", "SPECULATIVE")
        s.text("ASSISTANT", "Welcome!", "FINAL")
        # A TEXT content without additionalModelFields (no generationStage at all).
        s.emit(
            "contentStart",
            {
                "contentId": "c-nostage",
                "type": "TEXT",
                "role": "ASSISTANT",
                "textOutputConfiguration": {"mediaType": "text/plain"},
            },
        )
        s.emit("textOutput", {"contentId": "c-nostage", "content": "Bye.", "role": "ASSISTANT"})
        s.emit("contentEnd", {"contentId": "c-nostage", "type": "TEXT", "stopReason": "END_TURN"})
        s.end_completion()
        await until(lambda: len(rec.transcripts) >= 3)
    finally:
        await session.stop()
    got = [(t["role"], t["text"], t["stage"]) for t in rec.transcripts]
    assert got == [
        ("ASSISTANT", "Welcome!", "SPECULATIVE"),
        ("ASSISTANT", "Welcome!", "FINAL"),
        ("ASSISTANT", "Bye.", "FINAL"),
    ]
    assert rec.finals("ASSISTANT") == ["Welcome!", "Bye."]


@pytest.fixture
def env_only_chain(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """botocore's chain sees only the environment: no profile files, no IMDS, no SSO."""
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
        "AWS_CONTAINER_CREDENTIALS_FULL_URI",
        "AWS_WEB_IDENTITY_TOKEN_FILE",
        "AWS_ROLE_ARN",
    ):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret-1")


async def test_static_keys_are_reused_30_s_then_read_again(
    env_only_chain: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Kills ``STATIC_REREAD_S = 30.0`` -> ``60.0`` (and a re-read on every call): a key
    rotated in the environment is used from 30 s after the last read, not before."""
    now = [1000.0]
    monkeypatch.setattr(transport, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDFIRST")
    resolver = BotocoreCredentialsResolver()

    async def key_at(t: float) -> str:
        now[0] = 1000.0 + t
        return (await resolver.get_identity()).access_key_id

    assert await key_at(0.0) == "AKIDFIRST"
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDSECOND")  # rotated on disk / in env
    assert await key_at(1.0) == "AKIDFIRST"  # per-frame calls reuse the identity
    assert await key_at(29.9) == "AKIDFIRST"
    assert await key_at(30.5) == "AKIDSECOND"  # read again after 30 s
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTHIRD")
    assert await key_at(59.0) == "AKIDSECOND"  # the period restarts at the re-read
    assert await key_at(61.0) == "AKIDTHIRD"
    assert (await resolver.get_identity()).secret_access_key == "secret-1"


@pytest.mark.parametrize("given", ["access_key_id", "secret_access_key"])
async def test_half_a_static_key_falls_back_to_the_standard_chain(
    env_only_chain: None, monkeypatch: pytest.MonkeyPatch, given: str
) -> None:
    """Static keys are used only as a pair: settings that carry one half (a launch file
    that sets only ``access_key_id``) sign with the standard chain's credentials, which
    the stand-in accepts. Kills ``access_key_id and secret_access_key`` -> ``or``
    (transport.open_stream): the request would be signed with a key and no secret."""
    from sonic_voice.emulators.sonic.server import SonicEmulator

    emu = SonicEmulator({"turns": []}, realtime=False)
    await emu.start()
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", emu.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", emu.secret_key)
    try:
        settings = transport.BedrockSettings(
            region=emu.region,
            endpoint_uri=emu.endpoint_uri,
            ca_bundle=emu.ca_file,
            open_timeout_s=10,
            **{given: "HALF-OF-A-PAIR"},
        )
        stream = await transport.open_stream(settings)
        try:
            # Signed with the environment's pair, which the stand-in verified.
            assert [(r.request_signature_ok, r.http_status) for r in emu.records] == [(True, 200)]
        finally:
            await stream.close(drain_s=0.5)
    finally:
        await emu.stop()
