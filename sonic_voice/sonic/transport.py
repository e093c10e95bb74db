"""The Bedrock transport: one duplex ``InvokeModelWithBidirectionalStream`` call.

Built on the official ``aws-sdk-bedrock-runtime`` with the awscrt HTTP/2 client (the SDK's
default aiohttp transport cannot stream both ways). What this module adds, and why:

- **credentials** come from botocore's standard chain (environment, profiles, SSO,
  ``credential_process`` such as the IoT credentials provider on robots, container/IMDS),
  bridged into the SDK's identity resolver and refreshed by botocore before they expire;
- **a private CA** (the local stand-in, corporate proxies) is trusted for this client only,
  not for the whole process (``SSL_CERT_FILE`` would replace the process trust store);
- **TCP_NODELAY** is forced on the CRT's socket: awscrt leaves Nagle on, which holds small
  audio frames back for ~40 ms (shared/reference/bedrock-sdk-notes.md, "Timings");
- **fast failure**: a TLS or connection failure is reported within ``open_timeout_s``
  instead of the SDK's silent 11-29 s wait;
- **error classification** into recoverable (rotate/reconnect with history) or not;
- **cheaper input events**: each event serialized, signed and framed in ~33 us instead
  of ~183 (caches cold: ~135 instead of ~420), the same bytes (``sdk_hooks.py``).

Pins: aws-sdk-bedrock-runtime 0.12.0, awscrt 0.38.1, smithy-* as in requirements.lock; the
SDK is pre-1.0 and the CA hook uses a private attribute of ``AWSCRTHTTPClient`` (tested).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

log = logging.getLogger(__name__)

DEFAULT_REGION = "us-east-1"
STATIC_REREAD_S = 30.0  # how long static keys read from the chain are reused
CLOSE_INPUT_S = 1.0  # the end frame of a live stream is written in milliseconds
CLOSE_ENDED_S = 0.25  # ...and once the service has ended the stream it is a courtesy


@dataclass
class BedrockSettings:
    """Where and as whom to talk to Bedrock."""

    region: str = DEFAULT_REGION
    model_id: str = "amazon.nova-2-sonic-v1:0"
    # e.g. https://127.0.0.1:8443 for the stand-in, or a VPC endpoint; None = the region's.
    endpoint_uri: str | None = None
    # PEM file of a CA to trust for this client only (stand-in, corporate TLS proxy).
    ca_bundle: str | None = None
    # A named profile of ~/.aws/config; None = the default chain.
    profile: str | None = None
    # Static keys (tests and the offline demo); None = the standard chain.
    access_key_id: str | None = None
    secret_access_key: str | None = None
    session_token: str | None = None
    open_timeout_s: float = 15.0
    connect_timeout_ms: int = 5000


class SonicStreamError(Exception):
    """A failed stream, classified: ``recoverable`` errors are retried with history."""

    def __init__(self, kind: str, recoverable: bool, message: str, throttled: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.recoverable = recoverable
        self.message = message
        self.throttled = throttled

    def __repr__(self) -> str:
        return f"SonicStreamError({self.kind!r}, recoverable={self.recoverable}, {self.message!r})"


# Substrings of in-stream validation messages that the service means as "start again"
# (nova-sonic-protocol.md §13: InternalErrorCode=531, "System instability").
_RECOVERABLE_VALIDATION = (
    "system instability",
    "internalerrorcode=531",
    "rst_stream",
    "tool response parsing error",
    "timed out",
)

_KINDS: dict[str, tuple[bool, bool]] = {
    # exception class name -> (recoverable, throttled)
    "ModelTimeoutException": (True, False),
    "ModelStreamErrorException": (True, False),
    "ModelErrorException": (True, False),
    "InternalServerException": (True, False),
    "ServiceUnavailableException": (True, False),
    "ThrottlingException": (True, True),
    "ModelNotReadyException": (True, True),
    "ServiceQuotaExceededException": (False, False),
    "AccessDeniedException": (False, False),
    "ResourceNotFoundException": (False, False),
    "UnrecognizedClientException": (False, False),
    "InvalidSignatureException": (False, False),
    "ExpiredTokenException": (True, False),  # credentials refresh, then retry
    "InvalidEventBytes": (True, False),
}

_HINTS = {
    "AccessDeniedException": (
        "access denied: the credentials need bedrock:InvokeModel (it covers the bidirectional "
        "stream) on the model, and model access must be granted in the Bedrock console for "
        "this region (docs/aws-setup.md)"
    ),
    "ResourceNotFoundException": (
        "model not found: check model_id and that the region offers Nova Sonic"
    ),
    "UnrecognizedClientException": "the access key is not valid (check the credentials)",
    "InvalidSignatureException": "request signature rejected: the secret key is wrong",
}


def classify_error(exc: BaseException) -> SonicStreamError:
    """Map an SDK/CRT/transport exception to a :class:`SonicStreamError`."""
    if isinstance(exc, SonicStreamError):
        return exc
    name = type(exc).__name__
    message = str(getattr(exc, "message", "") or exc) or name
    low = message.lower()
    code = str(getattr(exc, "code", "") or getattr(exc, "error_code", "") or "")
    for key in (name, code):
        if key in _KINDS:
            recoverable, throttled = _KINDS[key]
            text = _HINTS.get(key, f"{key}: {message}")
            if key in _HINTS:
                text = f"{text} ({message})"
            return SonicStreamError(key, recoverable, text, throttled)
    if name == "ValidationException" or code == "ValidationException":
        recoverable = any(s in low for s in _RECOVERABLE_VALIDATION)
        return SonicStreamError("ValidationException", recoverable, f"validation: {message}")
    if "signature" in low and ("does not match" in low or "invalid" in low):
        return SonicStreamError(
            "InvalidSignatureException", False, _HINTS["InvalidSignatureException"]
        )
    if "security token" in low or "unrecognizedclient" in low:
        return SonicStreamError(
            "UnrecognizedClientException", False, _HINTS["UnrecognizedClientException"]
        )
    if name == "NoCredentialsError" or "unable to locate credentials" in low:
        return SonicStreamError(
            "NoCredentials",
            False,
            "no AWS credentials found (environment, ~/.aws profiles, SSO or credential_process); "
            "run without credentials for the offline stand-in",
        )
    if "tls" in low or "certificate" in low or "handshake" in low:
        return SonicStreamError("TLS", False, f"TLS failed: {message}")
    if name in ("UnmodeledEventError",):
        recoverable = any(s in low for s in _RECOVERABLE_VALIDATION) or "internal" in low
        return SonicStreamError("UnmodeledError", recoverable, f"service error: {message}")
    if isinstance(exc, (ConnectionError, OSError, TimeoutError, asyncio.TimeoutError)):
        return SonicStreamError("Connection", True, f"connection: {message}")
    if name.startswith("AwsCrtError") or "AWS_" in message:
        return SonicStreamError("Connection", True, f"transport: {message}")
    if isinstance(exc, (TypeError, ValueError, KeyError, IndexError, AttributeError)):
        # A bug or a bad setting, not a service hiccup: retrying would only repeat it.
        return SonicStreamError(name, False, f"{name}: {message}")
    return SonicStreamError(name, True, f"{name}: {message}")


# --------------------------------------------------------------------------- credentials
class BotocoreCredentialsResolver:
    """The SDK's identity resolver backed by botocore's standard credential chain.

    botocore handles environment, profiles, SSO, ``credential_process`` and IMDS, and
    refreshes temporary credentials before they expire; each stream asks it again.
    """

    def __init__(self, profile: str | None = None) -> None:
        self._profile = profile
        self._creds: Any = None
        self._static = False
        self._read_at = 0.0
        self._identity: Any = None  # the last identity handed out

    def _fresh(self) -> bool:
        """The last identity is still good: no file, process or thread needed."""
        creds = self._creds
        if self._identity is None or creds is None:
            return False
        if self._static:
            return time.monotonic() - self._read_at <= STATIC_REREAD_S
        return not creds.refresh_needed()

    async def get_identity(self, *, properties: Any = None) -> Any:
        # The SDK calls this for every signed event, i.e. every 32 ms audio frame: while the
        # last identity is good it is returned at once (a worker-thread round trip here cost
        # ~0.5 ms per frame, p99 several ms, on the uplink); loading, which may block on
        # files, credential_process or IMDS, runs in a worker thread.
        if self._fresh():
            return self._identity
        import botocore.credentials
        import botocore.session
        from smithy_aws_core.identity import AWSCredentialsIdentity

        def load() -> Any:
            creds = self._creds
            now = time.monotonic()
            if creds is None or (self._static and now - self._read_at > STATIC_REREAD_S):
                creds = botocore.session.Session(profile=self._profile).get_credentials()
                # Refreshable credentials (SSO, credential_process, IMDS) are kept: botocore
                # refreshes them. Static ones (environment, credentials file) are read again
                # after STATIC_REREAD_S, so a changed key is used instead of a stale one; the
                # SDK asks for the identity for every signed event, so never on each call.
                self._creds, self._read_at = creds, now
                self._static = not isinstance(creds, botocore.credentials.RefreshableCredentials)
            if creds is None:
                raise SonicStreamError(
                    "NoCredentials",
                    False,
                    "no AWS credentials found (environment, ~/.aws profiles, SSO or "
                    "credential_process); run without AWS configuration for the offline demo",
                )
            return creds.get_frozen_credentials(), getattr(creds, "_expiry_time", None)

        frozen, expiry = await asyncio.to_thread(load)
        if isinstance(expiry, datetime):
            expiry = expiry.astimezone(UTC)
        self._identity = AWSCredentialsIdentity(
            access_key_id=frozen.access_key,
            secret_access_key=frozen.secret_key,
            session_token=frozen.token,
            expiration=expiry if isinstance(expiry, datetime) else None,
        )
        return self._identity


def have_credentials(profile: str | None = None) -> bool:
    """True when the standard chain yields credentials (used to choose offline mode)."""
    import botocore.session

    try:
        return botocore.session.Session(profile=profile).get_credentials() is not None
    except Exception:  # noqa: BLE001 - a broken profile means "no usable credentials"
        return False


# --------------------------------------------------------------------------- transport
def _force_nodelay(port: int) -> int:
    """Set TCP_NODELAY on this process's TCP sockets connected to ``port``.

    awscrt exposes no socket option for it and no file descriptor; on Linux the sockets are
    visible in /proc/self/fd, and setsockopt on a duplicate descriptor changes the shared
    socket. Returns how many sockets were changed (0 elsewhere: latency, not correctness).
    """
    changed = 0
    try:
        fds = os.listdir("/proc/self/fd")
    except OSError:
        return 0
    for name in fds:
        try:
            fd = int(name)
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            s = socket.socket(fileno=os.dup(fd))  # family and type detected from the fd
        except (OSError, ValueError):
            continue
        try:
            if s.family in (socket.AF_INET, socket.AF_INET6) and s.type == socket.SOCK_STREAM:
                peer = s.getpeername()
                if peer[1] == port and not s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY):
                    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    changed += 1
        except OSError:
            pass
        finally:
            s.close()
    return changed


# What every stream of the process can share: TLS contexts (one per trust store; building
# one loads the trust store, ~30 ms for the system's, ~15 ms for a private CA file, measured
# on a 2-core machine) and one awscrt event loop (a thread). Immutable once built.
_TLS_CONTEXTS: dict[str | None, Any] = {}
_CRT_LOOP: list[Any] = []
# The attributes AWSCRTHTTPClient.__init__ sets; _Client sets the same itself (so it does not
# build a default TLS context per stream). test_sonic_unit_transport checks the SDK's list.
SDK_CLIENT_ATTRS = frozenset(
    {"_config", "_eventloop", "_client_bootstrap", "_tls_ctx", "_socket_options",
     "_connections", "_closed"}
)  # fmt: skip


def _tls_context(ca_bundle: str | None) -> Any:
    from awscrt import io as crt_io

    key = ca_bundle or None
    if key not in _TLS_CONTEXTS:
        opts = crt_io.TlsContextOptions()
        if key:
            opts.override_default_trust_store_from_path(ca_filepath=key)
        _TLS_CONTEXTS[key] = crt_io.ClientTlsContext(opts)
    return _TLS_CONTEXTS[key]


def _crt_loop() -> Any:
    from smithy_http.aio.crt import _AWSCRTEventLoop

    if not _CRT_LOOP:
        _CRT_LOOP.append(_AWSCRTEventLoop())
    return _CRT_LOOP[0]


def guard_cancelled_connects() -> bool:
    """awscrt (0.38) sets the outcome of a connection attempt on its connect future from its
    own thread without asking whether the waiter gave up (an open abandoned mid-connect: the
    SDK's retry of a failed first attempt, a shutdown): the result is "Exception ignored ...
    InvalidStateError" printed from that thread. Patched once, process-wide: a given-up
    attempt resolves a spare future instead (a connection made for nobody is closed).
    Returns False where awscrt no longer has the hook point (its own behaviour then stays)."""
    import concurrent.futures

    from awscrt import http as crt_http

    core = getattr(crt_http, "_HttpClientConnectionCore", None)
    setup = getattr(core, "_on_connection_setup", None)
    if setup is None:
        return False
    if getattr(setup, "_sv_guard", False):
        return True

    def on_setup(self: Any, binding: Any, error_code: int, http_version: Any) -> None:
        wanted = self._connect_future
        if wanted is None or not wanted.cancelled():
            return setup(self, binding, error_code, http_version)
        spare: concurrent.futures.Future = concurrent.futures.Future()
        self._connect_future = spare
        setup(self, binding, error_code, http_version)
        if spare.done() and spare.exception() is None:
            spare.result().close()
        return None

    on_setup._sv_guard = True  # type: ignore[attr-defined]
    core._on_connection_setup = on_setup  # type: ignore[union-attr]
    return True


def _make_http_client(settings: BedrockSettings) -> Any:
    from awscrt import io as crt_io
    from smithy_http.aio.crt import AWSCRTHTTPClient, AWSCRTHTTPClientConfig

    guard_cancelled_connects()

    class _Client(AWSCRTHTTPClient):
        """awscrt HTTP/2 with an optional private CA and Nagle off."""

        def __init__(self) -> None:
            # AWSCRTHTTPClient.__init__ without its per-client default TLS context and
            # event loop: opening a stream took ~70 ms, ~45 of them building those.
            self._config = AWSCRTHTTPClientConfig(force_http_2=True)
            self._eventloop = _crt_loop()
            self._client_bootstrap = self._eventloop.bootstrap
            self._tls_ctx = _tls_context(settings.ca_bundle)
            self._socket_options = crt_io.SocketOptions()
            self._connections = {}
            self._closed = False
            self._socket_options.connect_timeout_ms = settings.connect_timeout_ms
            # Set when the connection cannot be made (TLS, refused, not HTTP/2): the SDK
            # itself reports that only when its output future times out, 11-29 s later.
            self.failure: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self.failure.add_done_callback(lambda f: f.cancelled() or f.exception())
            self.crt_streams: list[Any] = []

        async def _create_connection(self, url: Any) -> Any:
            try:
                return await super()._create_connection(url)
            except Exception as exc:
                if not self.failure.done():
                    self.failure.set_exception(exc)
                raise

        async def _await_response(self, stream: Any) -> Any:
            # Each awscrt HTTP/2 stream runs its request body in a task of its own
            # (``stream._writer``); kept here so the stream's owner can end it.
            self.crt_streams.append(stream)
            return await super()._await_response(stream)

        async def _build_new_connection(self, url: Any) -> Any:
            conn = await super()._build_new_connection(url)
            port = url.port or (443 if url.scheme == "https" else 80)
            n = _force_nodelay(port)
            log.debug("TCP_NODELAY set on %d socket(s) to port %d", n, port)
            return conn

    return _Client()


class SonicStream:
    """One open bidirectional stream: ``send`` event JSON, ``receive`` event JSON."""

    def __init__(self, duplex: Any, client: Any, http: Any) -> None:
        self._duplex = duplex
        self._client = client
        self._http = http
        self._output: Any = None
        self._closed = False
        self._receiving = False
        self._ended = asyncio.Event()  # the service ended the response (or it failed)
        self.opened_at = asyncio.get_running_loop().time()

    async def _ready(self, limit_s: float) -> None:
        _, self._output = await asyncio.wait_for(self._duplex.await_output(), limit_s)

    async def send(self, event: bytes) -> None:
        """Send one Nova Sonic input event (its JSON bytes)."""
        from aws_sdk_bedrock_runtime.models import (
            BidirectionalInputPayloadPart,
            InvokeModelWithBidirectionalStreamInputChunk,
        )

        if self._closed:
            raise SonicStreamError("closed", True, "send on a closed stream")
        await self._duplex.input_stream.send(
            InvokeModelWithBidirectionalStreamInputChunk(
                value=BidirectionalInputPayloadPart(bytes_=event)
            )
        )

    async def receive(self) -> bytes | None:
        """The next output event's JSON bytes; None when the service ended the stream.

        Modeled exceptions raise; never cancel this (a cancelled receive kills the stream).
        """
        from aws_sdk_bedrock_runtime.models import InvokeModelWithBidirectionalStreamOutputChunk

        self._receiving = True
        try:
            while True:
                try:
                    item = await self._output.receive()
                except BaseException:
                    self._ended.set()
                    raise
                if item is None:
                    self._ended.set()
                    return None
                if isinstance(item, InvokeModelWithBidirectionalStreamOutputChunk):
                    return item.value.bytes_ or b""
                value = getattr(item, "value", None)
                if isinstance(value, BaseException):
                    self._ended.set()
                    raise value
                log.debug("unknown output member %s ignored", type(item).__name__)
        finally:
            self._receiving = False

    async def close_input(self, limit_s: float = CLOSE_INPUT_S) -> None:
        """End our half of the stream (the SDK writes the empty end frame), ``limit_s`` at
        most. Once the service has ended the stream, the next write ends the SDK's body
        writer (AWS_ERROR_HTTP_STREAM_HAS_COMPLETED) and nothing ever takes that frame: an
        unbounded close waited until it was cancelled (5 s in the tests; on a robot, any
        stop or rotation after the service ended a stream, e.g. at its time limit)."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._duplex.input_stream.close(), limit_s)

    async def close(self, drain_s: float = 3.0) -> None:
        """Close the input, let the receiver drain, release the connection.

        The service ends its response once it has read the whole input; releasing the
        connection before that resets the stream and can lose the last events (promptEnd,
        sessionEnd) still queued in the SDK's body writer. So wait for the response's end
        (seen by the reader task, or drained here when nobody reads), ``drain_s`` at most.
        """
        if self._closed:
            return
        self._closed = True
        await self.close_input(CLOSE_ENDED_S if self._ended.is_set() else CLOSE_INPUT_S)
        if self._output is not None and not self._ended.is_set():
            if self._receiving:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ended.wait(), drain_s)
            else:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._drain(), drain_s)
        with contextlib.suppress(Exception):
            if self._output is not None:
                await self._output.close()
        with contextlib.suppress(Exception):
            await _end_body_writers(self._http)
        with contextlib.suppress(Exception):
            await self._http.close()

    async def _drain(self) -> None:
        while await self.receive() is not None:
            pass


