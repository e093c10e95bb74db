"""Tool kinds beyond ROS (knowledge, mcp, agent) and robot state (read), each through the
provider the session uses: real SQLite FTS5, real boto3 against the Retrieve stand-in, the
real ``mcp-server-time`` from PyPI over stdio and an SDK server over streamable HTTP, real
Strands against the ConverseStream stand-in. Every call ends in exactly one ToolResult:
done, timed out, or cancelled mid-call (the far end sees the cancellation)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest

from sonic_voice.emulators.agents import AgentsEmulatorThread
from sonic_voice.sonic.tools_seam import ToolResult, ToolUse
from sonic_voice.tools import ToolConfigError, load_tool_config, load_tools

from test.tools_helpers import FAQ, ROOT, TIME_SERVER, SlowMcpServer

pytestmark = pytest.mark.timeout(120)
KB = "KBFAQ00001"


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SONIC_VOICE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDTOOLSTEST")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "tools-test-secret")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "tools.yaml"
    p.write_text(textwrap.dedent(text))
    return str(p)


class Progress:
    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []

    def __call__(self, text: str, data: dict[str, Any]) -> None:
        self.events.append((text, data))


async def call(p: Any, name: str, args: dict[str, Any], prog: Any = None) -> ToolResult:
    return await p.run(ToolUse(f"id-{name}-{time.monotonic_ns()}", name, args), prog or Progress())


async def cancel_mid_call(p: Any, name: str, args: dict[str, Any], started: Any) -> ToolResult:
    """Start a call, wait until the far end is working on it, cancel it (as a barge-in)."""
    task = asyncio.create_task(call(p, name, args))
    loop = asyncio.get_running_loop()
    assert await loop.run_in_executor(None, started, 20), "the far end never saw the call"
    assert [t["tool"] for t in p.running_tools()] == [name]
    n = await p.cancel_all("barge-in")
    assert n == 1
    return await asyncio.wait_for(task, 20)


# ------------------------------------------------------------------------------ rclpy-free
def test_knowledge_mcp_agent_never_import_rclpy(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        f"""
        tools:
          - name: faq
            description: Building FAQ.
            knowledge: {{documents: {FAQ}}}
          - name: time
            mcp: {TIME_SERVER}, allow: [get_current_time]}}
          - name: helper
            description: Plans errands.
            agent: {{system_prompt: Be brief., model_id: amazon.nova-lite-v1:0,
                     region: us-east-1, tools: [faq, time_get_current_time]}}
    """,
    )
    code = textwrap.dedent(f"""
        import sys
        from sonic_voice.tools import load_tools
        p = load_tools({cfg!r})
        names = sorted(s["toolSpec"]["name"] for s in p.tool_specs())
        p.shutdown()
        print(names, 'rclpy' in sys.modules)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=90, cwd=ROOT)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "['faq', 'helper', 'time_get_current_time'] False"


# ------------------------------------------------------------------------------ knowledge
def test_knowledge_embedded_answers_in_spanish_and_english_with_source(tmp_path: Path) -> None:
    p = load_tools(
        write(
            tmp_path,
            f"""
        tools:
          - name: faq
            description: Building FAQ.
            knowledge: {{documents: {FAQ}, languages: [es, en], top_k: 2, max_chars: 400}}
    """,
        )
    )
    try:
        es = asyncio.run(call(p, "faq", {"query": "¿A qué hora abre la cafetería?"}))
        en = asyncio.run(call(p, "faq", {"query": "When does the cafeteria open?"}))
        none = asyncio.run(call(p, "faq", {"query": "zzzz qqqq"}))
    finally:
        p.shutdown()
    assert es.status == "ok", es.content
    top = es.content["passages"][0]
    assert top["source"] == "faq.md#Cafetería: horario"
    assert "8:00" in top["text"] and "17:00" in top["text"]
    assert en.content["passages"][0]["source"] == "faq.md#Cafeteria: opening hours"
    assert sum(len(x["text"]) for x in es.content["passages"]) <= 400
    assert none.status == "error" and none.content["outcome"] == "not_found"


