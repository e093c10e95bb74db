"""ROS side of :mod:`sonic_voice.contracts`: QoS profiles, publishers/subscriptions by
contract, and the audio message helpers (PCM16LE in ``UInt8MultiArray``, output epochs)."""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np
from rclpy.event_handler import PublisherEventCallbacks, SubscriptionEventCallbacks
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import Empty, Int32, MultiArrayDimension, String, UInt8MultiArray

from sonic_voice import contracts as c

_TYPES = {
    "std_msgs/msg/UInt8MultiArray": UInt8MultiArray,
    "std_msgs/msg/String": String,
    "std_msgs/msg/Empty": Empty,
    "std_msgs/msg/Int32": Int32,
}


def qos(row: c.Qos) -> QoSProfile:
    return QoSProfile(
        history=HistoryPolicy.KEEP_LAST,
        depth=row.depth,
        reliability=ReliabilityPolicy.RELIABLE if row.reliable else ReliabilityPolicy.BEST_EFFORT,
        durability=DurabilityPolicy.TRANSIENT_LOCAL if row.latched else DurabilityPolicy.VOLATILE,
    )


AUDIO_QOS = qos(c.AUDIO)
EVENT_QOS = qos(c.EVENTS)
LATCHED_QOS = qos(c.LATCHED)


def msg_type(topic: c.Topic) -> Any:
    return _TYPES[topic.type]


def quiet_publisher_events() -> PublisherEventCallbacks:
    """No QoS event handlers on our own publishers: rclpy adds an incompatible-QoS handler
    to each by default, one more waitable every executor pass rebuilds its wait set over
    (68 of the 125 entities of the all-in-one runner; each wake-up walks them all). Our
    topics' QoS are fixed by the contracts, on both ends."""
    return PublisherEventCallbacks(use_default_callbacks=False)


def quiet_subscription_events() -> SubscriptionEventCallbacks:
    """See :func:`quiet_publisher_events`."""
    return SubscriptionEventCallbacks(use_default_callbacks=False)


def publisher(node: Any, topic: c.Topic, lifecycle: bool = False) -> Any:
    """A publisher for ``topic`` with its contract's type and QoS; for the audio topics
    (:data:`HOT`) one that hands its messages to the same process's hot subscriptions
    directly when nobody else listens (``ros/hotpath.py``, "In-process delivery")."""
    make = node.create_lifecycle_publisher if lifecycle else node.create_publisher
    pub = make(
        msg_type(topic), topic.name, qos(topic.qos), event_callbacks=quiet_publisher_events()
    )
    if topic in HOT:
        from sonic_voice.ros.hotpath import HotPath

        return HotPath.of(node.context).publisher(pub)
    return pub


HOT = (c.MIC, c.REMOTE, c.OUT, c.FLUSH)  # taken by the hot path (ros/hotpath.py)


def subscription(node: Any, topic: c.Topic, callback: Callable[[Any], None], **kw: Any) -> Any:
    kw.setdefault("event_callbacks", quiet_subscription_events())
    return node.create_subscription(msg_type(topic), topic.name, callback, qos(topic.qos), **kw)


def json_msg(topic: c.Topic, payload: dict[str, Any]) -> String:
    """A ``String`` for a JSON topic, validated against its contract."""
    return String(data=c.encode(topic, payload))


# --------------------------------------------------------------------------- audio
def pcm_msg(samples: np.ndarray) -> UInt8MultiArray:
    """int16 samples -> UInt8MultiArray holding their little-endian bytes."""
    msg = UInt8MultiArray()
    msg.data = samples.astype("<i2", copy=False).tobytes()
    return msg


EPOCH_LABEL = "epoch:"
_CDR_LE = b"\x00\x01\x00\x00"  # encapsulation: plain CDR, little-endian
_EMPTY_LAYOUT = struct.pack("<II", 0, 0)  # no dimension, data_offset 0


