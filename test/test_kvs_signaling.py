"""Signaling that shrugs off garbage (issue 11 items 6-8), against the KVS stand-in with a
real KvsMaster, boto3, botocore presigning, websockets and aiortc viewers.

- item 6: every malformed frame the stand-in can send is dropped with one warning naming
  the fault, and the socket stays up (before: a reconnect 0.05-0.12 s later);
- item 7: malformed ICE candidates, before or after the offer, never block the answer and
  never end as "Task exception was never retrieved";
- item 8: trickled candidates leave at most 20 a second, after the answer, best first, and
  another viewer's answer does not queue behind them.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
from typing import Any

import pytest
import websockets

from sonic_voice.emulators.kvs import MALFORMED, KvsEmulator
from sonic_voice.kvs.control import ControlPlane
from sonic_voice.kvs.master import KvsMaster
from sonic_voice.kvs.settings import KvsSettings

from test.harness.viewer import TEST_SECRET, Viewer

CHANNEL = "robot"
CANDIDATE_KINDS = [k for k in MALFORMED if k.startswith("candidate_")]


def master_settings(emu: KvsEmulator, **kw: Any) -> KvsSettings:
    return KvsSettings(
        CHANNEL,
        endpoint_url=emu.endpoint_url,
        access_key_id="AKIDMASTER",
        secret_access_key=TEST_SECRET,
        ice_servers_override=[],
        **kw,
    )


@pytest.fixture
async def emu():
    e = KvsEmulator(channels=[CHANNEL], verify_secret=TEST_SECRET)
    await e.start()
    yield e
    await e.stop()


@pytest.fixture
async def master(emu: KvsEmulator):
    m = KvsMaster(master_settings(emu))
    await m.start()
    assert await m.wait_connected(10)
    yield m
    await m.stop()


@pytest.fixture
async def loop_errors():
    """Everything that reaches the loop's exception handler (unretrieved task exceptions)."""
    loop = asyncio.get_running_loop()
    seen: list[dict[str, Any]] = []
    old = loop.get_exception_handler()
    loop.set_exception_handler(lambda _loop, ctx: seen.append(ctx))
    yield seen
    loop.set_exception_handler(old)


_barriers = iter(range(1, 1_000_000))


async def barrier(emu: KvsEmulator, master: KvsMaster) -> None:
    """Wait until the master has read everything the stand-in sent it so far: frames on one
    socket are handled in order, so a STATUS_RESPONSE sent last is seen last."""
    corr = f"barrier.{next(_barriers)}"
    await emu.send_status_response(corr, description="barrier")
    sig = master.signaling
    for _ in range(500):
        if any(s.get("correlationId") == corr for s in sig.status_responses):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"the master never read {corr} (reconnects: {sig.reconnect_reasons})")


def bad_frame_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "sonic_voice.kvs.signaling" and "dropped a bad frame" in r.getMessage()
    ]


# -- item 6 ---------------------------------------------------------------------------------
async def test_malformed_frames_are_dropped_without_reconnect(
    emu: KvsEmulator, master: KvsMaster, caplog: pytest.LogCaptureFixture, loop_errors: list
) -> None:
    caplog.set_level(logging.INFO)
    sig = master.signaling
    for kind in MALFORMED:
        await emu.send_malformed(kind)
        await barrier(emu, master)
        assert emu.master_connects() == 1 and not sig.reconnect_reasons, (
            f"{kind} cost the connection: {sig.reconnect_reasons}"
        )
    assert sig.connects == 1
    # Each dropped once, with its reason logged once (no traceback, no ERROR).
    assert sig.bad_frames == len(MALFORMED), list(sig.rejected_frames)
    warnings = bad_frame_warnings(caplog)
    assert len(warnings) == len(MALFORMED), warnings
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    reasons = dict(zip(MALFORMED, sig.rejected_frames, strict=True))
    expected = {
        "payload_not_string": "messagePayload is int, not a string",
        "payload_list": "messagePayload is list, not a string",
        "payload_bad_base64": "not base64",
        "payload_not_ascii": "not base64",
        "payload_bad_json": "not JSON",
        "payload_not_utf8": "not JSON",
        "payload_json_list": "JSON list, not an object",
        "payload_deep_json": "nests too deeply",
        "offer_sdp_not_string": "sdp is int",
        "message_type_not_string": "messageType is list",
        "sender_not_string": "senderClientId is dict",
        "sender_missing": "senderClientId is NoneType",
        "status_not_object": "statusResponse is str, not an object",
        "status_list": "statusResponse is list, not an object",
        "correlation_id_list": "correlationId is list, not a string",
        "status_code_object": "statusCode is dict",
        "frame_deep_json": "nests too deeply",
        "candidate_garbage": "'garbage'",
        "candidate_no_mid": "neither sdpMid nor sdpMLineIndex",
        "candidate_not_string": "candidate is int, not a string",
        "candidate_bad_port": "port 99999 out of range",
        "candidate_bad_address": "'not-an-ip' is not an IP",
        "candidate_mline_string": "sdpMLineIndex is str",
    }
    assert set(expected) == set(MALFORMED)
    for kind, reason in reasons.items():
        assert expected[kind] in reason, (kind, reason)
    assert not loop_errors
    # Signaling still works: a viewer joins.
    v = await Viewer(emu.endpoint_url, CHANNEL, "after-garbage").join()
    assert await master.wait_viewers(1)
    await v.close()


