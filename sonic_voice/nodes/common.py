"""Topic names, QoS and small helpers shared by the nodes.

Audio topics carry raw PCM16LE mono in ``std_msgs/msg/UInt8MultiArray``; the rate is
fixed per topic:

=================  ========  ==============================================
topic              rate      meaning
=================  ========  ==============================================
``audio/mic``      16 kHz    robot microphone, 32 ms blocks (audio_io)
``audio/remote``   16 kHz    remote viewer speech, 32 ms blocks (kvs_webrtc)
``audio/out``      24 kHz    what the robot says, any chunk size (sonic_session)
``audio/flush``    --        ``std_msgs/msg/Empty``: drop queued output now
=================  ========  ==============================================
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import numpy as np
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
from std_msgs.msg import MultiArrayDimension, String, UInt8MultiArray

MIC_TOPIC = "audio/mic"
REMOTE_TOPIC = "audio/remote"
OUT_TOPIC = "audio/out"
FLUSH_TOPIC = "audio/flush"
MIC_RATE = 16000
OUT_RATE = 24000

# Audio: reliable (a lost block is speech the model never hears) and deep enough for
# seconds of burst output; volatile, since stale audio is worse than none.
AUDIO_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=200,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)
# Control (flush) and events (state, transcript): reliable, small.
EVENT_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=50,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.VOLATILE,
)
# Latest state for late joiners (e.g. a dashboard started after the robot).
LATCHED_QOS = QoSProfile(
    history=HistoryPolicy.KEEP_LAST,
    depth=1,
    reliability=ReliabilityPolicy.RELIABLE,
    durability=DurabilityPolicy.TRANSIENT_LOCAL,
)


def pcm_msg(samples: np.ndarray) -> UInt8MultiArray:
    """int16 samples -> UInt8MultiArray holding their little-endian bytes."""
    msg = UInt8MultiArray()
    msg.data = samples.astype("<i2", copy=False).tobytes()
    return msg


def msg_pcm(msg: UInt8MultiArray) -> np.ndarray:
    """UInt8MultiArray -> int16 samples (a view when possible)."""
    data = msg.data
    raw = data.tobytes() if hasattr(data, "tobytes") else bytes(data)
    return np.frombuffer(raw, dtype="<i2")


EPOCH_LABEL = "epoch:"


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
    and when a newer epoch starts (see :func:`out_msg`). The flush has its own callback
    group so it never waits behind queued audio. Returns the two subscriptions.
    """
    from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
    from std_msgs.msg import Empty

    gate = EpochGate()

    def on_out(msg: UInt8MultiArray) -> None:
        admit, flush_first = gate.admit(msg_epoch(msg))
        if flush_first:
            flush()
        if admit and len(msg.data):
            play(msg)

    return [
        node.create_subscription(
            UInt8MultiArray,
            OUT_TOPIC,
            on_out,
            AUDIO_QOS,
            callback_group=MutuallyExclusiveCallbackGroup(),
        ),
        node.create_subscription(
            Empty,
            FLUSH_TOPIC,
            lambda _msg: flush(),
            EVENT_QOS,
            callback_group=MutuallyExclusiveCallbackGroup(),
        ),
    ]


def json_msg(payload: dict[str, Any]) -> String:
    return String(data=json.dumps(payload, ensure_ascii=False, separators=(",", ":")))


def descriptor(
    description: str,
    *,
    read_only: bool = False,
    int_range: tuple[int, int, int] | None = None,
    float_range: tuple[float, float, float] | None = None,
    additional_constraints: str = "",
) -> ParameterDescriptor:
    """A ParameterDescriptor with description and optional range (lo, hi, step)."""
    d = ParameterDescriptor(
        description=description,
        read_only=read_only,
        additional_constraints=additional_constraints,
    )
    if int_range is not None:
        d.integer_range = [
            IntegerRange(from_value=int_range[0], to_value=int_range[1], step=int_range[2])
        ]
    if float_range is not None:
        d.floating_point_range = [
            FloatingPointRange(
                from_value=float_range[0], to_value=float_range[1], step=float_range[2]
            )
        ]
    return d


def run_node(factory: Callable[..., Any], args: list[str] | None = None) -> None:
    """The entry-point idiom: init, spin, swallow Ctrl-C / external shutdown, clean exit.

    ``factory`` builds the node (lifecycle nodes bring themselves up when ``autostart``).
    The executor runs in this thread; it is shut down and the node destroyed before
    rclpy shuts down, so the process exits cleanly.

    A SingleThreadedExecutor: rclpy 9.1.2's MultiThreadedExecutor re-queues tasks that
    have not started instead of waiting (ros2/rclpy#1452, fixed by #1547), which with one
    50 Hz audio subscription burns 40-57 % of a core and holds the GIL that every other
    thread of the node needs. Nothing here needs parallel callbacks: the nodes' slow work
    runs on their asyncio loops or their own threads, and action execution is async.
    """
    import rclpy
    from rclpy.executors import ExternalShutdownException, SingleThreadedExecutor

    rclpy.init(args=args)
    node = None
    executor = SingleThreadedExecutor()
    try:
        node = factory()
        executor.add_node(node)
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    finally:
        if node is not None and hasattr(node, "shutdown_resources"):
            node.shutdown_resources()
        executor.shutdown()
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
