"""Inter-node contracts (sonic_voice/contracts.py): each JSON shape checked on its own, and
the real publisher node against the real subscriber node on one graph (a viewer's chat
through ``kvs_webrtc`` reaches the model through ``sonic_session`` and is answered; the
answer and the state reach the viewer; a late viewer gets the latched state)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rclpy.parameter import Parameter

from sonic_voice import contracts as c
from sonic_voice.app.monitor import RunLog, make_monitor
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

TIMEOUT = 20


# --------------------------------------------------------------------------- shapes
def test_every_json_topic_has_a_schema_and_names_are_unique() -> None:
    names = [t.name for t in c.ALL]
    assert len(names) == len(set(names))
    for t in c.ALL:
        assert (t.schema is not None) == (t.type == "std_msgs/msg/String"), t.name


@pytest.mark.parametrize(
    "topic, good, bad",
    [
        (
            c.TRANSCRIPT,
            {"t": 1.0, "role": "USER", "stage": "FINAL", "text": "hola"},
            {"role": "user", "stage": "FINAL", "text": "hola"},
        ),
        (
            c.STATE,
            {"state": "listening", "source": "local", "viewers": 0, "error": ""},
            {"state": "napping", "source": "local", "viewers": 0, "error": ""},
        ),
        (
            c.TOOL_EVENTS,
            {"event": "result", "tool": "go", "tool_use_id": "1", "status": "ok", "result": {}},
            {"event": "result", "tool": "go", "tool_use_id": "1"},
        ),
        (
            c.USAGE,
            {"input_tokens": 3, "output_tokens": 4, "total_tokens": 7},
            {"input_tokens": -1, "output_tokens": 4, "total_tokens": 7},
        ),
        (
            c.VIEWER_TEXT,
            {"type": "text", "text": "hello", "viewer": "v1"},
            {"text": "hello", "viewer": "v1"},
        ),
    ],
    ids=lambda v: v.name if isinstance(v, c.Topic) else "",
)
def test_shapes_accept_what_publishers_send_and_name_what_is_wrong(
    topic: c.Topic, good: dict, bad: dict
) -> None:
    assert c.decode(topic, c.encode(topic, good)) == good
    with pytest.raises(c.ContractError) as e:
        c.decode(topic, json.dumps(bad))
    assert str(e.value).startswith(topic.name)
    with pytest.raises(c.ContractError, match="not JSON"):
        c.decode(topic, "{oops")


JSON_TOPICS = [t for t in c.ALL if t.schema is not None]
_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 2**40),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from(["", " ", "x", "USER", "FINAL", "text", "listening", "ok", "\t"]),
    st.text(max_size=6),
)
_values = st.one_of(_scalars, st.lists(_scalars, max_size=3))


def _fitting(spec: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values that usually fit ``spec`` (a property's schema)."""
    if "enum" in spec:
        return st.sampled_from(spec["enum"])
    if "const" in spec:
        return st.just(spec["const"])
    kind = spec.get("type")
    if kind == "string":
        return st.sampled_from(["x", " ", "", "hola", " a "]) | st.text(max_size=5)
    if kind == "integer":
        return st.integers(spec.get("minimum", -3) - 1, 10**6)
    if kind == "number":
        return st.floats(-1.0, 1e6) | st.integers(-2, 10**6)
    if kind == "boolean":
        return st.booleans()
    if kind == "object":
        return st.dictionaries(st.sampled_from(["a", "b"]), _scalars, max_size=2)
    return _values


@st.composite
def _payloads(draw: st.DrawFn, topic: c.Topic) -> Any:
    """Mostly valid messages of ``topic`` (every field of the right kind), and near misses:
    a field of the wrong kind, a field left out, a stranger, not an object at all."""
    props = topic.schema.get("properties", {})
    out: dict[str, Any] = {}
    for name, spec in props.items():
        roll = draw(st.integers(0, 29))
        if roll == 0:
            continue  # a field left out
        out[name] = draw(_values) if roll == 1 else draw(_fitting(spec))
    if draw(st.integers(0, 19)) == 0:
        out["stranger"] = draw(_values)
    return out if draw(st.integers(0, 29)) else draw(_values)