# -- item 7 ---------------------------------------------------------------------------------
async def test_bad_candidates_before_the_offer_do_not_block_the_answer(
    emu: KvsEmulator, master: KvsMaster, caplog: pytest.LogCaptureFixture, loop_errors: list
) -> None:
    caplog.set_level(logging.INFO)
    for kind in CANDIDATE_KINDS:  # the viewer's early candidates, all bad
        await emu.send_malformed(kind, sender="visitor-1")
    await emu.send_as_viewer("visitor-1", "ICE_CANDIDATE", {"candidate": "", "sdpMid": "0"})
    await barrier(emu, master)
    # A real viewer with that id (trickling, one good candidate before its offer) is
    # answered and connects.
    v = await Viewer(emu.endpoint_url, CHANNEL, "visitor-1", trickle=True).join(timeout=15)
    assert [r for r in emu.routed("SDP_ANSWER") if r.recipient == "visitor-1"]
    assert await master.wait_viewers(1)
    assert master.signaling.bad_frames == len(CANDIDATE_KINDS)
    # The same when bad candidates reach the pending queue by another path than the
    # frame parser: the answer skips them with a warning.
    for bad in (
        {"candidate": "candidate:garbage", "sdpMid": "0", "sdpMLineIndex": 0},
        {"candidate": 42, "sdpMid": "0"},
        {"candidate": "candidate:1 1 udp 2122260223 127.0.0.2 9 typ host"},
        {"sdpMid": "0"},
    ):
        master._on_candidate("visitor-2", bad)
    v2 = await Viewer(emu.endpoint_url, CHANNEL, "visitor-2").join(timeout=15)
    assert await master.wait_viewers(2)
    dropped = [r for r in caplog.records if "bad ICE candidate dropped" in r.getMessage()]
    assert len(dropped) == 4, [r.getMessage() for r in dropped]
    assert not [r for r in caplog.records if "answering failed" in r.getMessage()]
    await asyncio.gather(v.close(), v2.close())
    gc.collect()
    assert not loop_errors, loop_errors


async def test_early_candidates_of_two_viewers_stay_with_their_viewer(
    emu: KvsEmulator, master: KvsMaster
) -> None:
    """Candidates of two viewers wait at once, interleaved; each viewer's peer gets its own
    and only its own (issue 16: a loop variable shadowing the client id in the expiry loop
    filed a candidate under another viewer, and no test had two viewers waiting)."""

    def cand(port: int) -> dict[str, Any]:
        line = f"candidate:{port} 1 udp 2122260223 127.0.0.2 {port} typ host"
        return {"candidate": line, "sdpMid": "0", "sdpMLineIndex": 0}

    early = {"a": (40001, 40003), "b": (40002, 40004)}
    for i in range(2):
        for client, ports in early.items():
            await emu.send_as_viewer(client, "ICE_CANDIDATE", cand(ports[i]))
    await barrier(emu, master)
    # Trickling viewers: an offer with a=end-of-candidates would make aiortc ignore them.
    va, vb = await asyncio.gather(
        Viewer(emu.endpoint_url, CHANNEL, "a", trickle=True).join(),
        Viewer(emu.endpoint_url, CHANNEL, "b", trickle=True).join(),
    )
    assert await master.wait_viewers(2)
    for client, ports in early.items():
        pc = master.peers[client].pc
        ice = pc.getTransceivers()[0].receiver.transport.transport
        got = {c.port for c in ice.getRemoteCandidates()} & {40001, 40002, 40003, 40004}
        assert got == set(ports), f"viewer {client} got early candidates on ports {got}"
    await asyncio.gather(va.close(), vb.close())


