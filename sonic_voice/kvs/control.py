"""KVS control plane through boto3: channel ARN, endpoints, TURN servers.

Every method here blocks (boto3 does); callers on an event loop run them with
``asyncio.to_thread``. Results are cached: Describe and GetSignalingChannelEndpoint are
rate-limited (5 TPS per channel / 300 TPS per account), so a reconnect reuses them and only
a failing endpoint forces a new lookup.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any

import boto3
import botocore.config
from botocore.credentials import ReadOnlyCredentials
from botocore.exceptions import ClientError, NoCredentialsError

from sonic_voice.kvs.settings import KvsSettings
from sonic_voice.kvs.signing import presign_wss_url

log = logging.getLogger(__name__)

# Errors that retrying cannot fix: configuration, permissions, a channel that is not there.
FATAL_CODES = frozenset(
    {
        "ResourceNotFoundException",
        "AccessDeniedException",
        "InvalidArgumentException",
        "NotAuthorizedException",
        "UnrecognizedClientException",
        "InvalidSignatureException",
        "AccountChannelLimitExceededException",
    }
)


class ControlPlaneError(RuntimeError):
    """A control-plane failure; ``fatal`` when retrying cannot help."""

    def __init__(self, message: str, fatal: bool) -> None:
        super().__init__(message)
        self.fatal = fatal


@dataclass(frozen=True)
class Endpoints:
    wss: str
    https: str


@dataclass(frozen=True)
class TurnServer:
    uris: tuple[str, ...]
    username: str
    password: str
    ttl: int


def classify(exc: BaseException) -> ControlPlaneError:
    """Turn a boto3 failure into a ControlPlaneError with a clear message."""
    if isinstance(exc, ControlPlaneError):
        return exc
    if isinstance(exc, NoCredentialsError):
        return ControlPlaneError(
            "no AWS credentials: set access keys, a profile, or an instance role", True
        )
    if isinstance(exc, ClientError):
        code = exc.response.get("Error", {}).get("Code", "?")
        msg = exc.response.get("Error", {}).get("Message", str(exc))
        return ControlPlaneError(f"{exc.operation_name}: {code}: {msg}", code in FATAL_CODES)
    return ControlPlaneError(f"{type(exc).__name__}: {exc}", False)


class ControlPlane:
    """Channel resolution and signaling-service calls for one channel and one role."""

    def __init__(self, settings: KvsSettings, role: str = "MASTER") -> None:
        self.settings = settings
        self.role = role
        self._session = boto3.session.Session(
            aws_access_key_id=settings.access_key_id,
            aws_secret_access_key=settings.secret_access_key,
            aws_session_token=settings.session_token,
            profile_name=settings.profile,
            region_name=settings.region,
        )
        self._config = botocore.config.Config(
            connect_timeout=min(5.0, settings.api_timeout_s),
            read_timeout=settings.api_timeout_s,
            retries={"max_attempts": 3, "mode": "standard"},
            user_agent_extra="sonic_voice-kvs",
        )
        self._kv = self._session.client(
            "kinesisvideo", endpoint_url=settings.endpoint_url, config=self._config
        )
        self._lock = threading.Lock()
        self._signaling: Any = None
        self._signaling_url: str | None = None
        self.channel_arn: str | None = None
        self.endpoints: Endpoints | None = None

    # -- channel ------------------------------------------------------------------------
    def resolve(self, refresh: bool = False) -> tuple[str, Endpoints]:
        """ARN and endpoints (cached unless ``refresh``); creates the channel when asked."""
        with self._lock:
            try:
                if self.channel_arn is None or refresh:
                    self.channel_arn = self._describe_or_create()
                if self.endpoints is None or refresh:
                    self.endpoints = self._get_endpoints(self.channel_arn)
            except Exception as e:
                raise classify(e) from e
            return self.channel_arn, self.endpoints

    def _describe_or_create(self) -> str:
        name = self.settings.channel_name
        try:
            info = self._kv.describe_signaling_channel(ChannelName=name)["ChannelInfo"]
        except ClientError as e:
            code = e.response.get("Error", {}).get("Code")
            if code != "ResourceNotFoundException" or not self.settings.create_channel:
                if code == "ResourceNotFoundException":
                    raise ControlPlaneError(
                        f"signaling channel {name!r} does not exist in {self.settings.region} "
                        "(set create_channel to create it)",
                        True,
                    ) from e
                raise
            arn = self._kv.create_signaling_channel(
                ChannelName=name,
                ChannelType="SINGLE_MASTER",
                SingleMasterConfiguration={"MessageTtlSeconds": self.settings.message_ttl_s},
            )["ChannelARN"]
            log.info("created signaling channel %s: %s", name, arn)
            return arn
        if info.get("ChannelStatus") not in (None, "ACTIVE", "UPDATING"):
            raise ControlPlaneError(f"channel {name!r} is {info.get('ChannelStatus')}", False)
        return info["ChannelARN"]

    def _get_endpoints(self, arn: str) -> Endpoints:
        resp = self._kv.get_signaling_channel_endpoint(
            ChannelARN=arn,
            SingleMasterChannelEndpointConfiguration={
                "Protocols": ["WSS", "HTTPS"],
                "Role": self.role,
            },
        )
        found = {e["Protocol"]: e["ResourceEndpoint"] for e in resp["ResourceEndpointList"]}
        if "WSS" not in found or "HTTPS" not in found:
            raise ControlPlaneError(f"endpoint list lacks WSS/HTTPS: {found}", False)
        return Endpoints(wss=found["WSS"], https=found["HTTPS"])

    # -- signaling service ----------------------------------------------------------------
    def _signaling_client(self) -> Any:
        assert self.endpoints is not None
        if self._signaling_url != self.endpoints.https:
            self._signaling = self._session.client(
                "kinesis-video-signaling", endpoint_url=self.endpoints.https, config=self._config
            )
            self._signaling_url = self.endpoints.https
        return self._signaling

    def ice_servers(self, client_id: str | None = None) -> list[TurnServer]:
        """GetIceServerConfig (TURN); STUN is not returned by any API."""
        arn, _ = self.resolve()
        kwargs: dict[str, Any] = {"ChannelARN": arn, "Service": "TURN"}
        if client_id:
            kwargs["ClientId"] = client_id
        try:
            with self._lock:
                client = self._signaling_client()
            resp = client.get_ice_server_config(**kwargs)
        except Exception as e:
            raise classify(e) from e
        return [
            TurnServer(
                tuple(s.get("Uris", ())), s.get("Username", ""), s.get("Password", ""), s["Ttl"]
            )
            for s in resp.get("IceServerList", [])
        ]

    def credentials(self) -> ReadOnlyCredentials:
        """Frozen current credentials (refreshable ones are refreshed here if due)."""
        creds = self._session.get_credentials()
        if creds is None:
            raise classify(NoCredentialsError())
        return creds.get_frozen_credentials()

    def presigned_url(self, client_id: str | None = None) -> str:
        """A freshly signed WSS URL (call per connection attempt)."""
        arn, endpoints = self.resolve()
        return presign_wss_url(
            endpoints.wss,
            arn,
            self.credentials(),
            self.settings.region,
            client_id=client_id,
            expires=self.settings.presign_expires_s,
        )
