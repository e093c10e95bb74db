"""kvs_webrtc: remote visitors over Amazon Kinesis Video Streams WebRTC (the robot is master).

Lifecycle (managed node, brought up by itself when ``autostart`` is true):

- configure: read and check parameters, create publishers/subscriptions, start the node's
  asyncio loop (a thread; the rclpy executor stays in its own threads);
- activate: resolve the channel and connect the signaling WebSocket (``KvsMaster.start``); a
  configuration that cannot work (no credentials, no channel, access denied) fails the
  transition with the reason; transient failures keep retrying in the background;
- deactivate: close every viewer and the signaling connection;
- cleanup / shutdown: stop the loop.

Audio: viewers' speech goes through our loss-resilient receive path and robot speech out as
Opus with in-band FEC (``resilient_receive``, ``opus_fec``; see docs/audio-quality.md).

Topics: publishes ``audio/remote`` (PCM16LE mono 16 kHz, 32 ms blocks, every viewer mixed
in arrival order), ``kvs/viewers`` (``std_msgs/Int32``, latched: connected viewers) and
``kvs/viewer_text`` (String JSON ``{"text": ..., "viewer": <client id>}``: validated chat
text from a viewer's data channel); subscribes ``audio/out`` (24 kHz, played to every
viewer), ``audio/flush`` (drop queued output now), and ``transcript`` / ``state`` (String
JSON from sonic_session, forwarded to viewers as ``{"type": "transcript"|"state", ...}``).

Credentials come from boto3's default chain (environment, ``profile`` parameter, instance
role); none are ever taken from viewers.
"""

from __future__ import annotations

import asyncio
import json
import threading
from typing import Any

from rclpy.lifecycle import LifecycleNode, LifecycleState, TransitionCallbackReturn
from std_msgs.msg import Int32, String, UInt8MultiArray

from sonic_voice.kvs.control import ControlPlaneError
from sonic_voice.kvs.master import KvsMaster
from sonic_voice.kvs.settings import KVS_MAX_VIEWERS, KvsSettings
from sonic_voice.nodes.common import (
    AUDIO_QOS,
    EVENT_QOS,
    LATCHED_QOS,
    REMOTE_TOPIC,
    descriptor,
    follow_output,
    json_msg,
    run_node,
)

VIEWERS_TOPIC = "kvs/viewers"
VIEWER_TEXT_TOPIC = "kvs/viewer_text"
TRANSCRIPT_TOPIC = "transcript"
STATE_TOPIC = "state"


