"""The hot path (sonic_voice/ros/hotpath.py): audio subscriptions taken by a thread of their
own, outside the node's executor, on a real graph."""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
import rclpy
from hypothesis import given, settings
from hypothesis import strategies as st
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.serialization import deserialize_message, serialize_message
from std_msgs.msg import MultiArrayDimension, UInt8MultiArray

from sonic_voice.ros.hotpath import PARKED, HotPath
from sonic_voice.ros.topics import (
    AUDIO_QOS,
    OUT_TOPIC,
    msg_bytes,
    msg_epoch,
    out_cdr,
    out_msg,
    parse_uint8_multiarray,
    pcm_cdr,
    pcm_msg,
    uint8_multiarray_cdr,
)

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


# Printable ASCII, as our epoch labels ("epoch:7"): a ROS string is a C string (a NUL cuts
# it) and rclpy does not keep a non-ASCII label as UTF-8 bytes.
LABELS = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=12)


@settings(max_examples=200, deadline=None)
@given(
    data=st.binary(max_size=3000),
    labels=st.lists(LABELS, max_size=3),
    sizes=st.lists(st.integers(0, 2**32 - 1), min_size=6, max_size=6),
    offset=st.integers(0, 2**32 - 1),
)
def test_the_serialized_take_reads_what_rclpy_reads(
    data: bytes, labels: list[str], sizes: list[int], offset: int
) -> None:
    """parse_uint8_multiarray on rclpy's own serialization gives rclpy's message: every
    label (any length: the CDR padding), size, stride, the offset and the data."""
    msg = UInt8MultiArray(data=data)
    msg.layout.dim = [
        MultiArrayDimension(label=lab, size=sizes[2 * i], stride=sizes[2 * i + 1])
        for i, lab in enumerate(labels)
    ]
    msg.layout.data_offset = offset
    got = parse_uint8_multiarray(serialize_message(msg))
    assert got.data == data and got.layout.data_offset == offset
    assert [(d.label, d.size, d.stride) for d in got.layout.dim] == [
        (d.label, d.size, d.stride) for d in msg.layout.dim
    ]
    assert msg_epoch(got) == msg_epoch(msg)


def test_an_out_chunk_read_serialized_keeps_its_epoch_and_pcm() -> None:
    pcm = np.arange(-480, 480, dtype="<i2").tobytes()
    got = parse_uint8_multiarray(serialize_message(out_msg(pcm, 7)))
    assert msg_epoch(got) == 7 and msg_bytes(got) == pcm and len(got.data) == len(pcm)
    assert msg_epoch(parse_uint8_multiarray(serialize_message(UInt8MultiArray()))) is None
    with pytest.raises(ValueError):
        parse_uint8_multiarray(serialize_message(UInt8MultiArray(data=b"abcd"))[:-3])


def test_hot_audio_subscriptions_take_serialized_messages() -> None:
    """bridge.subscribe(hot=True) and follow_output take UInt8MultiArray serialized and
    parse it (ros/topics.py); the callbacks see the same bytes and epochs, in order."""
    from sonic_voice.ros.bridge import Bridge
    from sonic_voice.ros.topics import follow_output

    ctx = Context()
    rclpy.init(context=ctx, domain_id=next_domain_id())
    bridge = Bridge()
    try:
        node = Node("hot_raw", context=ctx)
        got: list[Any] = []
        played: list[Any] = []
        sub = bridge.subscribe(node, UInt8MultiArray, "audio/y", AUDIO_QOS, got.append, True)
        subs = follow_output(node, played.append, lambda: played.append("flush"))
        assert sub.raw and subs[0].raw and not subs[1].raw  # audio/flush is Empty
        pub = node.create_publisher(UInt8MultiArray, "audio/y", AUDIO_QOS)
        out = node.create_publisher(UInt8MultiArray, OUT_TOPIC, AUDIO_QOS)
        assert wait_for(lambda: pub.get_subscription_count() and out.get_subscription_count(), 10)
        for i in range(5):
            pub.publish(UInt8MultiArray(data=bytes([i]) * 640))
            out.publish(out_msg(bytes([i]) * 960, 1 + i // 3))
        assert wait_for(lambda: len(got) == 5 and len(played) == 6, 10), (len(got), played)
        assert [msg_bytes(m) for m in got] == [bytes([i]) * 640 for i in range(5)]
        assert [msg_epoch(m) if m != "flush" else m for m in played] == [1, 1, 1, "flush", 2, 2]
    finally:
        bridge.close()
        ctx.try_shutdown()


@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000), label=st.one_of(st.none(), LABELS))
def test_audio_serialized_by_hand_is_rclpys_serialization(data: bytes, label: str | None) -> None:
    msg = UInt8MultiArray(data=data)
    if label is not None:
        msg.layout.dim = [MultiArrayDimension(label=label, size=len(data), stride=len(data))]
    _same_serialization(uint8_multiarray_cdr(data, label), msg)


