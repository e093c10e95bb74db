"""A local stand-in for Amazon Kinesis Video Streams WebRTC signaling.

One aiohttp server on loopback answers:

- the control-plane REST-JSON calls boto3 makes for ``kinesisvideo`` when given an
  ``endpoint_url`` (Create/Describe/Delete/List SignalingChannel(s),
  GetSignalingChannelEndpoint) and the data-plane call of ``kinesis-video-signaling``
  (``/v1/get-ice-server-config``), with errors typed through ``x-amzn-ErrorType`` so boto3
  raises the real exception classes;
- the signaling WebSocket (``/ws/master``, ``/ws/viewer``), which checks the presigned query,
  then routes SDP offers/answers and ICE candidates between the master and viewers by
  client id with the real envelope (``action``/``messagePayload``/``recipientClientId``/
  ``correlationId`` in, ``messageType``/``messagePayload``/``senderClientId`` out), buffers
  viewer messages for ``MessageTtlSeconds`` while no master is connected, answers errors with
  ``STATUS_RESPONSE`` when a correlation id was sent, and enforces the 10K payload limit.

Test hooks inject ``GO_AWAY``, ``RECONNECT_ICE_SERVER``, ``STATUS_RESPONSE``, raw frames and
each malformed frame of :data:`MALFORMED` (``send_malformed``), forge a viewer's message
(``send_as_viewer``), drop sockets, and every routed message is recorded. CORS is open on
the REST endpoints so a browser page served from another localhost port can call them with
``fetch``.

Rules and limits follow /work/shared/reference/kvs-signaling.md (sections 1, 2 and 5.3).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import hmac
import json
import logging
import re
import secrets
import ssl
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import WSMsgType, web

log = logging.getLogger(__name__)

MAX_PAYLOAD_CHARS = 10_000  # "10K" in the KVS limits; botocore uses 10000 for Alexa payloads
CLIENT_ACTIONS = ("SDP_OFFER", "SDP_ANSWER", "ICE_CANDIDATE")
ID_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,256}$")
NAME_RE = re.compile(r"^[a-zA-Z0-9_.-]{1,256}$")
B64_RE = re.compile(r"^[a-zA-Z0-9+/=]+$")
REQUIRED_QUERY = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
    "X-Amz-ChannelARN",
)
MASTER = "MASTER"  # how records name the master side


VIEWER_FOR_FAULTS = "fault-viewer"  # default sender of forged viewer frames
_GOOD_CANDIDATE = "candidate:1 1 udp 2122260223 127.0.0.2 9 typ host"


def _b64json(obj: Any) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


def _malformed(kind: str, sender: str) -> dict[str, Any] | str:
    """The frame for one :data:`MALFORMED` kind, as the service would deliver it."""
    offer = {"messageType": "SDP_OFFER", "senderClientId": sender}
    cand = {"messageType": "ICE_CANDIDATE", "senderClientId": sender}
    status = {"messageType": "STATUS_RESPONSE"}
    frames: dict[str, dict[str, Any] | str] = {
        # Frames the service itself could garble (issue 11 item 6).
        "payload_not_string": {**offer, "messagePayload": 12345},
        "payload_list": {**offer, "messagePayload": ["eyJ0eXBlIjoib2ZmZXIifQ=="]},
        "payload_bad_base64": {**offer, "messagePayload": "not base64 at all!"},
        "payload_not_ascii": {**offer, "messagePayload": "ZXlK\u00e9"},
        "payload_bad_json": {**offer, "messagePayload": base64.b64encode(b"{oops").decode()},
        "payload_not_utf8": {**offer, "messagePayload": base64.b64encode(b"\xff\xfe").decode()},
        "payload_json_list": {**offer, "messagePayload": _b64json([1, 2])},
        "payload_deep_json": {**offer, "messagePayload": base64.b64encode(b"[" * 5000).decode()},
        "offer_sdp_not_string": {**offer, "messagePayload": _b64json({"type": "offer", "sdp": 7})},
        "message_type_not_string": {"messageType": ["SDP_OFFER"], "messagePayload": "e30="},
        "sender_not_string": {**offer, "senderClientId": {"id": 1}, "messagePayload": "e30="},
        "sender_missing": {"messageType": "SDP_OFFER", "messagePayload": "e30="},
        "status_not_object": {**status, "statusResponse": "failed"},
        "status_list": {**status, "statusResponse": [{"correlationId": "x"}]},
        "correlation_id_list": {**status, "statusResponse": {"correlationId": ["a", "b"]}},
        "status_code_object": {**status, "statusResponse": {"statusCode": {"code": 400}}},
        "frame_deep_json": "[" * 100_000,
        # Malformed ICE candidates from a viewer (item 7).
        "candidate_garbage": {**cand, "messagePayload": _b64json(
            {"candidate": "candidate:garbage", "sdpMid": "0", "sdpMLineIndex": 0})},
        "candidate_no_mid": {**cand, "messagePayload": _b64json({"candidate": _GOOD_CANDIDATE})},
        "candidate_not_string": {**cand, "messagePayload": _b64json(
            {"candidate": 42, "sdpMid": "0", "sdpMLineIndex": 0})},
        "candidate_bad_port": {**cand, "messagePayload": _b64json(
            {"candidate": _GOOD_CANDIDATE.replace(" 9 ", " 99999 "), "sdpMid": "0"})},
        "candidate_bad_address": {**cand, "messagePayload": _b64json(
            {"candidate": _GOOD_CANDIDATE.replace("127.0.0.2", "not-an-ip"), "sdpMid": "0"})},
        "candidate_mline_string": {**cand, "messagePayload": _b64json(
            {"candidate": _GOOD_CANDIDATE, "sdpMLineIndex": "0"})},
    }  # fmt: skip
    return frames[kind]


# Every malformed frame ``send_malformed`` can send (kinds starting "candidate_" are ICE
# candidates forged from a viewer; the rest break the envelope or the payload).
MALFORMED = (
    "payload_not_string",
    "payload_list",
    "payload_bad_base64",
    "payload_not_ascii",
    "payload_bad_json",
    "payload_not_utf8",
    "payload_json_list",
    "payload_deep_json",
    "offer_sdp_not_string",
    "message_type_not_string",
    "sender_not_string",
    "sender_missing",
    "status_not_object",
    "status_list",
    "correlation_id_list",
    "status_code_object",
    "frame_deep_json",
    "candidate_garbage",
    "candidate_no_mid",
    "candidate_not_string",
    "candidate_bad_port",
    "candidate_bad_address",
    "candidate_mline_string",
)


class ApiError(Exception):
    """A control-plane error: boto3 maps ``code`` to its typed exception."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message