class KvsWebrtcNode(LifecycleNode):
    """Viewers' speech -> ``audio/remote``; ``audio/out`` -> viewers; transcripts -> viewers."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("kvs_webrtc", **kwargs)
        d = self.declare_parameter
        d("autostart", True, descriptor("Configure and activate at start-up."))
        d("channel_name", "", descriptor("KVS signaling channel name (required)."))
        d("region", "us-west-2", descriptor("AWS region of the channel."))
        d(
            "endpoint_url",
            "",
            descriptor("Control-plane endpoint override ('' = AWS); the local stand-in's URL."),
        )
        d("profile", "", descriptor("AWS profile ('' = boto3's default credential chain)."))
        d("create_channel", False, descriptor("Create the channel if it does not exist."))
        d(
            "max_viewers",
            KVS_MAX_VIEWERS,
            descriptor("Concurrent viewers (KVS allows 10).", int_range=(1, 100, 1)),
        )
        d(
            "ice_transport_policy",
            "all",
            descriptor("'all' or 'relay' (TURN only).", additional_constraints="all|relay"),
        )
        d(
            "ice_servers",
            "",
            descriptor(
                "'' = STUN per region + TURN from GetIceServerConfig; else a JSON list of "
                "{urls, username, credential} ('[]' = host candidates only, for loopback)."
            ),
        )
        d("stun_url", "", descriptor("STUN URL override ('' = stun.kinesisvideo.<region>)."))
        d("prefer_turn_tcp", False, descriptor("Prefer TURN over TLS/TCP (UDP-hostile nets)."))
        d(
            "ice_timeout_s",
            30.0,
            descriptor("Close a viewer not connected this long.", float_range=(5.0, 300.0, 0.0)),
        )
        d(
            "resilient_receive",
            True,
            descriptor(
                "Viewer audio through our adaptive jitter buffer with Opus in-band FEC, loss "
                "concealment and NACK (false: aiortc's fixed ~80 ms buffer, which stalls on "
                "every lost packet). The answer then asks the viewer for FEC (useinbandfec=1)."
            ),
        )
        d(
            "opus_fec",
            True,
            descriptor(
                "Robot speech to viewers as libopus with in-band FEC at opus_bitrate, paced "
                "exactly (false: aiortc's encoder, 96 kbit/s, no FEC)."
            ),
        )
        d(
            "opus_bitrate",
            32000,
            descriptor(
                "Opus bitrate to viewers, bit/s (speech; FEC needs headroom from ~24000).",
                int_range=(6000, 510000, 0),
            ),
        )
        d(
            "opus_packet_loss_pct",
            10,
            descriptor("Packet loss the Opus FEC is provisioned for, %.", int_range=(0, 100, 0)),
        )
        d(
            "start_timeout_s",
            30.0,
            descriptor(
                "Activation waits this long for the control plane.", float_range=(1.0, 300.0, 0.0)
            ),
        )
        self.master: KvsMaster | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._remote_pub = None
        self._viewers_pub = None
        self._text_pub = None
        self._subs: list = []
        self._last_state: dict[str, Any] | None = None
        self._viewers = 0
        self.remote_blocks = 0
        if self.get_parameter("autostart").value:
            if self.trigger_configure() == TransitionCallbackReturn.SUCCESS:
                self.trigger_activate()

    def _p(self, name: str) -> Any:
        return self.get_parameter(name).value

    def _settings(self) -> KvsSettings:
        ice = self._p("ice_servers").strip()
        override = json.loads(ice) if ice else None
        if override is not None and not isinstance(override, list):
            raise ValueError("ice_servers must be '' or a JSON list")
        return KvsSettings(
            channel_name=self._p("channel_name"),
            region=self._p("region"),
            endpoint_url=self._p("endpoint_url") or None,
            profile=self._p("profile") or None,
            create_channel=bool(self._p("create_channel")),
            max_viewers=int(self._p("max_viewers")),
            ice_transport_policy=self._p("ice_transport_policy"),
            ice_servers_override=override,
            stun_url=self._p("stun_url") or None,
            prefer_turn_tcp=bool(self._p("prefer_turn_tcp")),
            ice_timeout_s=float(self._p("ice_timeout_s")),
            resilient_receive=bool(self._p("resilient_receive")),
            opus_fec=bool(self._p("opus_fec")),
            opus_bitrate=int(self._p("opus_bitrate")),
            opus_packet_loss_pct=int(self._p("opus_packet_loss_pct")),
        )

    # -- lifecycle ----------------------------------------------------------------------
    def on_configure(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Check parameters, make topics, start the asyncio loop thread."""
        try:
            settings = self._settings()
        except (ValueError, TypeError) as e:
            self.get_logger().error(f"bad parameters: {e}")
            return TransitionCallbackReturn.FAILURE
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvs-loop", daemon=True)
        self._thread.start()
        self.master = KvsMaster(
            settings,
            on_audio=self._on_remote_audio,
            on_viewers=self._on_viewers,
            on_message=self._on_viewer_message,
        )
        self._remote_pub = self.create_lifecycle_publisher(UInt8MultiArray, REMOTE_TOPIC, AUDIO_QOS)
        self._viewers_pub = self.create_publisher(Int32, VIEWERS_TOPIC, LATCHED_QOS)
        self._text_pub = self.create_publisher(String, VIEWER_TEXT_TOPIC, EVENT_QOS)
        self._viewers_pub.publish(Int32(data=0))
        self._subs = [
            *follow_output(self, self._on_out, self._on_flush),
            self.create_subscription(
                String, TRANSCRIPT_TOPIC, lambda m: self._forward("transcript", m), EVENT_QOS
            ),
            self.create_subscription(
                String, STATE_TOPIC, lambda m: self._forward("state", m), LATCHED_QOS
            ),
        ]
        return TransitionCallbackReturn.SUCCESS

    def on_activate(self, state: LifecycleState) -> TransitionCallbackReturn:
        """Resolve the channel and start signaling; fatal configuration errors fail here."""
        assert self.master is not None and self._loop is not None
        fut = asyncio.run_coroutine_threadsafe(self.master.start(), self._loop)
        try:
            fut.result(float(self._p("start_timeout_s")))
        except ControlPlaneError as e:
            self.get_logger().error(f"KVS: {e}")
            return TransitionCallbackReturn.FAILURE
        except TimeoutError:
            self.get_logger().warning("KVS control plane slow; still trying in the background")
        self.get_logger().info(f"KVS master on channel {self._p('channel_name')!r}")
        return super().on_activate(state)

    def on_deactivate(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._stop_master()
        return super().on_deactivate(state)

    def on_cleanup(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def on_shutdown(self, state: LifecycleState) -> TransitionCallbackReturn:
        self._teardown()
        return TransitionCallbackReturn.SUCCESS

    def shutdown_resources(self) -> None:
        """Called by the entry point (and the test harness) before the node is destroyed."""
        self._teardown()

    def _stop_master(self) -> None:
        if self.master is not None and self._loop is not None and self._loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self.master.stop(), self._loop).result(20)
            except Exception as e:  # noqa: BLE001 - teardown goes on
                self.get_logger().warning(f"KVS stop: {e}")

    def _teardown(self) -> None:
        self._stop_master()
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            if not self._loop.is_running():
                self._loop.close()
            self._loop = None
            self._thread = None
        for s in self._subs:
            self.destroy_subscription(s)
        self._subs = []

    # -- master -> ROS (on the asyncio thread) ------------------------------------------
    def _on_remote_audio(self, client: str, pcm: bytes) -> None:
        pub = self._remote_pub
        if pub is not None:
            msg = UInt8MultiArray()
            msg.data = pcm
            pub.publish(msg)
            self.remote_blocks += 1

    def _on_viewers(self, count: int) -> None:
        joined = count > self._viewers
        self._viewers = count
        if self._viewers_pub is not None:
            self._viewers_pub.publish(Int32(data=count))
        if joined and self._last_state is not None and self.master is not None:
            self.master.broadcast(self._last_state)  # a newcomer sees the current state

    def _on_viewer_message(self, client: str, msg: dict[str, Any]) -> None:
        if msg["type"] == "text" and self._text_pub is not None:
            self._text_pub.publish(json_msg({"text": msg["text"], "viewer": client}))

    # -- ROS -> master (executor threads; the master hops onto its loop) -----------------
    def _on_out(self, msg: UInt8MultiArray) -> None:
        if self.master is not None:
            data = msg.data
            self.master.play(data.tobytes() if hasattr(data, "tobytes") else bytes(data))

    def _on_flush(self) -> None:
        if self.master is not None:
            self.master.flush()

    def _forward(self, kind: str, msg: String) -> None:
        try:
            obj = json.loads(msg.data)
        except ValueError:
            obj = {"text": msg.data}
        if not isinstance(obj, dict):
            obj = {"value": obj}
        out = {**obj, "type": kind}
        if kind == "state":
            self._last_state = out
        if self.master is not None:
            self.master.broadcast(out)


def main(args: list[str] | None = None) -> None:
    run_node(KvsWebrtcNode, args)


if __name__ == "__main__":
    main()