def test_knowledge_index_cached_by_content_hash(tmp_path: Path) -> None:
    from sonic_voice.tools.knowledge_index import KnowledgeIndex

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("The library opens at nine.\n\nLa biblioteca abre a las nueve.\n")
    cache = tmp_path / "c"
    _, built1 = KnowledgeIndex.from_folder(docs, ["en", "es"], cache)
    idx, built2 = KnowledgeIndex.from_folder(docs, ["en", "es"], cache)
    assert (built1, built2) == (True, False)
    assert [p.source for p in idx.search("¿cuándo abre la biblioteca?", 1)] == ["a.txt:3"]
    (docs / "a.txt").write_text("The gym opens at six.\n")
    idx, built3 = KnowledgeIndex.from_folder(docs, ["en", "es"], cache)
    assert built3 and [p.text for p in idx.search("gym", 1)] == ["The gym opens at six."]
    assert len([d for d in cache.iterdir() if d.is_dir()]) == 2


def kb_yaml(emu: AgentsEmulatorThread, timeout_s: float = 10) -> str:
    return f"""
        tools:
          - name: kb
            description: The building's Knowledge Base.
            timeout_s: {timeout_s}
            cancel_on_barge_in: true
            knowledge:
              bedrock: {{knowledge_base_id: {KB}, number_of_results: 3, region: us-east-1,
                        endpoint_url: "{emu.endpoint_url}",
                        filter: {{equals: {{key: lang, value: es}}}}}}
    """


def test_knowledge_bedrock_retrieve_through_boto3(tmp_path: Path) -> None:
    with AgentsEmulatorThread(knowledge_bases={KB: FAQ}) as emu:
        p = load_tools(write(tmp_path, kb_yaml(emu)))
        try:
            r = asyncio.run(call(p, "kb", {"query": "¿A qué hora abre la cafetería?"}))
        finally:
            p.shutdown()
        (req,) = emu.emulator.retrieve_requests
    assert r.status == "ok", r.content
    assert r.content["passages"][0]["source"] == f"s3://{KB.lower()}/faq.md#Cafetería: horario"
    assert req["kb"] == KB
    assert req["body"] == {
        "retrievalQuery": {"text": "¿A qué hora abre la cafetería?"},
        "retrievalConfiguration": {"vectorSearchConfiguration": {
            "numberOfResults": 3, "filter": {"equals": {"key": "lang", "value": "es"}}}},
    }  # fmt: skip


def test_knowledge_retrieve_timeout_and_cancel(tmp_path: Path) -> None:
    with AgentsEmulatorThread(knowledge_bases={KB: FAQ}, delay_s=3.0) as emu:
        p = load_tools(write(tmp_path, kb_yaml(emu, timeout_s=0.5)))
        try:

            async def timed() -> tuple[ToolResult, float]:
                t0 = time.monotonic()
                return await call(p, "kb", {"query": "cafetería"}), time.monotonic() - t0

            r, took = asyncio.run(timed())
            n = len(emu.emulator.retrieve_requests)
            c = asyncio.run(cancel_mid_call(
                p, "kb", {"query": "aseos"},
                lambda t: _wait(lambda: len(emu.emulator.retrieve_requests) > n, t)))  # fmt: skip
        finally:
            p.shutdown()
    assert r.status == "timeout" and "0.5 s" in r.content["error"], r.content
    assert took < 2.0
    assert c.status == "cancelled" and "barge-in" in c.content["error"]
    assert p.running == 0


def _wait(pred: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.01)
    return False


# ------------------------------------------------------------------------------ mcp
def test_mcp_stdio_third_party_time_server(tmp_path: Path) -> None:
    p = load_tools(
        write(
            tmp_path,
            f"""
        tools:
          - name: clock
            description: "World clock:"
            mcp: {TIME_SERVER}, allow: [get_current_time, convert_time], prefix: clock_}}
    """,
        )
    )
    try:
        specs = {s["toolSpec"]["name"]: s["toolSpec"] for s in p.tool_specs()}
        r = asyncio.run(call(p, "clock_get_current_time", {"timezone": "Europe/Madrid"}))
        bad = asyncio.run(call(p, "clock_get_current_time", {}))
    finally:
        p.shutdown()
    assert sorted(specs) == ["clock_convert_time", "clock_get_current_time"]
    schema = json.loads(specs["clock_get_current_time"]["inputSchema"]["json"])
    assert schema["required"] == ["timezone"]  # the server's own schema
    assert specs["clock_get_current_time"]["description"].startswith("World clock:")
    assert r.status == "ok", r.content
    body = json.loads(r.content["content"][0])
    assert body["timezone"] == "Europe/Madrid" and body["datetime"][-6:] in ("+01:00", "+02:00")
    assert bad.status == "error" and bad.content["invalid_input"] is True  # never sent