def uint8_multiarray_cdr(data: bytes, label: str | None = None) -> bytes:
    """``std_msgs/UInt8MultiArray`` serialized (what ``rclpy.serialization.
    serialize_message`` gives, byte for byte but the alignment padding after a label, which
    Fast CDR leaves unset: test/test_hotpath.py), holding ``data`` and, with ``label``
    (printable ASCII), one dimension of that label spanning it. ``publisher.publish(bytes)``
    sends it as is: 11 us a 1 KB message against 37-41 us for rclpy converting a message
    object first (a mic block, a viewer's block, an answer's chunk: ~90 a second)."""
    if label is None:
        layout = _EMPTY_LAYOUT
    else:
        name = label.encode() + b"\0"
        n = len(data)
        layout = b"".join(
            (
                struct.pack("<II", 1, len(name)),
                name,
                b"\0" * (-len(name) % 4),
                struct.pack("<III", n, n, 0),
            )
        )
    return b"".join((_CDR_LE, layout, struct.pack("<I", len(data)), data))


def pcm_cdr(samples: np.ndarray) -> bytes:
    """:func:`pcm_msg`, serialized (publish it as is)."""
    return uint8_multiarray_cdr(samples.astype("<i2", copy=False).tobytes())


def out_cdr(pcm: bytes, epoch: int) -> bytes:
    """:func:`out_msg`, serialized (publish it as is)."""
    return uint8_multiarray_cdr(pcm, f"{EPOCH_LABEL}{epoch}")


def msg_bytes(msg: UInt8MultiArray) -> bytes:
    data = msg.data
    return data.tobytes() if hasattr(data, "tobytes") else bytes(data)


def msg_pcm(msg: UInt8MultiArray) -> np.ndarray:
    """UInt8MultiArray -> int16 samples (a view of the message's bytes)."""
    return np.frombuffer(msg_bytes(msg), dtype="<i2")


_U32 = {True: struct.Struct("<I"), False: struct.Struct(">I")}


class RawDimension(NamedTuple):
    label: str
    size: int
    stride: int


class RawLayout(NamedTuple):
    dim: list[RawDimension]
    data_offset: int


class RawUInt8MultiArray(NamedTuple):
    """A ``UInt8MultiArray`` read straight from its serialized form (``data`` is bytes):
    what hot audio subscriptions hand their callbacks (:func:`parse_uint8_multiarray`)."""

    layout: RawLayout
    data: bytes


def parse_uint8_multiarray(raw: bytes) -> RawUInt8MultiArray | UInt8MultiArray:
    """A serialized ``std_msgs/UInt8MultiArray`` (CDR as the RMW takes it, starting with
    its 4-byte encapsulation header) -> :class:`RawUInt8MultiArray`.

    rclpy's own take converts the message to Python (an ``array.array`` for the data, a
    ``MultiArrayLayout``): 65 us a message against ~10 us for the serialized take plus this
    (test/test_hotpath.py compares the two field by field). Raises ValueError on a
    malformed message (struct.error when it ends early; the hot path logs either and goes
    on). Another encoding than plain CDR (XCDR2 from another RMW's settings) goes through
    rclpy's own deserializer."""
    if len(raw) >= 4 and (raw[0] != 0 or raw[1] not in (0, 1)):
        from rclpy.serialization import deserialize_message

        return deserialize_message(raw, UInt8MultiArray)  # type: ignore[no-any-return]
    if len(raw) < 16:
        raise ValueError(f"not a CDR UInt8MultiArray ({len(raw)} bytes)")
    u32 = _U32[raw[1] == 1].unpack_from
    body = memoryview(raw)[4:]  # alignment counts from after the encapsulation header
    (n,) = u32(body, 0)
    at = 4
    dims = []
    for _ in range(n):
        (ln,) = u32(body, at)
        label = bytes(body[at + 4 : at + 3 + ln]).decode()
        at = (at + 4 + ln + 3) & ~3
        size, stride = u32(body, at)[0], u32(body, at + 4)[0]
        dims.append(RawDimension(label, size, stride))
        at += 8
    (offset,) = u32(body, at)
    (length,) = u32(body, at + 4)
    start = 4 + at + 8
    if start + length > len(raw):
        raise ValueError(f"UInt8MultiArray data runs past the message ({length} bytes)")
    return RawUInt8MultiArray(RawLayout(dims, offset), raw[start : start + length])


