"""Each tool kind beyond ROS, end to end through ``sonic_session`` on a real graph: the
Bedrock stand-in's toolUse -> the session node -> the tool (knowledge embedded and through
the Retrieve stand-in, MCP over stdio with the third-party ``mcp-server-time`` and with an
SDK server, MCP over streamable HTTP, a real Strands agent against the Converse stand-in,
a topic read) -> exactly one toolResult back at the stand-in: done; cancelled by a
barge-in mid-call (the far end sees the cancellation where it can); timed out."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sonic_voice.emulators.agents import AgentsEmulatorThread
from sonic_voice.emulators.sonic import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, EmulatorThread
from sonic_voice.sonic import transport

from test.harness.ros import wait_for
from test.harness.signals import speech_like
from test.test_sonic_session_node import (
    MIC,
    OUT_RATE,
    RATE,
    TIMEOUT,
    Probe,
    first_stream,
    session_node,
    tagged,
    utterance,
)
from test.test_tools_e2e import MicFeeder
from test.tools_helpers import FAQ, TIME_SERVER, SlowMcpServer, slow_stdio_server

pytestmark = pytest.mark.timeout(180)
KB = "KBFAQ00001"
SLOW_S = 30  # a slow far end: far longer than any test waits


@contextlib.contextmanager
def sonic(monkeypatch: pytest.MonkeyPatch, scenario: dict, realtime: bool) -> Iterator[Any]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DEFAULT_SECRET_KEY)
    monkeypatch.setattr(transport, "_RESOLVERS", {})
    emu = EmulatorThread(scenario=scenario, realtime=realtime).start()
    try:
        yield emu
    finally:
        emu.stop()


@contextlib.contextmanager
def kind_rig(kind: str, mode: str, tmp_path: Path, graph: Any) -> Iterator[dict[str, Any]]:
    """The tools file, the call the stand-in makes, and the far end's view of it."""
    slow = mode != "ok"
    timeout = "timeout_s: 1.0" if mode == "timeout" else "timeout_s: 60"
    common = f"{timeout}\n    cancel_on_barge_in: true"
    marker = str(tmp_path / "mcp")
    with contextlib.ExitStack() as stack:
        out: dict[str, Any] = {"started": lambda: True, "cancelled": None}
        if kind == "knowledge":
            out.update(
                name="faq",
                input={"query": "¿A qué hora abre la cafetería?"},
                yaml=f"knowledge: {{documents: {FAQ}}}\n    description: FAQ.",
            )
            out["check"] = lambda r: "8:00" in r["passages"][0]["text"]
        elif kind == "retrieve":
            emu = stack.enter_context(
                AgentsEmulatorThread(knowledge_bases={KB: FAQ}, delay_s=SLOW_S if slow else 0.0)
            )
            out.update(
                name="kb",
                input={"query": "¿A qué hora abre la cafetería?"},
                yaml=f"description: KB.\n    knowledge: {{bedrock: {{knowledge_base_id: "
                f"{KB}, region: us-east-1, endpoint_url: '{emu.endpoint_url}'}}}}",
            )
            out["started"] = lambda: bool(emu.emulator.retrieve_requests)
            out["check"] = lambda r: r["passages"][0]["source"].endswith(
                "faq.md#Cafetería: horario"
            )
        elif kind == "mcp_stdio":
            if slow:
                out.update(
                    name="slow_wait_for",
                    input={"seconds": SLOW_S},
                    yaml=f"mcp: {slow_stdio_server(marker)}}}",
                )
                out["started"] = lambda: Path(marker + ".started").exists()
                out["cancelled"] = lambda: Path(marker + ".cancelled").exists()
            else:
                out.update(
                    name="time_get_current_time",
                    input={"timezone": "UTC"},
                    yaml=f"mcp: {TIME_SERVER}, allow: [get_current_time], prefix: time_}}",
                )
                out["check"] = lambda r: '"timezone": "UTC"' in r["content"][0]
            out["entry"] = "slow" if slow else "time"
        elif kind == "mcp_http":
            srv = stack.enter_context(SlowMcpServer())
            out.update(
                name="slow_wait_for",
                input={"seconds": SLOW_S if slow else 0.1},
                yaml=f"mcp: {{url: '{srv.url}'}}",
                entry="slow",
            )
            out["started"] = srv.started.is_set
            out["cancelled"] = srv.cancelled.is_set
            out["check"] = lambda r: r["content"] == ["waited 0.1 s"]
        elif kind == "agent":
            script = (
                [{"text": "late", "delay_s": SLOW_S}]
                if slow
                else [
                    {"tool_use": {"name": "faq", "input": {"query": "cafeteria hours"}}},
                    {"text": "It opens at 8:00."},
                ]
            )
            emu = stack.enter_context(AgentsEmulatorThread(script=script))
            out.update(
                name="concierge",
                input={"task": "When does the cafeteria open?"},
                yaml=f"description: Errands.\n    agent: {{system_prompt: Be brief., "
                f"model_id: amazon.nova-lite-v1:0, region: us-east-1, endpoint_url: "
                f"'{emu.endpoint_url}', tools: [faq]}}",
                extra=f"  - name: faq\n    description: FAQ.\n"
                f"    knowledge: {{documents: {FAQ}}}\n",
            )
            out["started"] = lambda: bool(emu.emulator.converse_requests)
            out["check"] = lambda r: r["answer"] == "It opens at 8:00."
        elif kind == "read":
            from sensor_msgs.msg import BatteryState

            from sonic_voice.ros.topics import LATCHED_QOS

            pub = graph.node("battery_pub").create_publisher(
                BatteryState, "battery_state", LATCHED_QOS
            )
            if not slow:
                pub.publish(BatteryState(percentage=0.5))
            wait = "next" if slow else "latest"
            out.update(
                name="battery",
                input={},
                yaml="description: Battery.\n    read: {type: sensor_msgs/msg/BatteryState, "
                f"topic: battery_state, latched: true, wait: {wait}, wait_s: {SLOW_S}, "
                "fields: [percentage], speak: 'Battery at {percentage:.0%}'}",
            )
            out["check"] = lambda r: r["say"] == "Battery at 50%"
        entry = out.get("entry", out["name"])
        text = f"tools:\n{out.get('extra', '')}  - name: {entry}\n    {common}\n    {out['yaml']}\n"
        path = tmp_path / "tools.yaml"
        path.write_text(text)
        out["file"] = str(path)
        yield out