def _same_serialization(ours: bytes, msg: UInt8MultiArray) -> None:
    """Byte for byte rclpy's serialization but the alignment padding after a label, which
    Fast CDR leaves as whatever was in its buffer; and rclpy reads it back as ``msg``."""
    theirs = serialize_message(msg)
    assert len(ours) == len(theirs)
    pad = set()
    if msg.layout.dim:
        end = 4 + 8 + len(msg.layout.dim[0].label) + 1
        pad = set(range(end, end + (-(end - 4) % 4)))
    assert [b for i, b in enumerate(ours) if i not in pad] == [
        b for i, b in enumerate(theirs) if i not in pad
    ]
    back = deserialize_message(ours, UInt8MultiArray)
    assert bytes(back.data) == bytes(msg.data) and back.layout == msg.layout


def test_pcm_and_out_chunks_serialized_match_their_messages() -> None:
    pcm = np.arange(-300, 300, dtype=np.int16)
    _same_serialization(pcm_cdr(pcm), pcm_msg(pcm))
    _same_serialization(out_cdr(pcm.tobytes(), 12), out_msg(pcm.tobytes(), 12))


def test_in_process_delivery_and_back_to_dds_when_someone_else_listens() -> None:
    """ros/hotpath.py "In-process delivery": a wrapped publisher hands its messages to the
    process's hot subscriptions in its own thread while they are its only subscribers; when
    a subscription of another participant matches, every message goes through DDS (the
    local subscription takes it, once); when it leaves, in-process again. Serialized bytes
    reach a raw subscription as bytes, a message reaches a typed subscription as is."""
    from std_msgs.msg import Empty

    ctx, other = Context(), Context()
    domain = next_domain_id()
    rclpy.init(context=ctx, domain_id=domain)
    rclpy.init(context=other, domain_id=domain)
    try:
        node = Node("lane", context=ctx)
        path = HotPath.of(ctx)
        got: list[tuple[bytes, str]] = []
        flushes: list[str] = []
        path.subscribe(
            node,
            UInt8MultiArray,
            "audio/z",
            AUDIO_QOS,
            lambda m: got.append((msg_bytes(m), threading.current_thread().name)),
            parse=parse_uint8_multiarray,
        )
        path.subscribe(
            node, Empty, "audio/e", AUDIO_QOS, lambda m: flushes.append(type(m).__name__)
        )
        pub = path.publisher(node.create_publisher(UInt8MultiArray, "audio/z", AUDIO_QOS))
        flush = path.publisher(node.create_publisher(Empty, "audio/e", AUDIO_QOS))
        assert pub.topic_name == "/audio/z"  # the wrapped publisher's own attributes
        assert wait_for(lambda: pub.get_subscription_count() == 1, 10)

        def send(first: int, n: int, by: str = "bytes") -> None:
            for i in range(first, first + n):
                data = bytes([i]) * 320
                pub.publish(
                    uint8_multiarray_cdr(data)
                    if by == "bytes"
                    else pcm_msg(np.frombuffer(data, "<i2"))
                )

        me = threading.current_thread().name
        send(0, 10)
        send(10, 5, by="message")
        flush.publish(Empty())
        assert [d for d, _ in got] == [bytes([i]) * 320 for i in range(15)]  # at once
        assert {t for _, t in got} == {me} and flushes == ["Empty"]
        assert (path.handed, path.taken) == (16, 0)

        # Someone else listens (another participant, as `ros2 topic echo` would): DDS.
        onode = Node("listener", context=other)
        heard: list[bytes] = []
        ex = SingleThreadedExecutor(context=other)
        ex.add_node(onode)
        onode.create_subscription(
            UInt8MultiArray, "audio/z", lambda m: heard.append(bytes(m.data)), AUDIO_QOS
        )
        spin = threading.Thread(target=ex.spin, daemon=True)
        spin.start()
        assert wait_for(lambda: pub.get_subscription_count() == 2, 10)
        send(15, 10)
        assert wait_for(lambda: len(got) == 25 and len(heard) == 10, 10), (len(got), len(heard))
        assert [d for d, _ in got] == [bytes([i]) * 320 for i in range(25)]  # once, in order
        assert {t for _, t in got[15:]} == {"ros-hot-path"} and path.taken == 10
        assert heard == [bytes([i]) * 320 for i in range(15, 25)]

        # It leaves: in-process again.
        ex.shutdown(timeout_sec=1)
        onode.destroy_node()
        assert wait_for(lambda: pub.get_subscription_count() == 1, 10)
        send(25, 3)
        assert [d for d, _ in got[25:]] == [bytes([i]) * 320 for i in range(25, 28)]
        assert path.handed == 19 and path.taken == 10
    finally:
        other.try_shutdown()
        ctx.try_shutdown()


