"""SigV4 checks the way the service does them: the HTTP request, then every event frame.

The request signature is recomputed with botocore's own SigV4 signer (canonical request,
string to sign, signing key) from the headers the client listed in ``SignedHeaders``; it
then seeds the event chain (shared/reference/bedrock-sdk-notes.md, "Chunk signature"):

    HMAC(signing key, "AWS4-HMAC-SHA256-PAYLOAD\\n<ts>\\n<scope>\\n<prev sig hex>\\n"
                      "<sha256(encoded :date header)>\\n<sha256(inner frame)>")
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import re
from dataclasses import dataclass

from botocore.auth import SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials
from smithy_aws_event_stream.events import EventHeaderEncoder

SERVICE = "bedrock"
_AUTH_RE = re.compile(
    r"^AWS4-HMAC-SHA256\s+Credential=(?P<cred>[^,\s]+),\s*SignedHeaders=(?P<sh>[^,\s]+),"
    r"\s*Signature=(?P<sig>[0-9a-f]{64})$"
)


class AuthError(Exception):
    """A request the service would refuse: ``error_type`` goes in ``x-amzn-ErrorType``."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


@dataclass(frozen=True)
class RequestAuth:
    """What a verified request fixes for its event stream's signature chain."""

    access_key: str
    date: str  # YYYYMMDD
    region: str
    signature: str  # hex: the seed of the chain


def _signing_key(secret: str, date: str, region: str) -> bytes:
    k = hmac.new(b"AWS4" + secret.encode(), date.encode(), hashlib.sha256).digest()
    k = hmac.new(k, region.encode(), hashlib.sha256).digest()
    k = hmac.new(k, SERVICE.encode(), hashlib.sha256).digest()
    return hmac.new(k, b"aws4_request", hashlib.sha256).digest()


def verify_request(
    method: str,
    path: str,
    headers: dict[str, str],
    access_key: str,
    secret_key: str,
    region: str,
) -> RequestAuth:
    """Recompute the request's SigV4 signature with botocore; raise :class:`AuthError`.

    ``headers`` are lower-case names; ``host`` is the ``:authority`` pseudo-header.
    Error types and messages match what Bedrock returns (403 InvalidSignatureException,
    UnrecognizedClientException, MissingAuthenticationTokenException ...).
    """
    auth = headers.get("authorization", "")
    if not auth:
        raise AuthError(
            403,
            "MissingAuthenticationTokenException",
            "Missing Authentication Token",
        )
    m = _AUTH_RE.match(auth.strip())
    if not m:
        raise AuthError(
            400,
            "IncompleteSignatureException",
            f"Authorization header requires 'Credential', 'SignedHeaders' and 'Signature' "
            f"parameters. Authorization={auth[:60]}",
        )
    parts = m["cred"].split("/")
    if len(parts) != 5 or parts[4] != "aws4_request":
        raise AuthError(403, "IncompleteSignatureException", f"Bad credential: {m['cred']}")
    akid, date, req_region, service, _ = parts
    if akid != access_key:
        raise AuthError(
            403,
            "UnrecognizedClientException",
            "The security token included in the request is invalid.",
        )
    if service != SERVICE:
        raise AuthError(
            403,
            "InvalidSignatureException",
            f"Credential should be scoped to correct service: '{SERVICE}'.",
        )
    if req_region != region:
        raise AuthError(
            403,
            "InvalidSignatureException",
            f"Credential should be scoped to a valid region, not '{req_region}'. ",
        )
    amz_date = headers.get("x-amz-date", "")
    if not amz_date.startswith(date):
        raise AuthError(
            403,
            "InvalidSignatureException",
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date "
            "from HTTP.",
        )
    try:
        when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(tzinfo=datetime.UTC)
    except ValueError as e:
        raise AuthError(403, "InvalidSignatureException", f"Bad X-Amz-Date {amz_date!r}") from e
    skew = abs((datetime.datetime.now(datetime.UTC) - when).total_seconds())
    if skew > 300:
        raise AuthError(
            403,
            "InvalidSignatureException",
            f"Signature expired: {amz_date} is now earlier/later than the allowed 5 minutes.",
        )

    signed = m["sh"].split(";")
    missing = [h for h in signed if h not in headers]
    if missing:
        raise AuthError(403, "InvalidSignatureException", f"Signed header(s) missing: {missing}")
    request = AWSRequest(
        method=method,
        url=f"https://{headers['host']}{path}",
        headers={h: headers[h] for h in signed},
    )
    request.context["timestamp"] = amz_date
    signer = SigV4Auth(Credentials(access_key, secret_key), SERVICE, region)
    canonical = signer.canonical_request(request)
    expected = signer.signature(signer.string_to_sign(request, canonical), request)
    if not hmac.compare_digest(expected, m["sig"]):
        raise AuthError(
            403,
            "InvalidSignatureException",
            "The request signature we calculated does not match the signature you provided. "
            "Check your AWS Secret Access Key and signing method. Consult the service "
            "documentation for details.",
        )
    return RequestAuth(akid, date, region, m["sig"])


class ChunkChain:
    """Verifies each signed envelope's ``:chunk-signature`` against the running chain."""

    def __init__(self, auth: RequestAuth, secret_key: str) -> None:
        self._prev = auth.signature
        self._region = auth.region
        self._secret = secret_key
        self._keys: dict[str, bytes] = {}
        self.verified = 0

    def verify(self, date: datetime.datetime, signature: bytes, payload: bytes) -> bool:
        """Check one envelope (``:date`` header value, signature bytes, inner frame bytes)."""
        ts = date.astimezone(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
        day = ts[:8]
        key = self._keys.get(day)
        if key is None:
            key = self._keys[day] = _signing_key(self._secret, day, self._region)
        enc = EventHeaderEncoder()
        enc.encode_headers({":date": date})
        string_to_sign = "\n".join(
            (
                "AWS4-HMAC-SHA256-PAYLOAD",
                ts,
                f"{day}/{self._region}/{SERVICE}/aws4_request",
                self._prev,
                hashlib.sha256(enc.get_result()).hexdigest(),
                hashlib.sha256(payload).hexdigest(),
            )
        )
        expected = hmac.new(key, string_to_sign.encode(), hashlib.sha256).digest()
        if not hmac.compare_digest(expected, signature):
            return False
        self._prev = expected.hex()
        self.verified += 1
        return True