def test_mcp_http_progress_timeout_and_cancel_reach_the_server(tmp_path: Path) -> None:
    with SlowMcpServer() as srv:
        p = load_tools(
            write(
                tmp_path,
                f"""
            tools:
              - name: slow
                timeout_s: 0.6
                cancel_on_barge_in: true
                mcp:
                  url: "{srv.url}"
                  headers: {{X-Robot: lobby-1}}
                  prefix: ""
                  progress: {{every_s: 0, speak: "{{message}}"}}
        """,
            )
        )
        try:
            prog = Progress()
            done = asyncio.run(call(p, "wait_for", {"seconds": 0.2}, prog))
            t = asyncio.run(call(p, "wait_for", {"seconds": 5}))
            assert srv.cancelled.wait(10), "the server never saw the timeout's cancellation"
            srv.cancelled.clear()
            srv.started.clear()
            c = asyncio.run(cancel_mid_call(p, "wait_for", {"seconds": 0.5}, srv.started.wait))
            assert srv.cancelled.wait(10), "the server never saw the barge-in's cancellation"
        finally:
            p.shutdown()
    assert done.status == "ok" and done.content["content"] == ["waited 0.2 s"], done.content
    assert prog.events and prog.events[0][0] == "step 1 of 4"
    assert prog.events[0][1]["feedback"]["total"] == 4
    assert t.status == "timeout" and c.status == "cancelled"
    assert srv.calls == 3 and srv.headers == ["lobby-1"] * 3


def test_mcp_crashed_server_errors_then_restarts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sonic_voice.tools.bindings import mcp as mcp_kind

    monkeypatch.setattr(mcp_kind, "BACKOFF_S", (3.0, 10.0))  # room to call while it is down
    p = load_tools(
        write(
            tmp_path,
            f"""
        tools:
          - name: clock
            mcp: {TIME_SERVER}, allow: [get_current_time]}}
    """,
        )
    )
    server = p.tools["clock_get_current_time"].binding.server
    try:
        pids = _children()
        assert pids, "no server process"
        for pid in pids:
            subprocess.run(["kill", "-9", str(pid)], check=False)
        assert _wait(lambda: not server.up, 10), "the crash went unnoticed"
        r = asyncio.run(call(p, "clock_get_current_time", {"timezone": "UTC"}))
        assert r.status == "error" and r.content["server_absent"] is True, r.content
        assert "restarting" in r.content["error"]
        assert _wait(lambda: server.up, 20), server.last_error
        ok = asyncio.run(call(p, "clock_get_current_time", {"timezone": "UTC"}))
    finally:
        p.shutdown()
    assert ok.status == "ok" and server.restarts == 1


def _children() -> list[int]:
    import os

    out = subprocess.run(["pgrep", "-P", str(os.getpid()), "-f", "mcp_server_time"],
                         capture_output=True, text=True)  # fmt: skip
    return [int(x) for x in out.stdout.split()]


# ------------------------------------------------------------------------------ agent
def agent_yaml(emu: AgentsEmulatorThread, timeout_s: float = 20) -> str:
    return f"""
        tools:
          - name: time
            mcp: {TIME_SERVER}, allow: [get_current_time]}}
          - name: faq
            description: Building FAQ.
            knowledge: {{documents: {FAQ}}}
          - name: concierge
            description: Plans errands with several steps.
            timeout_s: {timeout_s}
            cancel_on_barge_in: true
            agent:
              system_prompt: You help visitors. Be brief.
              model_id: amazon.nova-lite-v1:0
              region: us-east-1
              endpoint_url: "{emu.endpoint_url}"
              tools: [time_get_current_time, faq]
    """