def out_msg(pcm: bytes, epoch: int) -> UInt8MultiArray:
    """An ``audio/out`` chunk tagged with the answer's epoch.

    The epoch rises at each barge-in. ``audio/flush`` is a separate topic, so chunks that
    were already in flight on ``audio/out`` can arrive after it; players drop chunks of an
    older epoch and flush when a newer one starts (an empty chunk of the new epoch is sent
    right before ``audio/flush``), in order with the audio itself. The tag is the label of
    the one layout dimension (a 1-D array of bytes), so other consumers read plain PCM.
    """
    msg = UInt8MultiArray()
    msg.layout.dim = [
        MultiArrayDimension(label=f"{EPOCH_LABEL}{epoch}", size=len(pcm), stride=len(pcm))
    ]
    msg.data = pcm
    return msg


def msg_epoch(msg: UInt8MultiArray) -> int | None:
    """The epoch of an ``audio/out`` chunk (None when untagged, e.g. a third-party source)."""
    dims = msg.layout.dim
    if dims and dims[0].label.startswith(EPOCH_LABEL):
        try:
            return int(dims[0].label[len(EPOCH_LABEL) :])
        except ValueError:
            return None
    return None


class EpochGate:
    """Per-player state for epoch-tagged output: ``admit(epoch)`` says whether a chunk may
    play and whether the player must flush first (a newer answer started)."""

    def __init__(self) -> None:
        self.current = -1

    def admit(self, epoch: int | None) -> tuple[bool, bool]:
        """(play it, flush first)."""
        if epoch is None:
            return True, False
        if epoch < self.current:
            return False, False  # a chunk of an interrupted answer, still in flight
        if epoch > self.current:
            first = self.current < 0
            self.current = epoch
            return True, not first
        return True, False


def follow_output(
    node: Any,
    play: Callable[[UInt8MultiArray], None],
    flush: Callable[[], None],
) -> list[Any]:
    """Subscribe a player (the speaker, the viewers) to ``audio/out`` and ``audio/flush``.

    ``play(msg)`` gets each chunk that may still play; ``flush()`` runs on ``audio/flush``
    and when a newer epoch starts (see :func:`out_msg`). Both run on the hot path's thread
    (:mod:`sonic_voice.ros.hotpath`), one after the other, and must return at once (hand
    over to a device buffer or the loop). Returns the two subscriptions.
    """
    from sonic_voice.ros.hotpath import HotPath

    gate = EpochGate()

    def on_out(msg: UInt8MultiArray) -> None:
        admit, flush_first = gate.admit(msg_epoch(msg))
        if flush_first:
            flush()
        if admit and len(msg.data):
            play(msg)

    hot = HotPath.of(node.context)

    def sub(topic: c.Topic, callback: Callable[[Any], None]) -> Any:
        kind = msg_type(topic)
        return hot.subscribe(
            node,
            kind,
            topic.name,
            qos(topic.qos),
            callback,
            parse=parse_uint8_multiarray if kind is UInt8MultiArray else None,
            event_callbacks=quiet_subscription_events(),
        )

    return [sub(c.OUT, on_out), sub(c.FLUSH, lambda _msg: flush())]


# Short names used by tests and benchmarks.
MIC_TOPIC, REMOTE_TOPIC, OUT_TOPIC, FLUSH_TOPIC = (
    c.MIC.name,
    c.REMOTE.name,
    c.OUT.name,
    c.FLUSH.name,
)
MIC_RATE, OUT_RATE = c.MIC_RATE, c.OUT_RATE
