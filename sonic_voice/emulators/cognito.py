"""A local stand-in for the Amazon Cognito Identity API, guest (unauthenticated) flow only.

Speaks the real wire protocol (AWS JSON 1.1: ``POST /`` with
``X-Amz-Target: AWSCognitoIdentityService.<Operation>``, errors as ``{"__type", "message"}``
with status 400), so boto3's ``cognito-identity`` client and the web page's ``fetch`` both
talk to it. Two operations, as the page and the AWS SDKs' "basic (classic)" guest flow use
them:

- ``GetId`` {IdentityPoolId} -> {IdentityId}: a new identity in the pool; refused
  (``NotAuthorizedException``) when the pool does not allow unauthenticated identities;
- ``GetCredentialsForIdentity`` {IdentityId} -> {IdentityId, Credentials{AccessKeyId,
  SecretKey, SessionToken, Expiration (epoch seconds)}}.

Both are unsigned on the real service for guests. The credentials it hands out carry
``secret_key`` as their SecretKey, so the KVS stand-in started with the same
``verify_secret`` checks the guest's SigV4 signatures for real.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

log = logging.getLogger(__name__)

POOL_RE = re.compile(r"^[\w-]+:[0-9a-f-]+$")
TARGET_PREFIX = "AWSCognitoIdentityService."


class _ApiError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class Pool:
    pool_id: str
    allow_unauthenticated: bool = True
    identities: set[str] = field(default_factory=set)


class CognitoEmulator:
    """``await CognitoEmulator(pools={"us-west-2:<uuid>": True}).start()``; ``endpoint_url``.

    ``pools``: pool id -> whether it allows unauthenticated (guest) identities.
    ``credential_ttl_s``: lifetime of the credentials (the service gives one hour).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        pools: dict[str, bool] | None = None,
        secret_key: str = "cognito-guest-secret",
        credential_ttl_s: int = 3600,
    ) -> None:
        self.host = host
        self.port = port
        self.secret_key = secret_key
        self.credential_ttl_s = credential_ttl_s
        self.pools = {p: Pool(p, allow) for p, allow in (pools or {}).items()}
        for p in self.pools:
            if not POOL_RE.match(p):
                raise ValueError(f"pool id {p!r} is not REGION:UUID")
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.issued: list[tuple[str, str]] = []  # (identity id, access key id)
        self._runner: web.AppRunner | None = None

    async def start(self) -> CognitoEmulator:
        app = web.Application(middlewares=[self._cors])
        app.router.add_route("OPTIONS", "/{tail:.*}", self._preflight)
        app.router.add_post("/", self._handle)
        self._runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("Cognito Identity stand-in on %s", self.endpoint_url)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> CognitoEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def endpoint_url(self) -> str:
        return f"http://{self.host}:{self.port}/"

    # -- HTTP ---------------------------------------------------------------------------
    @web.middleware
    async def _cors(self, request: web.Request, handler: Any) -> web.StreamResponse:
        resp = await handler(request)
        resp.headers["Access-Control-Allow-Origin"] = "*"
        resp.headers["Access-Control-Expose-Headers"] = "x-amzn-RequestId, x-amzn-ErrorType"
        return resp

    async def _preflight(self, request: web.Request) -> web.Response:
        wanted = request.headers.get("Access-Control-Request-Headers", "*")
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": "POST, OPTIONS",
                "Access-Control-Allow-Headers": wanted,
                "Access-Control-Max-Age": "600",
            },
        )

    async def _handle(self, request: web.Request) -> web.Response:
        request_id = str(uuid.uuid4())
        target = request.headers.get("X-Amz-Target", "")
        try:
            if not target.startswith(TARGET_PREFIX):
                raise _ApiError("UnknownOperationException", f"bad X-Amz-Target {target!r}")
            op = target[len(TARGET_PREFIX) :]
            try:
                body = json.loads(await request.text() or "{}")
            except ValueError as e:
                raise _ApiError("SerializationException", f"body is not JSON: {e}") from e
            if not isinstance(body, dict):
                raise _ApiError("SerializationException", "body must be a JSON object")
            self.calls.append((op, body))
            fn = {
                "GetId": self._get_id,
                "GetCredentialsForIdentity": self._get_credentials,
            }.get(op)
            if fn is None:
                raise _ApiError("UnknownOperationException", f"{op} is not supported here")
            result = fn(body)
        except _ApiError as e:
            return web.json_response(
                {"__type": e.code, "message": e.message},
                status=400,
                headers={"x-amzn-RequestId": request_id, "x-amzn-ErrorType": e.code},
                content_type="application/x-amz-json-1.1",
            )
        return web.json_response(
            result,
            headers={"x-amzn-RequestId": request_id},
            content_type="application/x-amz-json-1.1",
        )

    # -- operations ---------------------------------------------------------------------
    def _get_id(self, body: dict[str, Any]) -> dict[str, Any]:
        pool_id = body.get("IdentityPoolId")
        if not isinstance(pool_id, str) or not POOL_RE.match(pool_id):
            raise _ApiError("InvalidParameterException", f"bad IdentityPoolId {pool_id!r}")
        pool = self.pools.get(pool_id)
        if pool is None:
            raise _ApiError("ResourceNotFoundException", f"IdentityPool '{pool_id}' not found.")
        if body.get("Logins"):
            raise _ApiError("NotAuthorizedException", "this stand-in serves guests only")
        if not pool.allow_unauthenticated:
            raise _ApiError(
                "NotAuthorizedException",
                "Unauthenticated access is not supported for this identity pool.",
            )
        identity = f"{pool_id.split(':')[0]}:{uuid.uuid4()}"
        pool.identities.add(identity)
        return {"IdentityId": identity}

    def _get_credentials(self, body: dict[str, Any]) -> dict[str, Any]:
        identity = body.get("IdentityId")
        pool = next((p for p in self.pools.values() if identity in p.identities), None)
        if pool is None:
            raise _ApiError("ResourceNotFoundException", f"Identity '{identity}' not found.")
        if body.get("Logins"):
            raise _ApiError("NotAuthorizedException", "this stand-in serves guests only")
        key = "ASIA" + secrets.token_hex(8).upper()
        self.issued.append((identity, key))
        return {
            "IdentityId": identity,
            "Credentials": {
                "AccessKeyId": key,
                "SecretKey": self.secret_key,
                "SessionToken": secrets.token_urlsafe(96),
                "Expiration": int(time.time()) + self.credential_ttl_s,
            },
        }
