"""A fleet: two robots in one ROS graph by namespace (robot1, robot2), each with its own KVS
channel and its own Bedrock session. A viewer joining robot2's channel reaches robot2 only:
its chat goes to robot2's stream, robot2's answer comes back, robot1 sees no viewer."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from rclpy.parameter import Parameter

from sonic_voice.emulators.kvs import KvsEmulatorThread
from sonic_voice.emulators.sonic.server import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_SECRET_KEY,
    EmulatorThread,
)
from sonic_voice.nodes.kvs_webrtc import KvsWebrtcNode
from sonic_voice.nodes.sonic_session import SonicSessionNode
from sonic_voice.sonic import transport

from test.harness.ros import wait_for
from test.harness.viewer import Viewer

TIMEOUT = 30
VOICES = {"robot1": "matthew", "robot2": "tiffany"}  # tells the robots' streams apart


@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DEFAULT_SECRET_KEY)
    monkeypatch.setattr(transport, "_RESOLVERS", {})
    scenario = {"loop": True, "turns": [{"on": "text", "say": "On my way.", "audio": "none"}]}
    sonic = EmulatorThread(scenario=scenario, realtime=False).start()
    kvs = KvsEmulatorThread(channels=list(VOICES)).start()
    try:
        yield sonic, kvs
    finally:
        kvs.stop()
        sonic.stop()


def _node(cls: Any, graph: Any, namespace: str, **params: Any) -> Any:
    node = cls(
        context=graph.context,
        namespace=namespace,
        parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
    )
    graph.add(node)
    return node


def _voice(rec: Any) -> str:
    start = next(e for e in rec.events if e.name == "promptStart")
    return start.body["audioOutputConfiguration"]["voiceId"]


@pytest.mark.timeout(150)
def test_a_viewer_of_robot2_reaches_robot2_only(ros_graph: Any, stand_ins: Any) -> None:
    sonic, kvs = stand_ins
    sessions, masters = {}, {}
    for robot, voice in VOICES.items():
        sessions[robot] = _node(
            SonicSessionNode,
            ros_graph,
            f"/{robot}",
            endpoint_uri=sonic.endpoint_uri,
            ca_bundle=sonic.ca_file,
            voice_id=voice,
            always_on=True,
            check_on_start=False,
        )
        masters[robot] = _node(
            KvsWebrtcNode,
            ros_graph,
            f"/{robot}",
            channel_name=robot,
            endpoint_url=kvs.endpoint_url,
            ice_servers="[]",
        )
    assert sonic.wait_for(
        lambda: len(sonic.records) == 2 and all(r.audio_started for r in sonic.records), TIMEOUT
    )
    streams = {_voice(r): r for r in sonic.records}
    assert set(streams) == set(VOICES.values())
    for robot in VOICES:
        assert kvs.wait_until(lambda r=robot: kvs.emulator.master_connected(r), TIMEOUT)

    async def join() -> Viewer:
        return await Viewer(kvs.endpoint_url, "robot2", "visitor").join()

    viewer = kvs.call(join(), 30)
    try:
        assert wait_for(lambda: sessions["robot2"]._viewers == 1, TIMEOUT)
        kvs.loop.call_soon_threadsafe(viewer.send_json, {"type": "text", "text": "Lift, please"})
        robot2, robot1 = streams[VOICES["robot2"]], streams[VOICES["robot1"]]
        assert sonic.wait_for(lambda: robot2.interactive_texts == ["Lift, please"], TIMEOUT)

        def answered() -> bool:
            return any(
                m.get("type") == "transcript" and m.get("text") == "On my way."
                for m in list(viewer.messages)
            )

        assert wait_for(answered, TIMEOUT), list(viewer.messages)[-5:]
        # robot1 heard nothing of it and has no viewer; its topics are its own.
        assert robot1.interactive_texts == []
        assert sessions["robot1"]._viewers == 0
        assert sessions["robot2"].resolve_topic_name("kvs/viewers") == "/robot2/kvs/viewers"
        assert masters["robot1"].master is not None and masters["robot1"].master.peers == {}
    finally:
        kvs.call(viewer.close(), 10)
