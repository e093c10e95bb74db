"""/diagnostics from the nodes: device status (audio_io), Bedrock stream health and age,
response latency (sonic_session), read by a plain subscriber as a robot monitor would."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.parameter import Parameter

from sonic_voice.emulators.sonic import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, EmulatorThread
from sonic_voice.nodes.diagnostics import DIAGNOSTICS_QOS, ERROR, OK, DiagStatus
from sonic_voice.sonic import transport

from test.harness.ros import wait_for


class Monitor:
    def __init__(self, graph: Any) -> None:
        self.latest: dict[str, Any] = {}
        self.lock = threading.Lock()
        node = graph.node("diag_monitor")
        node.create_subscription(DiagnosticArray, "/diagnostics", self._on, DIAGNOSTICS_QOS)

    def _on(self, msg: DiagnosticArray) -> None:
        with self.lock:
            for st in msg.status:
                self.latest[st.name] = (
                    int.from_bytes(st.level, "little"),
                    st.message,
                    {kv.key: kv.value for kv in st.values},
                )

    def get(self, name: str) -> Any:
        with self.lock:
            return self.latest.get(name)


def test_audio_io_reports_its_devices(ros_graph, pulse) -> None:
    from sonic_voice.nodes.audio_io import AudioIONode

    mon = Monitor(ros_graph)
    ros_graph.add(AudioIONode(context=ros_graph.context))
    assert wait_for(lambda: (mon.get("audio_io: devices") or (None,))[0] == OK, 15)
    _level, message, values = mon.get("audio_io: devices")
    assert message == "ok"
    assert values["input"] == "ok" and values["output"] == "ok"
    assert values["echo_cancel"] == "true"
    assert wait_for(lambda: int(mon.get("audio_io: devices")[2]["mic_blocks"]) > 5, 10)


@pytest.fixture
def keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DEFAULT_SECRET_KEY)
    monkeypatch.setattr(transport, "_RESOLVERS", {})


def _session(graph: Any, emu: EmulatorThread, **extra: Any) -> Any:
    from sonic_voice.nodes.sonic_session import SonicSessionNode

    params = {
        "endpoint_uri": emu.endpoint_uri,
        "ca_bundle": emu.ca_file,
        "always_on": True,
        **extra,
    }
    return graph.add(
        SonicSessionNode(
            context=graph.context,
            parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
        )
    )


def test_session_reports_stream_health_and_response_latency(ros_graph, keys) -> None:
    scenario = {"turns": [{"on": "text", "user": "hi", "say": "Hello.", "audio": "tone"}]}
    with EmulatorThread(scenario=scenario, realtime=False) as emu:
        mon = Monitor(ros_graph)
        node = _session(ros_graph, emu, greeting="hi")
        name = "sonic_session: bedrock stream"
        assert wait_for(lambda: (mon.get(name) or (None,))[0] == OK, 20)
        # The greeting turn: USER transcript, then audio; the latency figure appears.
        assert wait_for(lambda: "last_response_ms" in (mon.get(name) or (0, 0, {}))[2], 20)
        _level, _message, values = mon.get(name)
        assert values["model"] == "amazon.nova-2-sonic-v1:0"
        assert 0 <= float(values["last_response_ms"]) < 5000
        assert float(values["stream_age_s"]) >= 0
        assert values["recoveries"] == "0"
        node.shutdown_resources()


def test_session_reports_a_fatal_error(ros_graph, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    monkeypatch.setattr(transport, "_RESOLVERS", {})
    with EmulatorThread(scenario={"turns": []}, realtime=False) as emu:
        mon = Monitor(ros_graph)
        _session(ros_graph, emu)
        name = "sonic_session: bedrock stream"
        assert wait_for(lambda: (mon.get(name) or (None,))[0] == ERROR, 20)
        assert "secret key is wrong" in mon.get(name)[1]


def test_session_without_credentials_says_so_unconfigured(ros_graph) -> None:
    """As under a launch file that drives the transitions: configure fails at once with one
    line, the node stays unconfigured, and /diagnostics and /state say why."""
    import json

    from std_msgs.msg import String

    from sonic_voice.nodes.sonic_session import SonicSessionNode
    from sonic_voice.ros.topics import LATCHED_QOS

    mon = Monitor(ros_graph)
    states: list[dict] = []
    ros_graph.node("state_probe").create_subscription(
        String, "state", lambda m: states.append(json.loads(m.data)), LATCHED_QOS
    )
    node = SonicSessionNode(
        context=ros_graph.context, parameter_overrides=[Parameter("autostart", value=False)]
    )
    ros_graph.add(node)
    from rclpy.lifecycle import TransitionCallbackReturn

    assert node.trigger_configure() == TransitionCallbackReturn.FAILURE
    assert node._state_machine.current_state[1] == "unconfigured"
    name = "sonic_session: bedrock stream"
    assert wait_for(lambda: (mon.get(name) or (None,))[0] == ERROR, 10)
    assert "no AWS credentials found" in mon.get(name)[1]
    assert wait_for(lambda: states and states[-1]["state"] == "error", 10), states
    assert "no AWS credentials found" in states[-1]["error"]


def test_diagnostics_of_a_node_destroyed_without_close_stop_ticking(
    ros_graph, caplog: pytest.LogCaptureFixture
) -> None:
    """A node destroyed without its teardown (no ``close()``): its diagnostics' periodic
    job on the loop stops at its next tick instead of logging a failure every period for
    the rest of the process."""
    from sonic_voice.nodes.diagnostics import Diagnostics

    node = ros_graph.node("diag_orphan", spin=False)
    diag = Diagnostics(node, period_s=0.02)
    diag.add("x", lambda: DiagStatus(OK, "fine"))
    assert wait_for(lambda: diag.published >= 2, 5)
    timer = diag._timer
    node.destroy_node()
    assert wait_for(lambda: timer.cancelled, 5)
    ticks = timer.ticks
    threading.Event().wait(0.2)  # ten periods
    assert timer.ticks == ticks
    assert not [r for r in caplog.records if "periodic" in r.getMessage()], caplog.text
