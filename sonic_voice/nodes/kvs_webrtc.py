"""kvs_webrtc: remote visitors over Amazon Kinesis Video Streams WebRTC (the robot is master).

Lifecycle (driven from outside: ``ros2 run`` with ``autostart``, the runner, or a launch
file's ``LifecycleNode`` transitions):

- configure: check parameters, create publishers/subscriptions;
- activate: resolve the channel and connect the signaling WebSocket (``KvsMaster.start``) on
  the process's asyncio loop, without blocking; a configuration that cannot work (no
  credentials, no channel, access denied) is reported once (log, ``/diagnostics`` ERROR)
  and the node stays up; transient failures keep retrying in the background;
- deactivate / cleanup / shutdown / SIGINT: every viewer and the signaling connection
  closed (within the process's shutdown budget).

Audio: viewers' speech goes through our loss-resilient receive path and robot speech out as
Opus with in-band FEC (``resilient_receive``, ``opus_fec``; see docs/audio-quality.md).

Topics: publishes ``audio/remote`` (PCM16LE mono 16 kHz, 32 ms blocks, every viewer mixed
in arrival order), ``kvs/viewers`` (``std_msgs/Int32``, latched: connected viewers) and
``kvs/viewer_text`` (a viewer's validated chat line, in the shape of
``sonic_voice.contracts.VIEWER_TEXT``); subscribes ``audio/out`` (24 kHz, played to every
viewer), ``audio/flush`` (drop queued output now), and ``transcript`` / ``state`` (String
JSON from sonic_session, forwarded to viewers as ``{"type": "transcript"|"state", ...}``).

Credentials come from boto3's default chain (environment, ``profile`` parameter, instance
role); none are ever taken from viewers.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from typing import Any

from rclpy.task import Future as RclpyFuture
from sensor_msgs.msg import Image
from std_msgs.msg import Int32, String, UInt8MultiArray
from std_srvs.srv import Trigger

from sonic_voice import contracts as c
from sonic_voice.kvs.control import ControlPlaneError
from sonic_voice.kvs.master import KvsMaster
from sonic_voice.kvs.settings import KVS_MAX_VIEWERS, KvsSettings
from sonic_voice.nodes.diagnostics import ERROR, OK, WARN, Diagnostics, DiagStatus
from sonic_voice.ros.node import ConfigError, VoiceNode, param
from sonic_voice.ros.runtime import run_node
from sonic_voice.ros.topics import (
    LATCHED_QOS,
    follow_output,
    msg_bytes,
    publisher,
    quiet_publisher_events,
    subscription,
    uint8_multiarray_cdr,
)


@dataclass
class KvsParams:
    channel_name: str = param("", "KVS signaling channel name (required).")
    region: str = param("us-west-2", "AWS region of the channel.")
    endpoint_url: str = param(
        "", "Control-plane endpoint override ('' = AWS); the local stand-in's URL."
    )
    profile: str = param("", "AWS profile ('' = boto3's default credential chain).")
    create_channel: bool = param(False, "Create the channel if it does not exist.")
    max_viewers: int = param(KVS_MAX_VIEWERS, "Concurrent viewers (KVS allows 10).", range=(1, 100))
    ice_transport_policy: str = param(
        "all", "'all' or 'relay' (TURN only).", choices=("all", "relay")
    )
    ice_servers: str = param(
        "",
        "'' = STUN per region + TURN from GetIceServerConfig; else a JSON list of "
        "{urls, username, credential} ('[]' = host candidates only, for loopback).",
    )
    stun_url: str = param("", "STUN URL override ('' = stun.kinesisvideo.<region>).")
    prefer_turn_tcp: bool = param(False, "Prefer TURN over TLS/TCP (UDP-hostile nets).")
    ice_timeout_s: float = param(
        30.0, "Close a viewer not connected this long.", range=(5.0, 300.0)
    )
    resilient_receive: bool = param(
        True,
        "Viewer audio through our adaptive jitter buffer with Opus in-band FEC, loss "
        "concealment and NACK (false: aiortc's fixed ~80 ms buffer, which stalls on every lost "
        "packet). The answer then asks the viewer for FEC (useinbandfec=1).",
    )
    opus_fec: bool = param(
        True,
        "Robot speech to viewers as libopus with in-band FEC at opus_bitrate, paced exactly "
        "(false: aiortc's encoder, 96 kbit/s, no FEC).",
    )
    opus_bitrate: int = param(
        32000,
        "Opus bitrate to viewers, bit/s (speech; FEC needs headroom from ~24000).",
        range=(6000, 510000),
    )
    opus_packet_loss_pct: int = param(
        10, "Packet loss the Opus FEC is provisioned for, %.", range=(0, 100)
    )
    opus_pause_in_silence: bool = param(
        False,
        "Send viewers nothing while the robot is silent (they take the pause as DTX); saves "
        "encoding and sending 50 silent packets a second.",
    )
    abr: bool = param(
        False,
        "Adapt the Opus bitrate and FEC to each viewer's receiver reports (docs/kvs.md), "
        "between abr_min_bps and opus_bitrate.",
    )
    abr_min_bps: int = param(6000, "Lowest adaptive bitrate, bit/s.", range=(6000, 510000))
    invite_page_url: str = param(
        "",
        "The viewer page guests open (e.g. https://example.org/robot/index.html); '' = no "
        "invites. ~/create_invite mints a short-lived join link for it (no AWS keys needed).",
    )
    invite_expires_s: int = param(
        299, "How long an invite link can be opened, s (KVS signs at most 299).", range=(10, 299)
    )


class KvsWebrtcNode(VoiceNode):
    """Viewers' speech -> ``audio/remote``; ``audio/out`` -> viewers; transcripts -> viewers."""

    Params = KvsParams

    def __init__(self, **kwargs: Any) -> None:
        super().__init__("kvs_webrtc", **kwargs)
        self.master: KvsMaster | None = None
        self._ros: list[Any] = []
        self._viewers = 0
        self.remote_blocks = 0
        self.connected = False
        self._viewers_pub = publisher(self, c.VIEWERS)
        self._viewers_pub.publish(Int32(data=0))
        self.diag = Diagnostics(self, hardware_id="kvs")
        self.diag.add("signaling", self._diag)

    def _settings(self) -> KvsSettings:
        p = self.params
        if not p.channel_name:
            raise ConfigError("channel_name is empty: name this robot's KVS signaling channel")
        ice = p.ice_servers.strip()
        try:
            override = json.loads(ice) if ice else None
        except ValueError as e:
            raise ConfigError(f"ice_servers is not JSON: {e}") from None
        if override is not None and not isinstance(override, list):
            raise ConfigError("ice_servers must be '' or a JSON list")
        return KvsSettings(
            channel_name=p.channel_name,
            region=p.region,
            endpoint_url=p.endpoint_url or None,
            profile=p.profile or None,
            create_channel=p.create_channel,
            max_viewers=p.max_viewers,
            ice_transport_policy=p.ice_transport_policy,
            ice_servers_override=override,
            stun_url=p.stun_url or None,
            prefer_turn_tcp=p.prefer_turn_tcp,
            ice_timeout_s=p.ice_timeout_s,
            resilient_receive=p.resilient_receive,
            opus_fec=p.opus_fec,
            opus_bitrate=p.opus_bitrate,
            opus_packet_loss_pct=p.opus_packet_loss_pct,
            opus_pause_in_silence=p.opus_pause_in_silence,
            abr=p.abr,
            abr_min_bps=p.abr_min_bps,
        )

    # -- lifecycle ----------------------------------------------------------------------
    def configure(self) -> None:
        """Check parameters, make topics."""
        try:
            settings = self._settings()
        except (ValueError, TypeError) as e:
            raise ConfigError(f"bad parameters: {e}") from None
        self.master = KvsMaster(
            settings,
            on_audio=self._on_remote_audio,
            on_viewers=self._on_viewers,
            on_message=self._on_viewer_message,
        )
        self._remote_pub = publisher(self, c.REMOTE, lifecycle=True)
        self._text_pub = publisher(self, c.VIEWER_TEXT)
        self._settings_ = settings
        self._qr_pub = self.create_publisher(
            Image, "~/invite_qr", LATCHED_QOS, event_callbacks=quiet_publisher_events()
        )
        self._ros = [
            self._remote_pub,
            self._text_pub,
            self._qr_pub,
            self.create_service(Trigger, "~/create_invite", self._on_create_invite),
            *follow_output(self, self._on_out, self._on_flush),
            subscription(self, c.TRANSCRIPT, lambda m: self._forward("transcript", m)),
            subscription(self, c.STATE, lambda m: self._forward("state", m)),
        ]

    def activate(self) -> None:
        """Resolve the channel and start signaling on the loop (without blocking)."""
        self.bridge.submit(self._start())

    async def _start(self) -> None:
        master = self.master
        assert master is not None
        try:
            await master.start()
        except ControlPlaneError as e:
            self.fail(f"KVS: {e}")
            return
        self.connected = True
        self.get_logger().info(f"KVS master on channel {self.params.channel_name!r}")

    async def stop(self) -> None:
        """Every viewer and the signaling connection closed."""
        master = self.master
        self.connected = False
        if master is not None:
            await master.stop()

    def release(self) -> None:
        self.diag.close()

    # -- guest invites ------------------------------------------------------------------
    def mint_invite(self) -> Any:
        """A short-lived join link for a guest (blocking: two control-plane calls), also
        published as a QR code on ``~/invite_qr``. See ``sonic_voice.kvs.invite``."""
        from sonic_voice.kvs.control import ControlPlane
        from sonic_voice.kvs.invite import invite_for_channel, qr_matrix

        if not self.params.invite_page_url:
            raise ConfigError("invite_page_url is empty: set the page guests open")
        settings = self._settings_
        stun = None if settings.ice_servers_override is not None else settings.default_stun_url
        invite = invite_for_channel(
            ControlPlane(settings, "VIEWER"),
            self.params.invite_page_url,
            expires_s=self.params.invite_expires_s,
            stun_url=stun,
        )
        self._qr_pub.publish(_mono8(qr_matrix(invite.url), self.get_clock().now().to_msg()))
        self.get_logger().info(f"guest invite minted for client {invite.client_id}")
        return invite

    async def _on_create_invite(self, _req: Any, resp: Any) -> Any:
        """std_srvs/Trigger: the link in ``message`` (minted off the executor thread)."""
        done = RclpyFuture()

        def settle(value: Any) -> None:
            done.set_result(value)
            # This coroutine resumes only when its executor next wakes up; nothing else
            # may wake it soon (no timers on the executors: docs/architecture.md).
            executor = self.executor
            if executor is not None:
                executor.wake()

        async def mint() -> None:
            try:
                settle(await asyncio.to_thread(self.mint_invite))
            except Exception as e:  # noqa: BLE001 - said in the response
                settle(e)

        self.bridge.submit(mint())
        result = await done
        if isinstance(result, Exception):
            resp.success, resp.message = False, f"no invite: {result}"
        else:
            resp.success, resp.message = True, result.url
        return resp

    # -- master -> ROS (on the loop) ----------------------------------------------------
    def _on_remote_audio(self, client: str, pcm: bytes) -> None:
        self._remote_pub.publish(uint8_multiarray_cdr(pcm))  # serialized: ros/topics.py
        self.remote_blocks += 1

    def _on_viewers(self, count: int) -> None:
        self._viewers = count
        self._viewers_pub.publish(Int32(data=count))

    def _on_viewer_message(self, client: str, msg: dict[str, Any]) -> None:
        if msg["type"] == "text":
            self._text_pub.publish(String(data=c.viewer_text(msg["text"], client)))

    # -- ROS -> master (executor thread; the master hops onto the loop) -----------------
    def _on_out(self, msg: UInt8MultiArray) -> None:
        if self.master is not None:
            self.master.play(msg_bytes(msg))

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
        if self.master is None:
            return
        if kind == "state":
            self.master.latch(out)  # a viewer joining later sees the current state at once
        else:
            self.master.broadcast(out)

    def _diag(self) -> DiagStatus:
        values = {
            "channel": self.params.channel_name,
            "viewers": self._viewers,
            "remote_blocks": self.remote_blocks,
        }
        if self.fatal_error:
            return DiagStatus(ERROR, self.fatal_error, values)
        if self.config_error:
            return DiagStatus(ERROR, self.config_error, values)
        if not self.connected:
            return DiagStatus(WARN, "not connected", values)
        return DiagStatus(OK, "ok", values)


def _mono8(matrix: list[list[bool]], stamp: Any, scale: int = 4, border: int = 4) -> Image:
    """A QR matrix as a ``sensor_msgs/Image`` (mono8, dark modules black)."""
    n = len(matrix) + 2 * border
    rows = []
    for y in range(n):
        src = matrix[y - border] if border <= y < n - border else []
        row = bytes(
            0 if (border <= x < n - border and src and src[x - border]) else 255 for x in range(n)
        )
        line = b"".join(bytes([v]) * scale for v in row)
        rows.extend([line] * scale)
    img = Image(height=n * scale, width=n * scale, encoding="mono8", is_bigendian=0)
    img.step = n * scale
    img.data = b"".join(rows)
    img.header.stamp = stamp
    return img


def main(args: list[str] | None = None) -> None:
    run_node(KvsWebrtcNode, args)


if __name__ == "__main__":
    main()