def test_agent_strands_uses_mcp_and_knowledge_tools(tmp_path: Path) -> None:
    script = [
        {"tool_use": {"name": "faq", "input": {"query": "cafeteria opening hours"}}},
        {"tool_use": {"name": "time_get_current_time", "input": {"timezone": "UTC"}}},
        {"text": "Checked: {tool_result}"},
    ]
    with AgentsEmulatorThread(script=script) as emu:
        p = load_tools(write(tmp_path, agent_yaml(emu)))
        try:
            prog = Progress()
            r = asyncio.run(call(p, "concierge", {"task": "Is the cafeteria open now?"}, prog))
        finally:
            p.shutdown()
        reqs = emu.emulator.converse_requests
    assert r.status == "ok", r.content
    assert r.content["answer"].startswith("Checked: ") and '"timezone": "UTC"' in r.content[
        "answer"].replace("\\", "")  # fmt: skip
    assert len(reqs) == 3 and reqs[0]["model"] == "amazon.nova-lite-v1:0"
    body = reqs[0]["body"]
    assert body["system"] == [{"text": "You help visitors. Be brief."}]
    offered = sorted(t["toolSpec"]["name"] for t in body["toolConfig"]["tools"])
    assert offered == ["faq", "time_get_current_time"]
    faq_result = reqs[1]["body"]["messages"][-1]["content"][0]["toolResult"]
    assert "8:00" in json.dumps(faq_result, ensure_ascii=False)
    assert [d["feedback"]["agent_tool"] for _t, d in prog.events] == [
        "faq", "time_get_current_time"]  # fmt: skip


def test_agent_timeout_and_cancel(tmp_path: Path) -> None:
    script = [{"text": "too late", "delay_s": 5.0}] * 2
    with AgentsEmulatorThread(script=script) as emu:
        p = load_tools(write(tmp_path, agent_yaml(emu, timeout_s=1.0)))
        try:
            t = asyncio.run(call(p, "concierge", {"task": "slow"}))
            c = asyncio.run(cancel_mid_call(
                p, "concierge", {"task": "slow"},
                lambda w: _wait(lambda: len(emu.emulator.converse_requests) == 2, w)))  # fmt: skip
        finally:
            p.shutdown()
    assert t.status == "timeout" and "1 s" in t.content["error"], t.content
    assert c.status == "cancelled"


# ------------------------------------------------------------------------------ read
READ_TOOLS = """
    tools:
      - name: battery
        description: Battery level.
        cancel_on_barge_in: true
        read: {type: sensor_msgs/msg/BatteryState, topic: battery_state,
               fields: [percentage, voltage], speak: "Battery at {percentage:.0%}"}
      - name: next_odom
        description: The next pose report.
        timeout_s: 0.5
        cancel_on_barge_in: true
        read: {type: std_msgs/msg/String, topic: pose_text, wait: next, wait_s: 5}
"""


def test_read_latest_next_timeout_cancel(ros_graph: Any, tmp_path: Path) -> None:
    from sensor_msgs.msg import BatteryState
    from std_msgs.msg import String

    from sonic_voice.tools import load_provider

    from test.harness.ros import wait_for

    node = ros_graph.node("read_test", spin=False)
    p = load_provider(node, write(tmp_path, READ_TOOLS))
    ros_graph.add(node)
    pub_node = ros_graph.node("robot")
    bat = pub_node.create_publisher(BatteryState, "battery_state", 1)
    pose = pub_node.create_publisher(String, "pose_text", 10)
    try:
        assert wait_for(lambda: bat.get_subscription_count() == 1, 10)
        bat.publish(BatteryState(percentage=0.82, voltage=24.5))
        b = p.tools["battery"].binding
        assert wait_for(lambda: b.latest is not None, 10)
        r = asyncio.run(call(p, "battery", {}))
        t = asyncio.run(call(p, "next_odom", {}))

        async def next_one() -> ToolResult:
            task = asyncio.create_task(call(p, "next_odom", {}))
            await asyncio.sleep(0.1)
            pose.publish(String(data="lobby"))
            return await task

        assert wait_for(lambda: pose.get_subscription_count() == 1, 10)
        n = asyncio.run(next_one())
        c = asyncio.run(cancel_mid_call(p, "next_odom", {}, lambda w: _wait(lambda: p.running, w)))
    finally:
        p.shutdown()
    assert r.status == "ok", r.content
    assert r.content["message"]["percentage"] == pytest.approx(0.82)
    assert r.content["say"] == "Battery at 82%"
    assert t.status == "timeout", t.content
    assert n.status == "ok" and n.content["message"] == {"data": "lobby"}
    assert c.status == "cancelled"