@dataclass(frozen=True)
class Routed:
    """One signaling message seen by the stand-in (delivered, buffered, injected or refused)."""

    t: float
    channel: str
    action: str
    sender: str
    recipient: str
    correlation_id: str | None
    payload_chars: int
    outcome: str  # "delivered" | "buffered" | "injected" | "error: <reason>"
    payload: str = field(repr=False, default="")


@dataclass
class _Channel:
    name: str
    arn: str
    ttl: int
    created: float
    version: str
    master: web.WebSocketResponse | None = None
    viewers: dict[str, web.WebSocketResponse] = field(default_factory=dict)
    pending: deque = field(default_factory=deque)  # (expiry, frame dict) for the master

    def info(self) -> dict[str, Any]:
        return {
            "ChannelName": self.name,
            "ChannelARN": self.arn,
            "ChannelType": "SINGLE_MASTER",
            "ChannelStatus": "ACTIVE",
            "CreationTime": self.created,
            "SingleMasterConfiguration": {"MessageTtlSeconds": self.ttl},
            "Version": self.version,
        }


def _verify_sigv4_query(url: str, query: dict[str, str], secret_key: str) -> bool:
    """Recompute the SigV4 query signature with botocore and compare.

    botocore builds the canonical request and string to sign exactly as it does when it
    presigns, so a client that signed with botocore (or any correct SigV4 signer) matches.
    """
    from botocore.auth import SigV4QueryAuth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import ReadOnlyCredentials

    cred = query["X-Amz-Credential"].split("/")
    if len(cred) != 5:
        return False
    access_key, _day, region, service, _term = cred
    token = query.get("X-Amz-Security-Token")
    auth = SigV4QueryAuth(
        ReadOnlyCredentials(access_key, secret_key, token),
        service,
        region,
        int(query["X-Amz-Expires"]),
    )
    auth_keys = {*REQUIRED_QUERY, "X-Amz-Security-Token"} - {"X-Amz-ChannelARN"}
    params = {k: v for k, v in query.items() if k not in auth_keys}
    request = AWSRequest(method="GET", url=url, params=params)
    request.context["timestamp"] = query["X-Amz-Date"]
    # The same steps SigV4QueryAuth.add_auth runs after fixing its timestamp.
    auth._modify_request_before_signing(request)
    canonical = auth.canonical_request(request)
    string_to_sign = auth.string_to_sign(request, canonical)
    expected = auth.signature(string_to_sign, request)
    return secrets.compare_digest(expected, query["X-Amz-Signature"])


