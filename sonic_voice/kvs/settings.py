"""Settings of the KVS WebRTC master (one dataclass, every knob documented)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

KVS_MAX_VIEWERS = 10  # the service's soft quota of concurrent viewers per channel


@dataclass
class KvsSettings:
    """What the master needs to know; defaults follow the KVS limits and the SDKs' choices.

    Credentials: explicit keys, else ``profile``, else boto3's default chain (environment,
    shared files, instance role...). ``endpoint_url`` overrides only the *control-plane*
    endpoint (the local stand-in); every other endpoint comes from the service.
    """

    channel_name: str
    region: str = "us-west-2"
    endpoint_url: str | None = None
    profile: str | None = None
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    # Create the channel when DescribeSignalingChannel says it does not exist.
    create_channel: bool = False
    message_ttl_s: int = 60
    # Peers: the service allows 10 viewers per channel; each costs ~11 % of a core per
    # direction here, so a small robot may want fewer.
    max_viewers: int = KVS_MAX_VIEWERS
    ice_transport_policy: str = "all"  # "all" | "relay" (TURN only)
    # None: STUN (built per region) + TURN from GetIceServerConfig. A list (of dicts with
    # urls/username/credential) replaces them for peers; tests pass [] (host candidates only).
    ice_servers_override: list[dict[str, Any]] | None = None
    # None: stun:stun.kinesisvideo.{region}.amazonaws.com:443; "" disables STUN.
    stun_url: str | None = None
    # aiortc uses only the first TURN URI it can parse; prefer turns:...?transport=tcp for
    # UDP-hostile networks (corporate Wi-Fi, some LTE) at some latency cost.
    prefer_turn_tcp: bool = False
    # A peer that is not connected this long after its answer is closed (aiortc's ICE never
    # fails on its own when the remote sends no end-of-candidates, as browsers over KVS do).
    ice_timeout_s: float = 30.0
    # Refresh TURN credentials this long before their TTL ends (the C SDK uses 30 s).
    ice_refresh_grace_s: float = 30.0
    # ICE candidates that arrive before their peer exists wait this long (C sample: 20 s).
    pending_candidate_ttl_s: float = 20.0
    # Signaling WebSocket.
    ping_interval_s: float = 10.0  # the C SDK pings every 10 s; the idle limit is 10 min
    ping_timeout_s: float = 20.0
    open_timeout_s: float = 10.0
    max_connection_s: float = 55 * 60.0  # reconnect before the service's 1-hour limit
    backoff_base_s: float = 0.1  # full-jitter exponential backoff, like the C SDK
    backoff_cap_s: float = 10.0
    presign_expires_s: int = 299  # what both SDKs sign with
    send_wait_s: float = 10.0  # how long a send waits for a (re)connection
    # Outgoing frames are paced to the service's limits per connection (kvs-signaling.md
    # §2.5): SendSDPOffer/SendSDPAnswer 5 TPS, SendICECandidate 20 TPS. Evenly spaced;
    # answers go before queued candidates.
    signaling_rate_per_s: float = 20.0
    sdp_rate_per_s: float = 5.0
    max_message_chars: int = 10_000  # KVS payload limit; larger answers trickle candidates
    api_timeout_s: float = 10.0
    # Audio.
    remote_rate: int = 16000  # viewer audio delivered to on_audio (audio/remote)
    remote_block_ms: float = 32.0
    out_rate: int = 24000  # rate of play() input (audio/out)
    # Viewer -> robot: our adaptive jitter buffer with Opus in-band FEC, PLC and NACK
    # (sonic_voice/kvs/jitter.py) instead of aiortc's fixed ~80 ms buffer that stalls on
    # every lost packet. Our answer then says useinbandfec=1, so the viewer sends FEC.
    resilient_receive: bool = True
    # Robot -> viewer: libopus with in-band FEC at a speech bitrate, paced exactly
    # (sonic_voice/kvs/opus_send.py), instead of aiortc's 96 kbit/s encoder without FEC.
    opus_fec: bool = True
    opus_bitrate: int = 32000  # bit/s; FEC needs headroom, libopus adds it from ~24 kbit/s
    opus_packet_loss_pct: int = 10  # the loss libopus provisions its FEC for
    # Send nothing while the robot is silent (OpusSendConfig.pause_in_silence): the viewer
    # takes the pause as DTX. Saves the encoding and sending of 50 silent packets a second.
    # Chromium plays the first word after a pause as soon with it (p50 55 ms from play()
    # both ways, bench/first_word.py), but 7 of 24 onsets still came faded after the
    # pause_preroll_ms fix (0.06-0.66 of their level in the first 10 ms): off by default
    # while the robot's CPU meets its goal without it (docs/cpu.md).
    opus_pause_in_silence: bool = False
    # Adaptive bitrate on the robot -> viewer stream (sonic_voice/kvs/abr.py): from each
    # viewer's RTCP receiver reports, between abr_min_bps and opus_bitrate. Off by default.
    abr: bool = False
    abr_min_bps: int = 6000
    # Data channel.
    data_max_bytes: int = 4096
    text_max_chars: int = 2000
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.channel_name:
            raise ValueError("channel_name is required")
        if self.ice_transport_policy not in ("all", "relay"):
            raise ValueError(
                f"ice_transport_policy must be 'all' or 'relay', not {self.ice_transport_policy!r}"
            )
        if not 1 <= self.max_viewers <= 100:
            raise ValueError(f"max_viewers must be 1..100 (KVS allows {KVS_MAX_VIEWERS})")
        if not 5 <= self.message_ttl_s <= 120:
            raise ValueError("message_ttl_s must be 5..120 (the KVS range)")
        if not (self.signaling_rate_per_s > 0 and self.sdp_rate_per_s > 0):
            raise ValueError("signaling_rate_per_s and sdp_rate_per_s must be > 0")
        if not 6000 <= self.opus_bitrate <= 510000:
            raise ValueError(f"opus_bitrate must be 6000..510000 bit/s, not {self.opus_bitrate}")
        if not 0 <= self.opus_packet_loss_pct <= 100:
            raise ValueError(
                f"opus_packet_loss_pct must be 0..100, not {self.opus_packet_loss_pct}"
            )

    @property
    def default_stun_url(self) -> str:
        return f"stun:stun.kinesisvideo.{self.region}.amazonaws.com:443"