@pytest.mark.parametrize("topic", JSON_TOPICS, ids=lambda t: t.name)
@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_the_fast_check_accepts_and_refuses_what_jsonschema_does(
    topic: c.Topic, data: st.DataObject
) -> None:
    """contracts.check validates with fastjsonschema and words errors with jsonschema: the
    two must agree on every payload, or a message one refuses would pass."""
    payload = data.draw(_payloads(topic))
    strict = c._validator(topic).is_valid(payload)
    try:
        assert c.check(topic, payload) is payload
        ok = True
    except c.ContractError:
        ok = False
    assert ok == strict, payload


def test_text_input_takes_plain_text_and_the_viewer_shape() -> None:
    assert c.text_input("  where is the lift? ") == "where is the lift?"
    assert c.text_input(c.viewer_text("la cafetería", "v7")) == "la cafetería"
    assert c.text_input("   ") == ""
    with pytest.raises(c.ContractError):
        c.text_input('{"type": "mute"}')


# --------------------------------------------------------------------------- node to node
@pytest.fixture
def stand_ins(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[Any, Any]]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", DEFAULT_ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DEFAULT_SECRET_KEY)
    monkeypatch.setattr(transport, "_RESOLVERS", {})
    scenario = {"turns": [{"on": "text", "say": "The café is on the second floor."}]}
    sonic = EmulatorThread(scenario=scenario, realtime=False).start()
    kvs = KvsEmulatorThread(channels=["robot"]).start()
    try:
        yield sonic, kvs
    finally:
        kvs.stop()
        sonic.stop()


def _node(cls: Any, graph: Any, **params: Any) -> Any:
    node = cls(
        context=graph.context,
        parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
    )
    graph.add(node)
    return node


@pytest.mark.timeout(120)
def test_viewer_chat_reaches_the_model_and_the_answer_reaches_the_viewer(
    ros_graph: Any, stand_ins: tuple[Any, Any]
) -> None:
    sonic, kvs = stand_ins
    run = RunLog()
    ros_graph.add(make_monitor(run, ros_graph.context))
    session = _node(
        SonicSessionNode,
        ros_graph,
        endpoint_uri=sonic.endpoint_uri,
        ca_bundle=sonic.ca_file,
        always_on=True,
    )
    _node(
        KvsWebrtcNode,
        ros_graph,
        channel_name="robot",
        endpoint_url=kvs.endpoint_url,
        ice_servers="[]",
    )
    assert sonic.wait_for(lambda: sonic.records and sonic.records[0].audio_started, TIMEOUT)
    assert kvs.wait_until(lambda: kvs.emulator.master_connected(), TIMEOUT)

    async def join(name: str) -> Viewer:
        return await Viewer(kvs.endpoint_url, "robot", name).join()

    viewer = kvs.call(join("visitor"), 30)
    late = None
    try:
        # The session saw the viewer (kvs/viewers, latched) and takes its audio now.
        assert wait_for(lambda: session._viewers == 1, TIMEOUT)
        assert wait_for(lambda: run.last_state() and session._active_source() == "remote")
        # Chat text -> data channel -> kvs_webrtc -> kvs/viewer_text -> sonic_session -> model.
        kvs.loop.call_soon_threadsafe(viewer.send_json, {"type": "text", "text": "The café?"})
        rec = sonic.records[0]
        assert sonic.wait_for(lambda: rec.interactive_texts == ["The café?"], TIMEOUT)
        # ... answered: transcript -> kvs_webrtc -> the viewer's data channel, and the monitor.
        answer = "The café is on the second floor."

        def viewer_heard() -> bool:
            return any(
                m.get("type") == "transcript" and m.get("text") == answer
                for m in list(viewer.messages)
            )

        assert wait_for(viewer_heard, TIMEOUT), list(viewer.messages)[-5:]
        assert wait_for(lambda: any(e["text"] == answer for e in run.finals("ASSISTANT")))
        # State reached the viewer, in the contract's shape (with the viewer count).
        states = [m for m in list(viewer.messages) if m.get("type") == "state"]
        assert states and all(c.check(c.STATE, {k: v for k, v in s.items() if k != "type"})
                              for s in states)  # fmt: skip
        # A viewer joining late gets the current state without waiting for a change.
        late = kvs.call(join("late"), 30)
        assert wait_for(
            lambda: any(m.get("type") == "state" for m in list(late.messages)), TIMEOUT
        ), "a late viewer saw no state"
        got = next(m for m in list(late.messages) if m.get("type") == "state")
        assert got["state"] in c.STATES and got["viewers"] >= 1
    finally:
        for v in (viewer, late):
            if v is not None:
                kvs.call(v.close(), 10)