async def _end_body_writers(http: Any, limit_s: float = 0.25) -> None:
    """End the request-body writer tasks of ``http``'s streams (awscrt's
    ``AIOHttp2ClientStream._set_request_body_generator``), ``limit_s`` at most.

    Nobody awaits them. Once the service has ended a stream (or refused it with an HTTP
    error), a writer either fails with AWS_ERROR_HTTP_STREAM_HAS_COMPLETED ("Task exception
    was never retrieved" at shutdown) or waits forever for input that never comes; the
    event loop holds tasks only weakly, so once the stream is released such a task is
    garbage-collected half-run and Python prints "Exception ignored in: <coroutine object
    ..._set_request_body_generator>" with a traceback. Cancelled here it ends now (its
    ``finally`` tries the end-of-stream write, which fails quietly: the error is retrieved).
    The stream's end itself is reported through ``receive()``."""
    tasks = [w for st in getattr(http, "crt_streams", ()) if (w := getattr(st, "_writer", None))]
    for t in tasks:
        t.add_done_callback(lambda t: t.cancelled() or t.exception())
        t.cancel()
    pending = [t for t in tasks if not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=limit_s)


async def open_stream(settings: BedrockSettings) -> SonicStream:
    """Open a stream and wait until the service is ready to receive events.

    Raises :class:`SonicStreamError` (classified) on failure, within ``open_timeout_s``.
    """
    from aws_sdk_bedrock_runtime.client import AsyncBedrockRuntimeClient
    from aws_sdk_bedrock_runtime.config import AsyncBedrockRuntimeConfig
    from aws_sdk_bedrock_runtime.models import InvokeModelWithBidirectionalStreamOperationInput

    from sonic_voice.sonic import sdk_hooks

    http = _make_http_client(settings)
    overrides: dict[str, Any] = {"region": settings.region, "transport": http}
    # Input events serialized and signed with less CPU, the same bytes (sdk_hooks.py).
    overrides.update(sdk_hooks.config_overrides())
    if settings.endpoint_uri:
        overrides["endpoint_uri"] = settings.endpoint_uri
    if settings.access_key_id and settings.secret_access_key:
        from smithy_aws_core.identity import AWSCredentialsIdentity
        from smithy_aws_core.identity.static import StaticCredentialsResolver

        overrides["aws_credentials_identity_resolver"] = StaticCredentialsResolver(
            AWSCredentialsIdentity(
                access_key_id=settings.access_key_id,
                secret_access_key=settings.secret_access_key,
                session_token=settings.session_token,
            )
        )
    else:
        overrides["aws_credentials_identity_resolver"] = _resolver(settings.profile)
    try:
        config = await AsyncBedrockRuntimeConfig.resolve(**overrides)
        client = AsyncBedrockRuntimeClient(config=config)
        duplex = await asyncio.wait_for(
            client.invoke_model_with_bidirectional_stream(
                InvokeModelWithBidirectionalStreamOperationInput(model_id=settings.model_id)
            ),
            settings.open_timeout_s,
        )
        stream = SonicStream(duplex, client, http)
        ready = asyncio.ensure_future(stream._ready(settings.open_timeout_s))
        await asyncio.wait({ready, http.failure}, return_when=asyncio.FIRST_COMPLETED)
        if not ready.done():
            ready.cancel()
            http.failure.result()  # raises the connection failure
        ready.result()
    except asyncio.CancelledError:
        with contextlib.suppress(Exception):
            await _end_body_writers(http)
            await http.close()
        raise
    except BaseException as exc:
        with contextlib.suppress(Exception):
            await _end_body_writers(http)
            await http.close()
        if isinstance(exc, TimeoutError):
            raise SonicStreamError(
                "timeout",
                True,
                f"no answer from {settings.endpoint_uri or 'Bedrock'} within "
                f"{settings.open_timeout_s:.0f} s (TLS, proxy or network problem?)",
            ) from exc
        raise classify_error(exc) from exc
    return stream


_RESOLVERS: dict[str | None, BotocoreCredentialsResolver] = {}


def _resolver(profile: str | None) -> BotocoreCredentialsResolver:
    # One per profile: botocore keeps refreshable credentials and refreshes them itself.
    if profile not in _RESOLVERS:
        _RESOLVERS[profile] = BotocoreCredentialsResolver(profile)
    return _RESOLVERS[profile]