def test_in_process_delivery_respects_lifecycle_and_destroyed_subscriptions() -> None:
    """An inactive lifecycle publisher hands nothing over; a destroyed hot subscription is
    forgotten (its callback never runs again) and the publisher goes back to DDS."""
    from rclpy.lifecycle import LifecycleNode

    ctx = Context()
    rclpy.init(context=ctx, domain_id=next_domain_id())
    try:
        node = LifecycleNode("lane_lc", context=ctx)
        path = HotPath.of(ctx)
        got: list[bytes] = []
        sub = path.subscribe(
            node,
            UInt8MultiArray,
            "audio/w",
            AUDIO_QOS,
            lambda m: got.append(msg_bytes(m)),
            parse=parse_uint8_multiarray,
        )
        pub = path.publisher(node.create_lifecycle_publisher(UInt8MultiArray, "audio/w", 10))
        assert wait_for(lambda: pub.get_subscription_count() == 1, 10)
        pub.publish(uint8_multiarray_cdr(b"\x01\x02"))  # inactive: dropped
        assert got == [] and path.handed == 0
        node.trigger_configure()
        node.trigger_activate()
        pub.publish(uint8_multiarray_cdr(b"\x03\x04"))
        assert got == [b"\x03\x04"] and path.handed == 1
        node.destroy_subscription(sub)
        assert path.local("/audio/w") == (sub,)  # not yet noticed ...
        pub.publish(uint8_multiarray_cdr(b"\x05\x06"))
        assert got == [b"\x03\x04"] and path.local("/audio/w") == ()  # ... now forgotten
        pub.publish(uint8_multiarray_cdr(b"\x07\x08"))  # nobody: DDS, nothing arrives
        assert got == [b"\x03\x04"] and path.handed == 1
    finally:
        ctx.try_shutdown()