class KvsEmulator:
    """The stand-in server. ``start()`` binds; ``endpoint_url`` is the control-plane URL to
    give boto3 (``endpoint_url=``), ``ws_url`` the signaling base URL.

    ``channels``: names created at start. ``ice_servers``: TURN entries returned by
    GetIceServerConfig (default none: host candidates suffice on loopback, and an unreachable
    relay would stall candidate gathering). ``ice_ttl``: their credentials' lifetime in
    seconds (the service uses 300; tests use a few seconds). ``turn_secret``: mint the
    credentials as a real relay checks them (TURN REST API: username
    ``<expiry>:<base64("v1:<channel ARN>")>`` as KVS shapes it, password
    base64(HMAC-SHA1(secret, username))), so a local coturn with ``use-auth-secret`` and the
    same secret accepts them until they expire. ``verify_secret``: when set, the SigV4 signature
    of every WebSocket URL is recomputed with this secret and a mismatch is refused (403).
    ``ssl``: a server TLS context (e.g. from sonic_voice.emulators.certs) -> https/wss.
    ``record_limit``: keep only the newest this many ``records``/``calls``/``connections``
    (soaks: the history must not grow in the process they measure).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        region: str = "us-west-2",
        account: str = "123456789012",
        channels: tuple[str, ...] | list[str] = (),
        max_viewers: int = 10,
        max_payload_chars: int = MAX_PAYLOAD_CHARS,
        ice_servers: list[dict[str, Any]] | None = None,
        ice_ttl: int = 300,
        turn_secret: str | None = None,
        verify_secret: str | None = None,
        max_connection_s: float | None = None,
        ssl: ssl.SSLContext | None = None,
        record_limit: int | None = None,
    ) -> None:
        self.record_limit = record_limit
        self.host = host
        self.port = port
        self.region = region
        self.account = account
        self.max_viewers = max_viewers
        self.max_payload_chars = max_payload_chars
        self.ice_servers = list(ice_servers or [])
        self.ice_ttl = ice_ttl
        self.turn_secret = turn_secret
        self.ice_issued: list[tuple[str, str | None]] = []  # (TURN username, ClientId) minted
        self.verify_secret = verify_secret
        self.max_connection_s = max_connection_s
        self.ssl = ssl
        self.records: list[Routed] = []
        self.calls: list[tuple[str, dict[str, Any]]] = []  # control-plane operations
        self.connections: list[tuple[str, str, str]] = []  # (role, client id, channel) accepted
        self.refused: list[tuple[int, str]] = []  # (HTTP status, reason) of refused WS connects
        self._channels: dict[str, _Channel] = {}
        self._initial = list(channels)
        self._runner: web.AppRunner | None = None
        self._changed: asyncio.Condition | None = None
        self._tasks: set[asyncio.Task] = set()

    # -- lifecycle --------------------------------------------------------------------
    async def start(self) -> KvsEmulator:
        self._changed = asyncio.Condition()
        app = web.Application(middlewares=[self._cors], client_max_size=1 << 20)
        app.router.add_route("OPTIONS", "/{tail:.*}", self._preflight)
        for op in (
            "createSignalingChannel",
            "describeSignalingChannel",
            "getSignalingChannelEndpoint",
            "deleteSignalingChannel",
            "listSignalingChannels",
        ):
            app.router.add_post(f"/{op}", self._rest(op))
        app.router.add_post("/v1/get-ice-server-config", self._rest("getIceServerConfig"))
        app.router.add_get("/ws/{role}", self._ws)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, ssl_context=self.ssl)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        for name in self._initial:
            self.create_channel(name)
        log.info("KVS stand-in on %s (ws %s)", self.endpoint_url, self.ws_url)
        return self

    async def stop(self) -> None:
        for ch in self._channels.values():
            for ws in [ch.master, *ch.viewers.values()]:
                if ws is not None and not ws.closed:
                    await ws.close(code=1001, message=b"server stopping")
        for t in list(self._tasks):
            t.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> KvsEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def endpoint_url(self) -> str:
        return f"{'https' if self.ssl else 'http'}://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"{'wss' if self.ssl else 'ws'}://{self.host}:{self.port}"

    # -- state ------------------------------------------------------------------------
    def create_channel(self, name: str, ttl: int = 60) -> str:
        """Create a channel directly (as CreateSignalingChannel would); returns its ARN."""
        if name in self._channels:
            return self._channels[name].arn
        created = time.time()
        arn = (
            f"arn:aws:kinesisvideo:{self.region}:{self.account}:channel/{name}/"
            f"{int(created * 1000)}"
        )
        self._channels[name] = _Channel(name, arn, ttl, created, uuid.uuid4().hex[:12])
        return arn

    def channel_arn(self, name: str) -> str:
        return self._channels[name].arn

    def master_connected(self, channel: str | None = None) -> bool:
        ch = self._channel(channel)
        return ch.master is not None and not ch.master.closed

    def viewer_ids(self, channel: str | None = None) -> list[str]:
        return list(self._channel(channel).viewers)

    def master_connects(self, channel: str | None = None) -> int:
        """How many master connections were accepted (first connect + reconnects)."""
        name = self._channel(channel).name
        return sum(1 for role, _, c in self.connections if role == "master" and c == name)

    def calls_of(self, operation: str) -> list[dict[str, Any]]:
        return [body for op, body in self.calls if op == operation]

    def routed(self, action: str | None = None, sender: str | None = None) -> list[Routed]:
        return [
            r
            for r in self.records
            if (action is None or r.action == action) and (sender is None or r.sender == sender)
        ]

    async def wait_until(self, predicate: Callable[[], bool], wait_s: float = 10.0) -> bool:
        """Wait until ``predicate()`` holds; re-checked whenever the stand-in's state changes."""
        assert self._changed is not None, "start() first"
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(predicate), wait_s)
            except TimeoutError:
                return predicate()
        return True

    def _notify(self) -> None:
        async def _n() -> None:
            async with self._changed:  # type: ignore[union-attr]
                self._changed.notify_all()  # type: ignore[union-attr]

        self._spawn(_n())

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _channel(self, name: str | None) -> _Channel:
        if name is None:
            if len(self._channels) != 1:
                raise ValueError(f"name the channel (have {sorted(self._channels)})")
            return next(iter(self._channels.values()))
        return self._channels[name]

    def _by_arn(self, arn: str) -> _Channel | None:
        return next((c for c in self._channels.values() if c.arn == arn), None)

    # -- test hooks -------------------------------------------------------------------
    def _socket(self, channel: str | None, client: str | None) -> web.WebSocketResponse:
        ch = self._channel(channel)
        ws = ch.master if client in (None, MASTER) else ch.viewers.get(client)  # type: ignore[arg-type]
        if ws is None or ws.closed:
            raise LookupError(f"{client or MASTER} is not connected to {ch.name}")
        return ws

    async def _inject(self, frame: dict[str, Any], client: str | None, channel: str | None) -> None:
        ws = self._socket(channel, client)
        await ws.send_str(json.dumps(frame))
        self._record(
            self._channel(channel).name,
            frame["messageType"],
            "SERVICE",
            client or MASTER,
            None,
            "",
            "injected",
        )

    async def send_go_away(
        self,
        client: str | None = None,
        channel: str | None = None,
        close_after: float | None = None,
    ) -> None:
        """GO_AWAY to the master (default) or a viewer; optionally close it ``close_after`` s later
        (the real service closes within its 1-minute grace)."""
        ws = self._socket(channel, client)
        await self._inject({"messageType": "GO_AWAY"}, client, channel)
        if close_after is not None:

            async def _close() -> None:
                await asyncio.sleep(close_after)
                await ws.close(code=1001, message=b"GO_AWAY grace elapsed")

            self._spawn(_close())

    async def send_reconnect_ice_server(
        self, client: str | None = None, channel: str | None = None
    ) -> None:
        await self._inject({"messageType": "RECONNECT_ICE_SERVER"}, client, channel)

    async def send_status_response(
        self,
        correlation_id: str,
        client: str | None = None,
        channel: str | None = None,
        error_type: str = "InvalidArgumentException",
        status_code: str = "400",
        description: str = "injected by the stand-in",
    ) -> None:
        await self._inject(
            self._status_frame(correlation_id, error_type, description, status_code),
            client,
            channel,
        )

    async def send_raw(
        self, text: str, client: str | None = None, channel: str | None = None
    ) -> None:
        """Any text frame (blank keep-alives, foreign JSON, garbage) to test tolerance."""
        await self._socket(channel, client).send_str(text)

    async def send_malformed(
        self,
        kind: str,
        sender: str = VIEWER_FOR_FAULTS,
        client: str | None = None,
        channel: str | None = None,
    ) -> None:
        """Fault injection: one malformed frame of :data:`MALFORMED` to the master (default)
        or a viewer; frames that name a viewer name ``sender``."""
        if kind not in MALFORMED:
            raise ValueError(f"unknown malformed frame {kind!r}; choose from {MALFORMED}")
        frame = _malformed(kind, sender)
        await self._socket(channel, client).send_str(
            frame if isinstance(frame, str) else json.dumps(frame)
        )
        self._record(
            self._channel(channel).name, kind, "SERVICE", client or MASTER, None, "", "injected"
        )

    async def send_as_viewer(
        self,
        sender: str,
        action: str,
        payload: Any,
        channel: str | None = None,
    ) -> None:
        """Forge a message from viewer ``sender`` to the master (``payload`` is JSON-encoded
        and base64'd as a viewer would), whether or not that viewer is connected: early ICE
        candidates of viewers that have not offered yet, candidates of any shape."""
        frame = {"messageType": action, "messagePayload": _b64json(payload),
                 "senderClientId": sender}  # fmt: skip
        await self._socket(channel, None).send_str(json.dumps(frame))
        self._record(
            self._channel(channel).name, action, sender, MASTER, None, frame["messagePayload"],
            "injected",
        )  # fmt: skip

    async def drop(self, client: str | None = None, channel: str | None = None) -> None:
        """Close a client's socket from the service side."""
        await self._socket(channel, client).close(code=1011, message=b"dropped by the stand-in")

    # -- HTTP -------------------------------------------------------------------------
    @web.middleware
    async def _cors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        resp = await handler(request)
        if not resp.prepared:
            resp.headers["Access-Control-Allow-Origin"] = "*"
            resp.headers["Access-Control-Expose-Headers"] = "x-amzn-ErrorType, x-amzn-RequestId"
        return resp

    async def _preflight(self, request: web.Request) -> web.Response:
        # Echo the requested headers: "*" does not cover Authorization in the Fetch spec.
        wanted = request.headers.get("Access-Control-Request-Headers", "*")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "POST, GET, OPTIONS",
                "Access-Control-Allow-Headers": wanted,
                "Access-Control-Max-Age": "600",
            },
        )

    def _rest(self, op: str) -> Callable[[web.Request], Any]:
        async def handler(request: web.Request) -> web.Response:
            request_id = str(uuid.uuid4())
            try:
                raw = await request.read()
                try:
                    body = json.loads(raw or b"{}")
                except ValueError as e:
                    raise ApiError(400, "InvalidArgumentException", "body is not JSON") from e
                if not isinstance(body, dict):
                    raise ApiError(400, "InvalidArgumentException", "body is not a JSON object")
                self.calls.append((op, body))
                if not request.headers.get("Authorization", "").startswith("AWS4-HMAC-SHA256 "):
                    raise ApiError(403, "AccessDeniedException", "missing SigV4 Authorization")
                result = getattr(self, f"_op_{op}")(body, request)
                self._notify()
                return web.json_response(result, headers={"x-amzn-RequestId": request_id})
            except ApiError as e:
                return web.json_response(
                    {"Message": e.message},
                    status=e.status,
                    headers={"x-amzn-ErrorType": f"{e.code}:", "x-amzn-RequestId": request_id},
                )

        return handler

    def _need(self, body: dict[str, Any], key: str) -> Any:
        if key not in body:
            raise ApiError(400, "InvalidArgumentException", f"{key} is required")
        return body[key]

    def _find(self, body: dict[str, Any]) -> _Channel:
        if "ChannelARN" in body:
            ch = self._by_arn(body["ChannelARN"])
        elif "ChannelName" in body:
            ch = self._channels.get(body["ChannelName"])
        else:
            raise ApiError(400, "InvalidArgumentException", "ChannelName or ChannelARN required")
        if ch is None:
            raise ApiError(404, "ResourceNotFoundException", "The requested channel is not found")
        return ch

    def _op_createSignalingChannel(self, body: dict[str, Any], _r: web.Request) -> dict:
        name = self._need(body, "ChannelName")
        if not isinstance(name, str) or not NAME_RE.match(name):
            raise ApiError(400, "InvalidArgumentException", f"bad ChannelName {name!r}")
        if body.get("ChannelType", "SINGLE_MASTER") != "SINGLE_MASTER":
            raise ApiError(400, "InvalidArgumentException", "only SINGLE_MASTER is supported")
        if name in self._channels:
            raise ApiError(400, "ResourceInUseException", f"channel {name} already exists")
        ttl = int(body.get("SingleMasterConfiguration", {}).get("MessageTtlSeconds", 60))
        if not 5 <= ttl <= 120:
            raise ApiError(400, "InvalidArgumentException", "MessageTtlSeconds must be 5-120")
        return {"ChannelARN": self.create_channel(name, ttl)}

    def _op_describeSignalingChannel(self, body: dict[str, Any], _r: web.Request) -> dict:
        return {"ChannelInfo": self._find(body).info()}

    def _op_deleteSignalingChannel(self, body: dict[str, Any], _r: web.Request) -> dict:
        ch = self._find(body)
        del self._channels[ch.name]
        return {}

    def _op_listSignalingChannels(self, body: dict[str, Any], _r: web.Request) -> dict:
        cond = body.get("ChannelNameCondition") or {}
        prefix = cond.get("ComparisonValue", "")
        return {
            "ChannelInfoList": [
                c.info() for c in self._channels.values() if c.name.startswith(prefix)
            ]
        }

    def _op_getSignalingChannelEndpoint(self, body: dict[str, Any], _r: web.Request) -> dict:
        ch = self._find(body)
        conf = body.get("SingleMasterChannelEndpointConfiguration") or {}
        role = conf.get("Role", "MASTER")
        protocols = conf.get("Protocols") or ["WSS", "HTTPS"]
        if role not in ("MASTER", "VIEWER"):
            raise ApiError(400, "InvalidArgumentException", f"bad Role {role!r}")
        out = []
        for proto in protocols:
            if proto == "WSS":
                url = f"{self.ws_url}/ws/{role.lower()}"
                out.append({"Protocol": "WSS", "ResourceEndpoint": url})
            elif proto == "HTTPS":
                out.append({"Protocol": "HTTPS", "ResourceEndpoint": self.endpoint_url})
            elif proto == "WEBRTC":
                raise ApiError(
                    400, "InvalidArgumentException", f"{ch.name} is not set up for ingestion"
                )
            else:
                raise ApiError(400, "InvalidArgumentException", f"bad protocol {proto!r}")
        return {"ResourceEndpointList": out}

    def _op_getIceServerConfig(self, body: dict[str, Any], _r: web.Request) -> dict:
        ch = self._find({"ChannelARN": self._need(body, "ChannelARN")})
        client = body.get("ClientId")
        if client is not None and not ID_RE.match(str(client)):
            raise ApiError(400, "InvalidClientException", f"bad ClientId {client!r}")
        if body.get("Service", "TURN") != "TURN":
            raise ApiError(400, "InvalidArgumentException", "Service must be TURN")
        expiry = int(time.time()) + self.ice_ttl
        user = f"{expiry}:" + base64.b64encode(f"v1:{ch.arn}".encode()).decode()
        servers = [
            {
                "Uris": list(s["Uris"]),
                "Username": s.get("Username", user),
                "Password": s.get("Password", self._turn_password(user)),
                "Ttl": int(s.get("Ttl", self.ice_ttl)),
            }
            for s in self.ice_servers
        ]
        if servers:
            self.ice_issued.append((user, client))
        return {"IceServerList": servers}

    def _turn_password(self, username: str) -> str:
        if self.turn_secret is None:
            return secrets.token_urlsafe(24)
        digest = hmac.new(self.turn_secret.encode(), username.encode(), hashlib.sha1).digest()
        return base64.b64encode(digest).decode()

    # -- WebSocket --------------------------------------------------------------------
    def _refuse(self, status: int, code: str, reason: str) -> web.Response:
        self.refused.append((status, reason))
        self._notify()
        log.info("stand-in refused a signaling connection: %s %s", status, reason)
        return web.json_response(
            {"Message": reason}, status=status, headers={"x-amzn-ErrorType": f"{code}:"}
        )

    async def _ws(self, request: web.Request) -> web.StreamResponse:
        role = request.match_info["role"]
        q = {k: v for k, v in request.query.items()}
        if role not in ("master", "viewer"):
            return self._refuse(404, "NotFound", f"no such role {role}")
        missing = [k for k in REQUIRED_QUERY if not q.get(k)]
        if role == "viewer" and not q.get("X-Amz-ClientId"):
            missing.append("X-Amz-ClientId")
        if missing:
            return self._refuse(403, "AccessDeniedException", f"missing {', '.join(missing)}")
        try:
            signed_at = dt.datetime.strptime(q["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(
                tzinfo=dt.UTC
            )
            expires = int(q["X-Amz-Expires"])
        except ValueError:
            return self._refuse(403, "AccessDeniedException", "malformed X-Amz-Date/Expires")
        now = dt.datetime.now(dt.UTC)
        if not 1 <= expires <= 604800:
            return self._refuse(403, "AccessDeniedException", "X-Amz-Expires out of range")
        if now > signed_at + dt.timedelta(seconds=expires):
            return self._refuse(403, "AccessDeniedException", "Signature expired")
        if signed_at > now + dt.timedelta(minutes=5):
            return self._refuse(403, "AccessDeniedException", "Signature not yet current")
        if self.verify_secret is not None:
            url = f"{self.ws_url}/ws/{role}"
            if not _verify_sigv4_query(url, q, self.verify_secret):
                return self._refuse(403, "AccessDeniedException", "signature does not match")
        ch = self._by_arn(q["X-Amz-ChannelARN"])
        if ch is None:
            return self._refuse(404, "ResourceNotFoundException", "channel not found")
        client = MASTER
        if role == "viewer":
            client = q["X-Amz-ClientId"]
            if not ID_RE.match(client) or client.startswith("AWS_"):
                return self._refuse(400, "InvalidArgumentException", f"bad ClientId {client!r}")
            if client not in ch.viewers and len(ch.viewers) >= self.max_viewers:
                return self._refuse(400, "ClientLimitExceededException", "too many viewers")

        ws = web.WebSocketResponse(max_msg_size=1 << 16, autoping=True)
        await ws.prepare(request)
        old = ch.master if role == "master" else ch.viewers.get(client)
        if role == "master":
            ch.master = ws
        else:
            ch.viewers[client] = ws
        self.connections.append((role, client, ch.name))
        log.info("stand-in: %s %s connected to %s", role, client, ch.name)
        if old is not None and not old.closed:
            await old.close(code=1000, message=b"replaced by a newer connection")
        if role == "master":
            await self._flush_pending(ch, ws)
        self._notify()
        limit = None
        if self.max_connection_s is not None:
            limit = asyncio.get_running_loop().call_later(
                self.max_connection_s, lambda: self._spawn(ws.close(code=1000))
            )
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    await self._on_frame(ch, client, msg.data)
                elif msg.type == WSMsgType.ERROR:
                    break
        finally:
            if limit is not None:
                limit.cancel()
            if role == "master" and ch.master is ws:
                ch.master = None
            elif role == "viewer" and ch.viewers.get(client) is ws:
                del ch.viewers[client]
            log.info("stand-in: %s %s disconnected", role, client)
            self._notify()
        return ws

    async def _flush_pending(self, ch: _Channel, ws: web.WebSocketResponse) -> None:
        now = time.monotonic()
        while ch.pending:
            expiry, frame = ch.pending.popleft()
            if expiry >= now:
                await ws.send_str(json.dumps(frame))

    def _record(
        self,
        channel: str,
        action: str,
        sender: str,
        recipient: str,
        correlation: str | None,
        payload: str,
        outcome: str,
    ) -> None:
        self.records.append(
            Routed(
                time.monotonic(),
                channel,
                action,
                sender,
                recipient,
                correlation,
                len(payload),
                outcome,
                payload,
            )
        )
        self._trim()
        self._notify()

    def _trim(self) -> None:
        limit = self.record_limit
        if limit is not None:
            for history in (self.records, self.calls, self.connections):
                if len(history) > limit:
                    del history[: len(history) - limit]

    @staticmethod
    def _status_frame(
        correlation: str, error_type: str, description: str, code: str = "400"
    ) -> dict[str, Any]:
        return {
            "messageType": "STATUS_RESPONSE",
            "statusResponse": {
                "correlationId": correlation,
                "success": False,
                "errorType": error_type,
                "statusCode": code,
                "description": description[:1024],
            },
        }

    async def _on_frame(self, ch: _Channel, sender: str, text: str) -> None:
        if not text.strip():
            return  # blank keep-alive
        try:
            obj = json.loads(text)
        except ValueError:
            log.info("stand-in: non-JSON frame from %s ignored", sender)
            return
        if not isinstance(obj, dict):
            return
        # The JS SDK sends camelCase, the C SDK PascalCase; the service takes both.
        norm = {k[:1].lower() + k[1:]: v for k, v in obj.items()}
        action = norm.get("action")
        payload = norm.get("messagePayload")
        recipient = norm.get("recipientClientId")
        correlation = norm.get("correlationId")
        sender_ws = ch.master if sender == MASTER else ch.viewers.get(sender)

        async def fail(error_type: str, why: str) -> None:
            self._record(
                ch.name,
                str(action),
                sender,
                str(recipient or ""),
                correlation,
                str(payload or ""),
                f"error: {why}",
            )
            log.info("stand-in: %s from %s refused: %s", action, sender, why)
            if correlation and sender_ws is not None and not sender_ws.closed:
                frame = self._status_frame(correlation, error_type, why)
                await sender_ws.send_str(json.dumps(frame))

        if correlation is not None and not (
            isinstance(correlation, str) and ID_RE.match(correlation)
        ):
            correlation = None
            await fail("InvalidArgumentException", "malformed correlationId")
            return
        if action not in CLIENT_ACTIONS:
            await fail("InvalidArgumentException", f"unknown action {action!r}")
            return
        if not isinstance(payload, str) or not payload:
            await fail("InvalidArgumentException", "messagePayload is required")
            return
        if len(payload) > self.max_payload_chars:
            await fail(
                "InvalidArgumentException",
                f"messagePayload of {len(payload)} chars exceeds {self.max_payload_chars}",
            )
            return
        if not B64_RE.match(payload):
            await fail("InvalidArgumentException", "messagePayload is not base64")
            return
        try:
            base64.b64decode(payload, validate=True)
        except binascii.Error:
            await fail("InvalidArgumentException", "messagePayload is not base64")
            return
        if sender == MASTER:
            if not recipient:
                await fail("InvalidArgumentException", "recipientClientId is required for master")
                return
            target = ch.viewers.get(recipient)
            if target is None or target.closed:
                await fail("InvalidArgumentException", f"recipient {recipient} is not connected")
                return
            await target.send_str(json.dumps({"messageType": action, "messagePayload": payload}))
            self._record(ch.name, action, MASTER, recipient, correlation, payload, "delivered")
            return
        # A viewer can only talk to the master; its recipientClientId is ignored.
        frame = {"messageType": action, "messagePayload": payload, "senderClientId": sender}
        if ch.master is None or ch.master.closed:
            ch.pending.append((time.monotonic() + ch.ttl, frame))
            self._record(ch.name, action, sender, MASTER, correlation, payload, "buffered")
            return
        await ch.master.send_str(json.dumps(frame))
        self._record(ch.name, action, sender, MASTER, correlation, payload, "delivered")