async def test_bad_candidates_on_a_live_peer_are_dropped_quietly(
    emu: KvsEmulator, master: KvsMaster, caplog: pytest.LogCaptureFixture, loop_errors: list
) -> None:
    caplog.set_level(logging.INFO)
    v = await Viewer(emu.endpoint_url, CHANNEL, "visitor-1").join()
    assert await master.wait_viewers(1)
    peer = master.peers["visitor-1"]
    for kind in CANDIDATE_KINDS:
        await emu.send_malformed(kind, sender="visitor-1")
    for bad in ({"candidate": 42, "sdpMid": "0"}, {"candidate": "candidate:garbage"}):
        master._on_candidate("visitor-1", bad)  # past the parser, straight to the peer
    # A well-formed one after end-of-candidates: aioice refuses it; that is no crash either.
    await emu.send_as_viewer("visitor-1", "ICE_CANDIDATE", {"candidate": "", "sdpMid": "0"})
    good = "candidate:9 1 udp 2122260223 127.0.0.2 9 typ host"
    await emu.send_as_viewer("visitor-1", "ICE_CANDIDATE", {"candidate": good, "sdpMid": "0"})
    await barrier(emu, master)
    for _ in range(50):
        if not [t for t in peer.tasks if "candidate" in t.get_name()]:
            break
        await asyncio.sleep(0.02)
    gc.collect()
    await asyncio.sleep(0)
    assert not loop_errors, [c.get("message") for c in loop_errors]
    assert master.signaling.bad_frames == len(CANDIDATE_KINDS)
    assert not peer.closed.is_set() and master.viewer_count == 1
    dropped = [r for r in caplog.records if "bad ICE candidate dropped" in r.getMessage()]
    assert len(dropped) == 2
    await v.close()


# -- item 8 ---------------------------------------------------------------------------------
def big_answer(n: int) -> str:
    """An answer SDP with ``n`` host candidates in its first (bundled) m-section."""
    cands = [
        f"a=candidate:{i} 1 udp {2122260223 - 1000 * ((i * 7) % n)} 10.0.{i // 250}.{i % 250 + 1}"
        f" {40000 + i} typ host"
        for i in range(n)
    ]
    lines = [
        "v=0",
        "o=- 1 1 IN IP4 0.0.0.0",
        "s=-",
        "t=0 0",
        "a=group:BUNDLE 0 1",
        "m=audio 9 UDP/TLS/RTP/SAVPF 111",
        "c=IN IP4 0.0.0.0",
        "a=mid:0",
        "a=rtpmap:111 opus/48000/2",
        *cands,
        "a=end-of-candidates",
        "m=application 9 DTLS/SCTP 5000",
        "a=mid:1",
        *cands,
        "",
    ]
    return "\r\n".join(lines)


async def viewer_socket(emu: KvsEmulator, client: str) -> Any:
    settings = master_settings(emu)
    cp = ControlPlane(settings, role="VIEWER")
    url = await asyncio.to_thread(cp.presigned_url, client)
    return await websockets.connect(url, proxy=None)