# ------------------------------------------------------------------------------ config
def test_yaml_mixing_all_kinds_loads(ros_graph: Any, tmp_path: Path) -> None:
    from sonic_voice.tools import load_provider

    with AgentsEmulatorThread(knowledge_bases={KB: FAQ}) as emu, SlowMcpServer() as srv:
        text = f"""
            tools:
              - name: count
                description: Fibonacci.
                input: {{type: object, properties: {{order: {{type: integer}}}}}}
                action: {{type: test_msgs/action/Fibonacci, server: fibonacci,
                          goal: {{order: {{input: order}}}}}}
              - name: lights
                description: Lights.
                service: {{type: std_srvs/srv/Trigger, name: lights}}
              - name: beep
                description: Beep.
                topic: {{type: std_msgs/msg/Empty, name: beep}}
              - name: stop
                description: Stop.
                cancel: {{}}
              - name: battery
                description: Battery.
                read: {{type: sensor_msgs/msg/BatteryState, topic: battery_state}}
              - name: faq
                description: FAQ.
                knowledge: {{documents: {FAQ}}}
              - name: kb
                description: KB.
                knowledge:
                  bedrock: {{knowledge_base_id: {KB}, endpoint_url: "{emu.endpoint_url}"}}
              - name: time
                mcp: {TIME_SERVER}, allow: [get_current_time]}}
              - name: slow
                mcp: {{url: "{srv.url}"}}
              - name: concierge
                description: Errands.
                agent: {{system_prompt: Hi., model_id: m, endpoint_url: "{emu.endpoint_url}",
                         tools: [faq, time_get_current_time, count]}}
        """
        node = ros_graph.node("mixed", spin=False)
        p = load_provider(node, write(tmp_path, text))
        ros_graph.add(node)
        try:
            names = sorted(s["toolSpec"]["name"] for s in p.tool_specs())
            kinds = {t.kind for t in p.tools.values()}
        finally:
            p.shutdown()
    assert names == sorted(["count", "lights", "beep", "stop", "battery", "faq", "kb",
                            "time_get_current_time", "slow_wait_for", "concierge"])  # fmt: skip
    assert kinds == {"action", "service", "topic", "cancel", "read", "knowledge", "mcp", "agent"}


MISTAKES = [
    ("mcp: {command: no-such-mcp-server}", "mcp.command", "no-such-mcp-server"),
    (f"mcp: {{command: {sys.executable}, args: [-m, no_such_module_xyz]}}", "mcp.command",
     "the server did not start"),
    (f"mcp: {TIME_SERVER}, allow: [get_time]}}", "mcp.allow", "no tool 'get_time'"),
    ("mcp: {url: 'ftp://x'}", "mcp.url", "http(s) URL"),
    (f"mcp: {TIME_SERVER}, url: 'http://127.0.0.1:1/mcp'}}", "mcp.command", "not both"),
    ("description: D.\n    knowledge: {documents: no_such_folder}", "knowledge.documents",
     "does not exist"),
    ("description: D.\n    knowledge: {bedrock: {knowledge_base_id: abc}}",
     "knowledge.bedrock.knowledge_base_id", "10-character"),
    ("description: D.\n    knowledge: {documents: ., languages: [xx]}", "knowledge.languages",
     "'xx'"),
    ("description: D.\n    agent: {system_prompt: s, model_id: m, tools: [nope]}", "agent.tools",
     "'nope'"),
    ("description: D.\n    agent: {model_id: m}", "agent.system_prompt", "required"),
    ("description: D.\n    read: {type: std_msgs/msg/String, topic: t, fields: [nope]}", "read",
     "no field 'nope'"),
    ("description: D.\n    topic: {type: std_msgs/msg/Empty, name: beep}", "topic",
     "needs a ROS node"),
]  # fmt: skip


@pytest.mark.parametrize(("section", "field", "why"), MISTAKES)
def test_mistakes_are_one_line_naming_file_tool_field(
    tmp_path: Path, section: str, field: str, why: str
) -> None:
    (tmp_path / "notes.md").write_text("x\n")
    path = write(tmp_path, f"tools:\n  - name: broken\n    {section}\n")
    with pytest.raises(ToolConfigError) as e:
        p = load_tools(path)
        p.shutdown()
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"{path}:2: tool 'broken': {field}"), msg
    assert why in msg, msg


def test_static_load_needs_no_server(tmp_path: Path) -> None:
    """load_tool_config checks commands and folders but starts nothing."""
    cfg = load_tool_config(
        write(
            tmp_path,
            f"""
        tools:
          - name: time
            mcp: {TIME_SERVER}}}
    """,
        )
    )
    assert cfg.tools["time"].kind == "mcp" and cfg.tools["time"].binding.server is None


