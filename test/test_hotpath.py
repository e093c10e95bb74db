"""The hot path (sonic_voice/ros/hotpath.py): audio subscriptions taken by a thread of their
own, outside the node's executor, on a real graph."""

from __future__ import annotations

import threading

import rclpy
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from std_msgs.msg import UInt8MultiArray

from sonic_voice.ros.hotpath import PARKED, HotPath
from sonic_voice.ros.topics import AUDIO_QOS

from test.harness.ros import next_domain_id, wait_for


def test_hot_subscription_is_taken_by_the_hot_path_not_the_executor() -> None:
    ctx = Context()
    rclpy.init(context=ctx, domain_id=next_domain_id())
    ex = SingleThreadedExecutor(context=ctx)
    spin = threading.Thread(target=ex.spin, daemon=True)
    try:
        node = Node("hot", context=ctx)
        ex.add_node(node)
        spin.start()
        got: list[tuple[bytes, str]] = []
        path = HotPath.of(ctx)
        assert HotPath.of(ctx) is path  # one per context
        sub = path.subscribe(
            node,
            UInt8MultiArray,
            "audio/x",
            AUDIO_QOS,
            lambda m: got.append((bytes(m.data), threading.current_thread().name)),
        )
        assert sub.callback_group is PARKED and sub in list(node.subscriptions)
        pub = node.create_publisher(UInt8MultiArray, "audio/x", AUDIO_QOS)
        assert wait_for(lambda: pub.get_subscription_count() == 1, 10)
        for i in range(20):
            pub.publish(UInt8MultiArray(data=bytes([i, i])))
        assert wait_for(lambda: len(got) == 20, 10), len(got)
        assert [d for d, _ in got] == [bytes([i, i]) for i in range(20)]  # all, in order
        assert {t for _, t in got} == {"ros-hot-path"}  # never the executor's thread
        assert path.taken == 20
        # Destroyed with its node: the hot path lets go of it and keeps running.
        node.destroy_subscription(sub)
        assert wait_for(lambda: not path._subs, 5)
        assert path.running
    finally:
        ex.shutdown(timeout_sec=1)
        ctx.try_shutdown()
    # The context's shutdown ends the thread.
    assert wait_for(lambda: not path.running, 5)