async def test_trickled_candidates_are_paced_after_the_answer(
    emu: KvsEmulator, master: KvsMaster
) -> None:
    ws1 = await viewer_socket(emu, "big")
    ws2 = await viewer_socket(emu, "other")
    assert await emu.wait_until(lambda: set(emu.viewer_ids()) == {"big", "other"})
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    await master._send_answer("big", big_answer(61))
    assert await emu.wait_until(lambda: len(emu.records) == 62)
    sent = [r for r in emu.records if r.recipient == "big"]
    assert [r.outcome for r in sent] == ["delivered"] * 62
    assert sent[0].action == "SDP_ANSWER" and sent[0].t - t0 < 0.05
    cands = [r for r in sent if r.action == "ICE_CANDIDATE"]
    assert len(cands) == 61
    times = [r.t for r in sent]
    busiest = max(sum(1 for u in times if t <= u < t + 1.0) for t in times)
    assert busiest <= 20, f"{busiest} frames in one second"
    assert times[-1] - times[0] >= 60 / 20 - 0.05
    # Best candidates first.
    prios = [int(json.loads(base64.b64decode(r.payload))["candidate"].split()[3]) for r in cands]
    assert prios == sorted(prios, reverse=True)

    # An answer for another viewer does not wait behind a queued trickle.
    trickle = asyncio.create_task(master._send_answer("big", big_answer(61)))
    await asyncio.sleep(0.3)
    t1 = loop.time()
    await master.signaling.send("SDP_ANSWER", "other", {"type": "answer", "sdp": "v=0\r\n"})
    assert loop.time() - t1 < 0.12
    await trickle
    assert await emu.wait_until(lambda: len(emu.records) == 62 * 2 + 1)
    other = [r for r in emu.records if r.recipient == "other"]
    after = [r for r in emu.records if r.recipient == "big" and r.t > other[0].t]
    assert len(after) >= 45  # most of the 61 were still queued
    await ws1.close()
    await ws2.close()


# -- the parser, table-driven -----------------------------------------------------------------
def _frame(**kw: Any) -> str:
    return json.dumps(kw)


def _b64(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def test_parse_frame_accepts_the_protocol_and_ignores_the_rest() -> None:
    from sonic_voice.kvs.frames import BadFrame, parse_frame, validate_candidate

    offer = {"type": "offer", "sdp": "v=0\r\n", "extra": 1}
    msg = parse_frame(
        _frame(messageType="SDP_OFFER", senderClientId="v1", messagePayload=_b64(offer), x=2)
    )
    assert (msg.type, msg.sender, msg.payload) == (
        "SDP_OFFER",
        "v1",
        {"type": "offer", "sdp": "v=0\r\n"},
    )
    # PascalCase, as the C SDK writes it.
    msg = parse_frame(
        _frame(MessageType="SDP_OFFER", SenderClientId="v1", MessagePayload=_b64(offer))
    )
    assert msg.sender == "v1"
    cand = {"candidate": "candidate:1 1 UDP 2122260223 abc-def.local 5000 typ host generation 0",
            "sdpMid": "0", "sdpMLineIndex": 0, "usernameFragment": "abcd"}  # fmt: skip
    msg = parse_frame(
        _frame(messageType="ICE_CANDIDATE", senderClientId="v1", messagePayload=_b64(cand))
    )
    assert msg.payload == {"candidate": cand["candidate"][10:], "sdpMid": "0", "sdpMLineIndex": 0}
    status = {"correlationId": "a.1", "statusCode": 400, "success": False, "new": 1}
    msg = parse_frame(_frame(messageType="STATUS_RESPONSE", statusResponse=status))
    assert msg.status == {"correlationId": "a.1", "statusCode": "400", "success": False}
    assert parse_frame(_frame(messageType="GO_AWAY", messagePayload=5)).type == "GO_AWAY"
    for ignored in ("", "  ", "[1]", '"x"', _frame(message="Endpoint request timed out"),
                    _frame(messageType="SOMETHING_NEW", messagePayload=[1])):  # fmt: skip
        assert parse_frame(ignored) is None
    with pytest.raises(BadFrame, match="not JSON"):
        parse_frame("{")
    assert validate_candidate({"candidate": "", "sdpMid": None})["candidate"] == ""
    for bad, why in [
        ({"candidate": "candidate:1 1 udp 1 1.2.3.4 5 typ prflx", "sdpMid": "0"}, "prflx"),
        ({"candidate": "candidate:1 1 sctp 1 1.2.3.4 5 typ host", "sdpMid": "0"}, "sctp"),
        ({"candidate": "candidate:1 x udp 1 1.2.3.4 5 typ host", "sdpMid": "0"}, "integers"),
        ({"candidate": "candidate:1 1 udp 1 1.2.3.4 5 typ host rport ²", "sdpMid": "0"}, "rport"),
        ({"candidate": "candidate:1 1 udp 1 1.2.3.4 5 foo host", "sdpMid": "0"}, "want"),
        ({"candidate": "candidate:1 1 udp 1 1.2.3.4 5 typ host", "sdpMLineIndex": True}, "integer"),
        ("candidate:1 1 udp 1 1.2.3.4 5 typ host", "not an object"),
    ]:
        with pytest.raises(BadFrame, match=why):
            validate_candidate(bad)
