"""The rclpy work-arounds (sonic_voice/ros/compat.py) and the bridge (ros/bridge.py)."""

from __future__ import annotations

import asyncio
import threading

import pytest
import rclpy

from sonic_voice.ros import compat
from sonic_voice.ros.bridge import Bridge


def test_rclpy_is_the_version_the_work_arounds_were_checked_against() -> None:
    """Fails loudly on an rclpy upgrade: re-check each item of compat.py's docstring
    (MultiThreadedExecutor busy-requeue, send_goal_async's duplicate registration, logger
    severity per call site), drop what upstream fixed, then update TESTED_RCLPY."""
    assert compat.rclpy_version() == compat.TESTED_RCLPY, (
        f"rclpy {compat.rclpy_version()} is installed; sonic_voice/ros/compat.py was checked "
        f"against {compat.TESTED_RCLPY}"
    )


def test_log_at_logs_each_severity_from_one_call_site(ros_graph) -> None:
    """rclpy raises when one call site logs at two severities; log_at never does."""
    node = ros_graph.node("logger_probe")
    log = node.get_logger()
    for level in ("warning", "error", "warning", "info", "error"):
        compat.log_at(log, level, f"at {level}")
    with pytest.raises(ValueError, match="severity"):
        for fatal in (True, False):
            (log.error if fatal else log.warning)("the old one-liner")


def test_bridge_awaits_an_rclpy_future_on_the_loop() -> None:
    bridge = Bridge.get()
    fut = rclpy.task.Future()
    got = bridge.submit(bridge.wait(fut))
    threading.Timer(0.05, fut.set_result, args=(42,)).start()
    assert got.result(5) == 42
    failing = rclpy.task.Future()
    got = bridge.submit(bridge.wait(failing))
    failing.set_exception(RuntimeError("no server"))
    with pytest.raises(RuntimeError, match="no server"):
        got.result(5)


def test_bridge_stream_hands_messages_to_the_loop_in_order() -> None:
    from sonic_voice.ros.bridge import MessageStream

    bridge = Bridge.get()
    stream = MessageStream(maxsize=3)

    async def take(n: int) -> list[int]:
        out = []
        async for m in stream:
            out.append(m)
            if len(out) == n:
                return out
        return out

    for i in range(5):  # from this (non-loop) thread, as an executor callback would
        bridge.call(stream.put, i)
    assert bridge.submit(take(3)).result(5) == [0, 1, 2]
    assert stream.dropped == 2
    assert asyncio.iscoroutinefunction(bridge.wait)


def test_the_bridge_runs_uvloop_unless_asked_for_asyncios_loop(monkeypatch) -> None:
    """ros/bridge.py new_event_loop: uvloop by default (a dependency: measured cheaper),
    asyncio's own loop with SONIC_VOICE_EVENT_LOOP=asyncio; both run the bridge's work
    (a thread hand-over, to_thread, the bounded close)."""
    import uvloop

    from sonic_voice.ros.bridge import new_event_loop

    for setting, kind in (("", uvloop.Loop), ("asyncio", asyncio.BaseEventLoop)):
        if setting:
            monkeypatch.setenv("SONIC_VOICE_EVENT_LOOP", setting)
        else:
            monkeypatch.delenv("SONIC_VOICE_EVENT_LOOP", raising=False)
        probe = new_event_loop()
        assert isinstance(probe, kind), (setting, type(probe))
        probe.close()
        bridge = Bridge()
        try:
            assert isinstance(bridge.loop, kind)
            assert (uvloop.Loop is kind) == isinstance(bridge.loop, uvloop.Loop)

            async def work() -> int:
                return await asyncio.to_thread(lambda: 7)

            assert bridge.submit(work()).result(5) == 7
            got: list[str] = []
            bridge.call(lambda out=got: out.append(threading.current_thread().name))
            assert bridge.submit(asyncio.sleep(0.01, "x")).result(5) == "x"
            assert got == ["sonic-voice-loop"]
        finally:
            bridge.close(2.0)
        assert not bridge.running
