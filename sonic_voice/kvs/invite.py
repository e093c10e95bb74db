"""Guest invites: a short-lived link that lets a visitor join the robot's channel as a KVS
viewer from the web page (web/) with no AWS keys.

The robot signs, with its own credentials, one viewer signaling URL (SigV4 query
presigning by botocore, ``X-Amz-ClientId`` = a fresh client id, ``X-Amz-Expires`` =
``expires_s``, at most 299 s as both SDKs sign) and bundles it with the TURN servers
GetIceServerConfig gave for that client id. What the guest holds can do one thing: open
that one viewer connection to that one channel, within the expiry (an open connection then
lives up to the service's 1-hour limit). No key or token leaves the robot except inside
the signature's ``X-Amz-Security-Token``/``X-Amz-Credential`` parameters, which is what any
presigned URL carries; use robot credentials whose policy allows only ConnectAsViewer on
the channel for minting (docs/aws-setup.md) to keep a leaked link harmless past its expiry.

The bundle travels in the URL **fragment** (``#invite=<base64url JSON>``): browsers never
send a fragment to the server that serves the page, so it stays out of access logs and
``Referer`` headers; the page removes it from the address bar once read.

API for the kvs_webrtc node (the lead wires it):

- :func:`mint_invite` (pure: no I/O) -> :class:`Invite` with ``.url``;
- :func:`invite_for_channel` (blocking: GetSignalingChannelEndpoint as VIEWER and
  GetIceServerConfig through a :class:`~sonic_voice.kvs.control.ControlPlane`);
- :func:`qr_png` / :func:`qr_text` (segno): the link as a PNG (an image topic) or as
  terminal text (the runner).
"""

from __future__ import annotations

import base64
import io
import json
import secrets
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from botocore.credentials import ReadOnlyCredentials

from sonic_voice.kvs.signing import presign_wss_url

INVITE_VERSION = 1
MAX_EXPIRES_S = 299  # what the SDKs sign signaling URLs with
_ID_OK = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


@dataclass(frozen=True)
class Invite:
    url: str  # the page URL with #invite=...
    client_id: str
    expires_at: float  # POSIX time after which the signaling URL no longer opens
    signaling_url: str  # presigned viewer WSS URL (also inside ``url``)
    ice_servers: list[dict[str, Any]] = field(default_factory=list)


def new_client_id(prefix: str = "guest-") -> str:
    return prefix + secrets.token_hex(6)


def mint_invite(
    page_url: str,
    *,
    wss_endpoint: str,
    channel_arn: str,
    region: str,
    credentials: ReadOnlyCredentials,
    ice_servers: list[dict[str, Any]] | None = None,
    client_id: str | None = None,
    channel_name: str | None = None,
    expires_s: int = MAX_EXPIRES_S,
    now: float | None = None,
) -> Invite:
    """A join link for one guest viewer. ``ice_servers``: RTCIceServer-shaped dicts
    (``urls``, ``username``, ``credential``) or GetIceServerConfig entries (``Uris``,
    ``Username``, ``Password``). Raises ValueError naming the bad argument."""
    client_id = client_id or new_client_id()
    if not 1 <= len(client_id) <= 256 or set(client_id) - _ID_OK or client_id.startswith("AWS_"):
        raise ValueError(
            f"client_id {client_id!r}: 1-256 of a-z A-Z 0-9 _ . - and not starting with AWS_"
        )
    if not 1 <= expires_s <= MAX_EXPIRES_S:
        raise ValueError(f"expires_s must be 1..{MAX_EXPIRES_S}, not {expires_s}")
    parts = urllib.parse.urlsplit(page_url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"page_url must be an http(s) URL, not {page_url!r}")
    if parts.fragment:
        raise ValueError(f"page_url must have no #fragment (the invite goes there): {page_url}")
    signed = presign_wss_url(
        wss_endpoint, channel_arn, credentials, region, client_id=client_id, expires=expires_s
    )
    servers = [_rtc_server(s) for s in ice_servers or []]
    issued = time.time() if now is None else now
    expires_at = issued + expires_s
    bundle = {
        "v": INVITE_VERSION,
        "wss": signed,
        "clientId": client_id,
        "region": region,
        "channel": channel_name or channel_arn.split("/")[-2],
        "iceServers": servers,
        "exp": int(expires_at),
    }
    raw = json.dumps(bundle, separators=(",", ":")).encode()
    token = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    url = urllib.parse.urlunsplit(parts._replace(fragment=f"invite={token}"))
    return Invite(url, client_id, expires_at, signed, servers)


def read_invite(url: str) -> dict[str, Any]:
    """The bundle inside an invite link (what the page reads; for tests and tools)."""
    frag = urllib.parse.urlsplit(url).fragment
    if not frag.startswith("invite="):
        raise ValueError("no #invite= in the URL")
    token = frag[len("invite=") :]
    return json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))


def _rtc_server(s: dict[str, Any]) -> dict[str, Any]:
    urls = s.get("urls") or s.get("Uris")
    if not urls:
        raise ValueError(f"ICE server without urls/Uris: {s}")
    out: dict[str, Any] = {"urls": list(urls) if not isinstance(urls, str) else [urls]}
    user, cred = s.get("username") or s.get("Username"), s.get("credential") or s.get("Password")
    if user:
        out["username"] = user
    if cred:
        out["credential"] = cred
    return out


def invite_for_channel(
    control: Any,
    page_url: str,
    *,
    client_id: str | None = None,
    expires_s: int = MAX_EXPIRES_S,
    stun_url: str | None = None,
) -> Invite:
    """Blocking: resolve the channel's VIEWER endpoint and TURN servers for a new client
    id through ``control`` (a ControlPlane made with role "VIEWER" from the robot's
    settings), then :func:`mint_invite`. ``stun_url``: prepended when given (KVS returns
    no STUN; ``KvsSettings.default_stun_url`` on AWS)."""
    client_id = client_id or new_client_id()
    arn, endpoints = control.resolve()
    turn = control.ice_servers(client_id)
    servers: list[dict[str, Any]] = [{"urls": [stun_url]}] if stun_url else []
    servers += [
        {"urls": list(t.uris), "username": t.username, "credential": t.password} for t in turn
    ]
    return mint_invite(
        page_url,
        wss_endpoint=endpoints.wss,
        channel_arn=arn,
        region=control.settings.region,
        credentials=control.credentials(),
        ice_servers=servers,
        client_id=client_id,
        channel_name=control.settings.channel_name,
        expires_s=expires_s,
    )


def qr_png(url: str, scale: int = 4) -> bytes:
    """The link as a PNG QR code (error correction M), for an image topic or a screen."""
    import segno

    buf = io.BytesIO()
    segno.make(url, error="m", micro=False).save(buf, kind="png", scale=scale, border=4)
    return buf.getvalue()


def qr_matrix(url: str) -> list[list[bool]]:
    """The QR modules (True = dark), with no border: for a ``sensor_msgs/Image`` (mono8)."""
    import segno

    return [[bool(v) for v in row] for row in segno.make(url, error="m", micro=False).matrix]


def qr_text(url: str) -> str:
    """The link as a QR code drawn with block characters, for a terminal."""
    import segno

    buf = io.StringIO()
    segno.make(url, error="m", micro=False).terminal(out=buf, compact=True)
    return buf.getvalue()