def test_offline_demo_knowledge_turn_finds_the_cafeteria_hours(ros_graph: Any) -> None:
    """The shipped scenario's knowledge call, through the shipped tools.yaml and FAQ."""
    from sonic_voice.emulators.sonic.scenario import Scenario
    from sonic_voice.tools import load_provider

    turns = Scenario.load(ROOT / "config" / "scenarios" / "offline_demo.yaml").turns
    (use,) = [c for t in turns for c in t.tools if c.name == "knowledge"]
    node = ros_graph.node("demo_tools", spin=False)
    p = load_provider(node, str(ROOT / "config" / "tools.yaml"),
                      str(ROOT / "config" / "locations.yaml"))  # fmt: skip
    ros_graph.add(node)
    try:
        r = asyncio.run(call(p, use.name, use.input))
    finally:
        p.shutdown()
    assert use.input == {"query": "¿A qué hora abre la cafetería?"}
    assert r.status == "ok", r.content
    top = r.content["passages"][0]
    assert top["source"] == "faq.md#Cafetería: horario"
    assert "de 8:00\na 17:00" not in top["text"] and "8:00 a 17:00" in top["text"]


def test_cancel_one_call_by_id_or_predicate_others_run_on(tmp_path: Path) -> None:
    """For the session's barge-in policy (issue 15): running_tools() lists the calls;
    cancel(use_id) and cancel(predicate) stop only those; cancel_all leaves tools that
    neither move the robot nor are cancel_on_barge_in."""
    with SlowMcpServer() as srv:
        p = load_tools(
            write(
                tmp_path,
                f"""
            tools:
              - name: slow
                mcp: {{url: "{srv.url}", prefix: ""}}
        """,
            )
        )

        async def main() -> tuple[list[ToolResult], list[dict], int, int]:
            a = asyncio.create_task(p.run(ToolUse("a", "wait_for", {"seconds": 0.8}), Progress()))
            b = asyncio.create_task(p.run(ToolUse("b", "wait_for", {"seconds": 30}), Progress()))
            c = asyncio.create_task(p.run(ToolUse("c", "wait_for", {"seconds": 30}), Progress()))
            await asyncio.to_thread(_wait, lambda: srv.calls == 3, 20)
            listed = p.running_tools()
            n_all = await p.cancel_all("barge-in")  # none is moves_robot/cancel_on_barge_in
            n_b = await p.cancel("b", "the visitor changed their mind")
            n_c = await p.cancel(lambda call: call.use_id == "c", "stop")
            return list(await asyncio.gather(a, b, c)), listed, n_all, n_b + n_c

        try:
            (ra, rb, rc), listed, n_all, n_bc = asyncio.run(main())
        finally:
            p.shutdown()
    assert sorted(t["tool_use_id"] for t in listed) == ["a", "b", "c"]
    assert {t["kind"] for t in listed} == {"mcp"}
    assert not any(t["cancel_on_barge_in"] or t["moves_robot"] for t in listed)
    assert n_all == 0 and n_bc == 2
    assert ra.status == "ok" and ra.content["content"] == ["waited 0.8 s"]
    assert rb.status == "cancelled" and "changed their mind" in rb.content["error"]
    assert rc.status == "cancelled" and "(stop)" in rc.content["error"]
    assert p.running == 0


def test_a_tool_nova_sonic_cannot_take_is_a_start_up_error(tmp_path: Path) -> None:
    from sonic_voice.tools.bindings.mcp import schema_problem

    assert schema_problem({"type": "object", "properties": {"a": {"type": "string"}}}) == ""
    assert "top-level type" in schema_problem({"type": "array", "items": {}})
    assert "not valid JSON Schema" in schema_problem({"type": "object", "properties": 3})
    remote = {"type": "object", "properties": {"a": {"$ref": "https://x.example/s.json"}}}
    assert "remote schema" in schema_problem(remote)
    local = {"type": "object", "$defs": {"p": {"type": "string"}},
             "properties": {"a": {"$ref": "#/$defs/p"}}}  # fmt: skip
    assert schema_problem(local) == ""
    big = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(900)}}
    assert "characters" in schema_problem(big)
    # A server tool whose offered name Nova Sonic cannot take: file, entry, server tool.
    path = write(
        tmp_path,
        f"""
        tools:
          - name: clock
            mcp: {TIME_SERVER}, allow: [get_current_time], prefix: "9-"}}
    """,
    )
    with pytest.raises(ToolConfigError) as e:
        load_tools(path).shutdown()
    msg = str(e.value)
    assert msg.startswith(f"{path}:3: tool 'clock': mcp: server tool 'get_current_time'"), msg
    assert "not a Nova Sonic tool name" in msg and "\n" not in msg