KINDS = ["knowledge", "retrieve", "mcp_stdio", "mcp_http", "agent", "read"]


def scenario(name: str, args: dict, mode: str) -> dict:
    turn = {
        "on": "speech",
        "user": "a question",
        "tool": {"name": name, "input": args},
        "say": "Here you are.",
        "audio": {"tone": {"freq": 420, "duration_s": 0.3}},
    }
    if mode == "barge_in":  # the stand-in talks while the tool runs, and is talked over
        return {
            "tool_timeout_s": 0.3,
            "turns": [{**turn, "audio": {"tone": {"freq": 450, "duration_s": 6.0}}}],
        }
    return {"turns": [turn]}


@pytest.mark.parametrize("mode", ["ok", "barge_in", "timeout"])
@pytest.mark.parametrize("kind", KINDS)
def test_kind_through_the_session(
    kind: str, mode: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ros_graph: Any
) -> None:
    if kind == "knowledge" and mode != "ok":
        pytest.skip(
            "an embedded search ends within milliseconds: the knowledge kind's "
            "barge-in and timeout run through the Retrieve stand-in (kind=retrieve)"
        )
    monkeypatch.setenv("SONIC_VOICE_CACHE", str(tmp_path / "cache"))
    with kind_rig(kind, mode, tmp_path, ros_graph) as rig:
        sc = scenario(rig["name"], rig["input"], mode)
        with sonic(monkeypatch, sc, realtime=mode == "barge_in") as emu:
            probe = Probe(ros_graph)
            node = session_node(ros_graph, emu, tools_file=rig["file"])
            probe.connected(node)
            rec = first_stream(emu)
            offered = [
                t["toolSpec"]["name"] for t in rec.prompt_start["toolConfiguration"]["tools"]
            ]
            assert rig["name"] in offered
            feeder = MicFeeder(probe).start()
            try:
                feeder.say(tagged(utterance(seed=21), MIC))
                if mode == "barge_in":
                    assert wait_for(rig["started"], TIMEOUT), "the far end never saw the call"
                    assert wait_for(lambda: len(probe.out_pcm()) > OUT_RATE, TIMEOUT)
                    assert not rec.tool_results, "the tool ended before the barge-in"
                    feeder.say(tagged(speech_like(0.8, RATE, seed=22), MIC, 2000))
                    assert wait_for(lambda: probe.flushes, TIMEOUT)
                t0 = time.monotonic()
                assert emu.wait_for(lambda: rec.tool_results, TIMEOUT), "no toolResult"
                took = time.monotonic() - t0
                if rig["cancelled"] is not None and mode != "ok":
                    assert wait_for(rig["cancelled"], 10), "the server never saw the cancel"
                time.sleep(0.5)  # a second toolResult would be here by now
            finally:
                feeder.stop()
    assert len(rec.tool_results) == 1, [r.parsed for r in rec.tool_results]
    result = rec.tool_results[0]
    assert result.tool_name == rig["name"]
    assert result.tool_use_id == rec.tool_uses[0]["toolUseId"]
    parsed = result.parsed
    with probe.lock:
        ends = [e for e in probe.tool_events if e["event"] == "result"]
    assert len(ends) == 1 and ends[0]["status"] == parsed["status"]
    if mode == "ok":
        assert parsed["status"] == "ok", parsed
        assert rig["check"](parsed), parsed
    elif mode == "barge_in":
        assert rec.barge_ins == 1
        assert parsed["status"] == "cancelled", parsed
        assert "barge-in" in parsed["error"]
        assert took < 5.0
    else:
        assert parsed["status"] == "timeout", parsed
        assert "1 s" in parsed["error"]