def test_a_hot_callback_may_publish_in_process() -> None:
    """A hot callback publishing in-process (onto another hot topic, and back onto its own)
    neither deadlocks on the hot path's one lock nor nests callbacks: what it publishes is
    delivered in the same thread once the message being delivered has reached all its
    subscriptions, in publishing order. The same from a message taken from DDS on the hot
    path's thread (someone else listens to the first topic)."""
    from std_msgs.msg import String

    ctx, other = Context(), Context()
    domain = next_domain_id()
    rclpy.init(context=ctx, domain_id=domain)
    rclpy.init(context=other, domain_id=domain)
    try:
        node = Node("relay", context=ctx)
        path = HotPath.of(ctx)
        log: list[tuple[str, str, str]] = []  # (subscription, data, thread)
        depth = threading.local()
        a = path.publisher(node.create_publisher(String, "audio/a", AUDIO_QOS))
        b = path.publisher(node.create_publisher(String, "audio/b", AUDIO_QOS))

        def on(name: str, relay: bool) -> Any:
            def callback(m: String) -> None:
                assert getattr(depth, "n", 0) == 0, "a callback ran inside another"
                depth.n = 1
                try:
                    log.append((name, m.data, threading.current_thread().name))
                    if relay and not m.data.endswith("'"):
                        b.publish(String(data=m.data + ">b"))
                        a.publish(String(data=m.data + "'"))  # its own topic, once
                finally:
                    depth.n = 0

            return callback

        for name, topic, relay in (("a1", "audio/a", True), ("a2", "audio/a", False)):
            path.subscribe(node, String, topic, AUDIO_QOS, on(name, relay))
        path.subscribe(node, String, "audio/b", AUDIO_QOS, on("b", False))
        assert wait_for(lambda: a.get_subscription_count() == 2, 10)
        assert wait_for(lambda: b.get_subscription_count() == 1, 10)

        def publish_in_a_thread(data: str) -> None:
            t = threading.Thread(target=a.publish, args=(String(data=data),), name="pub")
            t.start()
            t.join(5)
            assert not t.is_alive(), "publishing from a hot callback deadlocked"

        want = [
            ("a1", "x"), ("a2", "x"),  # the message reaches all its subscriptions first
            ("b", "x>b"), ("a1", "x'"), ("a2", "x'"),  # then what a1 published, in order
        ]  # fmt: skip
        publish_in_a_thread("x")
        assert [(n, d) for n, d, _ in log] == want
        assert {t for _, _, t in log} == {"pub"} and path.handed == 5

        # Someone else listens to audio/a: "y" goes through DDS, the hot path's thread
        # takes it; what a1 publishes on audio/b from there is handed over in-process.
        onode = Node("listener", context=other)
        onode.create_subscription(String, "audio/a", lambda m: None, AUDIO_QOS)
        assert wait_for(lambda: a.get_subscription_count() == 3, 10)
        log.clear()
        publish_in_a_thread("y")
        assert wait_for(lambda: len(log) == 5, 10), log
        assert sorted((n, d) for n, d, _ in log) == sorted(
            [("a1", "y"), ("a2", "y"), ("b", "y>b"), ("a1", "y'"), ("a2", "y'")]
        )
        byname = {(n, d): t for n, d, t in log}  # (each subscription its own DDS reader:
        assert byname[("b", "y>b")] == byname[("a1", "y")] == "ros-hot-path"  # any order)
        assert [d for n, d, _ in log if n == "a1"] == ["y", "y'"]
        assert path.handed == 6 and path.taken == 4
    finally:
        other.try_shutdown()
        ctx.try_shutdown()


def test_a_message_the_hot_path_cannot_convert_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Bytes that are no serialized message, handed to a typed hot subscription: the
    publisher's thread gets no exception, the failure is logged with the topic, and the
    next good message is delivered."""
    ctx = Context()
    rclpy.init(context=ctx, domain_id=next_domain_id())
    try:
        node = Node("bad_bytes", context=ctx)
        path = HotPath.of(ctx)
        got: list[bytes] = []
        path.subscribe(node, UInt8MultiArray, "audio/v", AUDIO_QOS, lambda m: got.append(m.data))
        pub = path.publisher(node.create_publisher(UInt8MultiArray, "audio/v", AUDIO_QOS))
        assert wait_for(lambda: pub.get_subscription_count() == 1, 10)
        pub.publish(b"\x00\x01")  # a typed subscription: deserialized, and it cannot be
        assert got == [] and "message for /audio/v not delivered" in caplog.text
        pub.publish(uint8_multiarray_cdr(b"\x07"))
        assert [bytes(d) for d in got] == [b"\x07"]
    finally:
        ctx.try_shutdown()
