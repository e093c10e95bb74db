"""Property-based fuzzing (hypothesis) of what the KVS master takes from outside: signaling
frames from the service and data-channel messages from viewers (issue 11).

Invariant: no exception escapes, no reconnect, and every input is either accepted in its
validated shape or rejected with a reason. Pure properties run a few hundred examples; the
live ones (a real master behind the KVS stand-in, a real aiortc viewer) a few dozen, so the
file runs in seconds.
"""

from __future__ import annotations

import asyncio
import base64
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sonic_voice.emulators.kvs import KvsEmulator
from sonic_voice.kvs.frames import KNOWN_TYPES, BadFrame, Inbound, parse_frame
from sonic_voice.kvs.master import KvsMaster
from sonic_voice.kvs.messages import INBOUND_TYPES, RejectedMessage, parse_inbound
from sonic_voice.kvs.peer import parse_candidate
from sonic_voice.kvs.settings import KvsSettings
from sonic_voice.kvs.signaling import SignalingClient

from test.harness.viewer import TEST_SECRET, Viewer
from test.test_kvs_signaling import CHANNEL, barrier, master_settings

# -- strategies -----------------------------------------------------------------------------
json_leaf = (
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


_fields = {
    "foundation": st.sampled_from(["1", "842163049", "x", ""]),
    "component": st.sampled_from(["1", "2", "0", "257", "x", "-1"]),
    "transport": st.sampled_from(["udp", "UDP", "tcp", "sctp", ""]),
    "priority": st.sampled_from(["2122260223", "1", "0", "4294967296", "-5", "p"]),
    "address": st.sampled_from(["127.0.0.2", "::1", "abc-1.local", "not-an-ip", "999.1.1.1"]),
    "port": st.sampled_from(["9", "40000", "65535", "65536", "-1", "x"]),
    "typ": st.sampled_from(["typ", "typ", "typ", "type"]),
    "type": st.sampled_from(["host", "srflx", "relay", "prflx", "bogus"]),
    "tail": st.sampled_from(
        ["", " generation 0", " raddr 0.0.0.0 rport 0", " rport x", " rport ²"]
    ),
}


@st.composite
def candidate_text(draw: st.DrawFn) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=40))
    f = {k: draw(v) for k, v in _fields.items()}
    line = (
        f"{f['foundation']} {f['component']} {f['transport']} {f['priority']} {f['address']} "
        f"{f['port']} {f['typ']} {f['type']}{f['tail']}"
    )
    return draw(st.sampled_from(["candidate:", "", "candidate: "])) + line


candidate_obj = st.fixed_dictionaries(
    {},
    optional={
        "candidate": candidate_text() | json_value,
        "sdpMid": st.sampled_from(["0", "1", "audio"]) | json_value,
        "sdpMLineIndex": st.integers(-2, 2000) | json_value,
        "usernameFragment": json_value,
    },
)
sdp_obj = st.fixed_dictionaries(
    {},
    optional={
        "type": st.sampled_from(["offer", "answer", "pranswer"]) | json_value,
        "sdp": st.sampled_from(["v=0\r\n", "", "garbage"]) | st.text(max_size=30) | json_value,
    },
)
payload_field = (
    (candidate_obj | sdp_obj | json_value).map(lambda o: b64(json.dumps(o).encode()))
    | st.binary(max_size=30).map(b64)
    | st.text(max_size=30)
    | json_value
)
status_obj = st.fixed_dictionaries(
    {},
    optional={
        "correlationId": st.sampled_from(["a.1", ""]) | json_value,
        "statusCode": st.sampled_from(["400", 400]) | json_value,
        "errorType": json_value,
        "description": json_value,
        "success": json_value,
    },
)
sender = st.sampled_from(["viewer-1", "viewer-2", "bad id", "AWS_x", "x" * 300]) | json_value
message_type = st.sampled_from([*sorted(KNOWN_TYPES), "NEW_TYPE"]) | json_value


@st.composite
def frame_dict(draw: st.DrawFn) -> dict[str, Any]:
    keys = {"messageType": message_type}
    optional = {
        "messagePayload": payload_field,
        "senderClientId": sender,
        "statusResponse": status_obj | json_value,
        "extra": json_value,
    }
    obj = draw(st.fixed_dictionaries(keys, optional=optional))
    if draw(st.booleans()):  # the C SDK's PascalCase
        obj = {k[:1].upper() + k[1:]: v for k, v in obj.items()}
    return obj


frame_text = (
    frame_dict().map(json.dumps)
    | json_value.map(json.dumps)
    | st.text(max_size=40)
    | st.sampled_from(["", " ", "[" * 3000, "{" * 3000, '{"messageType":' * 2000])
)


def check_inbound(msg: Inbound) -> None:
    """What the master may rely on in an accepted message."""
    assert msg.type in KNOWN_TYPES
    if msg.type in ("SDP_OFFER", "ICE_CANDIDATE"):
        assert isinstance(msg.sender, str) and msg.sender
    if msg.type in ("SDP_OFFER", "SDP_ANSWER"):
        assert isinstance(msg.payload["sdp"], str) and msg.payload["sdp"].strip()
    if msg.type == "ICE_CANDIDATE":
        parse_candidate(msg.payload)  # aiortc's parser takes it (or it is end-of-candidates)
    if msg.type == "STATUS_RESPONSE":
        assert isinstance(msg.status, dict)
        for key in ("correlationId", "statusCode", "errorType", "description"):
            assert isinstance(msg.status.get(key, ""), str)


