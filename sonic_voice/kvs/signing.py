"""SigV4 query presigning of the signaling WebSocket URL, by botocore (never hand-rolled).

KVS wants: GET, service ``kinesisvideo``, ``X-Amz-Expires`` 299, only ``host`` signed, the
empty-payload hash, and ``X-Amz-Security-Token`` inside the signed query. botocore's
``SigV4QueryAuth`` does exactly that. The master omits ``X-Amz-ClientId``; viewers need it.
"""

from __future__ import annotations

from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import ReadOnlyCredentials

SERVICE = "kinesisvideo"


def presign_wss_url(
    endpoint: str,
    channel_arn: str,
    credentials: ReadOnlyCredentials,
    region: str,
    client_id: str | None = None,
    expires: int = 299,
) -> str:
    """The presigned URL to open; build a fresh one for every connection attempt."""
    if "?" in endpoint:
        raise ValueError(f"signaling endpoint must have no query string: {endpoint}")
    params = {"X-Amz-ChannelARN": channel_arn}
    if client_id is not None:
        params["X-Amz-ClientId"] = client_id
    request = AWSRequest(method="GET", url=endpoint, params=params)
    SigV4QueryAuth(credentials, SERVICE, region, expires).add_auth(request)
    return request.prepare().url