# -- pure properties ------------------------------------------------------------------------
@settings(max_examples=400, deadline=None, database=None)
@given(frame_text)
@example('{"messageType":"SDP_OFFER","senderClientId":"v","messagePayload":12}')
@example('{"messageType":"STATUS_RESPONSE","statusResponse":{"correlationId":["a"]}}')
@example('{"messageType":"STATUS_RESPONSE","statusResponse":[1]}')
def test_fuzz_signaling_frames(text: str) -> None:
    try:
        msg = parse_frame(text)
    except BadFrame as e:
        assert str(e)  # a reason
        verdict = "bad"
    else:
        if msg is not None:
            check_inbound(msg)
        verdict = "ignored" if msg is None else msg.type
    # The client's dispatcher: never raises; reconnects only on GO_AWAY; passes on exactly
    # the accepted messages; counts exactly the rejected ones.
    got: list[Inbound] = []
    client = SignalingClient(KvsSettings("fuzz"), None, got.append)  # type: ignore[arg-type]
    renew = client._dispatch(text)
    assert renew == (verdict == "GO_AWAY")
    assert client.bad_frames == (verdict == "bad")
    passed = verdict not in ("bad", "ignored", "GO_AWAY")
    assert len(got) == passed


dc_message = (
    st.fixed_dictionaries(
        {
            "type": st.sampled_from(["text", "mute", "unmute", "audioInput", "toolResult"])
            | json_value
        },
        optional={"text": st.text(max_size=30) | json_value, "role": json_value, "x": json_value},
    ).map(json.dumps)
    | json_value.map(json.dumps)
    | st.text(max_size=60)
    | st.binary(max_size=60)
    | st.sampled_from(["[" * 3000, '{"type":"text","text":"' + "é" * 2100 + '"}'])
)


def check_dc(raw: str | bytes) -> dict[str, Any] | str:
    """parse_inbound's verdict: the accepted message, or the rejection's reason."""
    try:
        msg = parse_inbound(raw)
    except RejectedMessage as e:
        assert str(e)
        return str(e)
    assert msg["type"] in INBOUND_TYPES
    if msg["type"] == "text":
        assert set(msg) == {"type", "text"} and msg["text"] == msg["text"].strip() and msg["text"]
    else:
        assert msg == {"type": msg["type"]}
    return msg


@settings(max_examples=400, deadline=None, database=None)
@given(dc_message)
@example("[" * 3000)
def test_fuzz_data_channel_messages(raw: str | bytes) -> None:
    check_dc(raw)


# -- live: a real master behind the stand-in --------------------------------------------------
@pytest.fixture
async def emu():
    e = KvsEmulator(channels=[CHANNEL], verify_secret=TEST_SECRET)
    await e.start()
    yield e
    await e.stop()


@pytest.fixture
async def live(emu: KvsEmulator):
    """A connected master, every message it delivered, and the loop's unhandled errors."""
    got: list[tuple[str, dict]] = []
    m = KvsMaster(
        master_settings(emu, ice_timeout_s=5.0), on_message=lambda c, msg: got.append((c, msg))
    )
    await m.start()
    assert await m.wait_connected(10)
    loop = asyncio.get_running_loop()
    errors: list[dict] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx))
    yield m, got, errors
    loop.set_exception_handler(old)
    await m.stop()


@pytest.mark.timeout(120)
async def test_fuzz_frames_against_a_live_master(emu: KvsEmulator, live: tuple) -> None:
    master, _got, errors = live
    sig = master.signaling
    expected_bad = 0

    @settings(
        max_examples=60,
        database=None,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    )
    @given(frame_text)
    def collect(text: str) -> None:
        frames.append(text)

    frames: list[str] = []
    collect()  # hypothesis draws the frames; the loop below sends them over the socket
    for text in frames:
        try:
            msg = parse_frame(text)
        except BadFrame:
            expected_bad += 1
        else:
            if msg is not None and msg.type == "GO_AWAY":
                continue  # reconnecting is its meaning
        await emu.send_raw(text)
        await barrier(emu, master)
    assert emu.master_connects() == 1 and not sig.reconnect_reasons
    assert sig.bad_frames == expected_bad
    await asyncio.sleep(0.2)  # offers of garbage SDP finish failing
    assert not errors, [e.get("message") for e in errors]
    v = await Viewer(emu.endpoint_url, CHANNEL, "after-fuzz").join()
    assert await master.wait_viewers(1)
    await v.close()


@pytest.mark.timeout(120)
async def test_fuzz_data_channel_against_a_live_master(emu: KvsEmulator, live: tuple) -> None:
    master, got, errors = live
    v = await Viewer(emu.endpoint_url, CHANNEL, "fuzzer").join()
    assert await master.wait_viewers(1)
    peer = master.peers["fuzzer"]

    @settings(
        max_examples=80, deadline=None, database=None, suppress_health_check=list(HealthCheck)
    )
    @given(dc_message)
    def collect(raw: str | bytes) -> None:
        messages.append(raw)

    messages: list[str | bytes] = []
    collect()
    messages.append("[" * 3000)
    for raw in messages:
        verdict = check_dc(raw)
        before = (len(got), len(peer.rejected))
        (v.send_raw(raw))
        for _ in range(300):
            if (len(got), len(peer.rejected)) != before:
                break
            await asyncio.sleep(0.01)
        if isinstance(verdict, str):
            assert len(peer.rejected) == before[1] + 1 and peer.rejected[-1] == verdict
        else:
            assert len(got) == before[0] + 1 and got[-1] == ("fuzzer", verdict)
    replies = [m for m in v.messages if m.get("type") == "error"]
    for _ in range(100):
        if len(replies) == len(peer.rejected):
            break
        await asyncio.sleep(0.02)
        replies = [m for m in v.messages if m.get("type") == "error"]
    assert [m["reason"] for m in replies] == peer.rejected  # each told why, in order
    assert master.viewer_count == 1 and not peer.closed.is_set()
    assert not errors, [e.get("message") for e in errors]
    await v.close()
