"""The failures the stand-in can produce on demand, shaped like the service's.

Three families (shared/reference/nova-sonic-protocol.md §10, §13):

- in-stream exception frames (``:message-type=exception``) that ``receive()`` raises, after
  which the stand-in ends the response stream;
- HTTP errors before the stream (restJson1: status, ``x-amzn-ErrorType``, ``{"message"}``)
  that ``await_output()`` raises;
- transport failures: an HTTP/2 RST_STREAM on the stream, or the TCP connection dropped.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

TIMEOUT_MESSAGE = "Model has timed out in processing the request. Try your request again."

# name -> (:exception-type, default message)
STREAM_FAULTS: dict[str, tuple[str, str]] = {
    "validationException": (
        "validationException",
        "Invalid input request, please fix your input and try again.",
    ),
    "modelTimeoutException": ("modelTimeoutException", TIMEOUT_MESSAGE),
    "modelStreamErrorException": (
        "modelStreamErrorException",
        "The model stream encountered an error. Try your request again.",
    ),
    "internalServerException": (
        "internalServerException",
        "The system encountered an unexpected error during processing. Try your request again.",
    ),
    "serviceUnavailableException": (
        "serviceUnavailableException",
        "The service is unavailable. Try again later.",
    ),
    "throttlingException": (
        "throttlingException",
        "Too many requests, please wait before trying again.",
    ),
    "systemInstability": (
        "validationException",
        "System instability detected. Please retry your request.",
    ),
    "timeLimit": ("modelTimeoutException", TIMEOUT_MESSAGE),
    "silenceTimeout": (
        "validationException",
        "InternalErrorCode=531::RST_STREAM closed stream. HTTP/2 error code: NO_ERROR",
    ),
}

# name -> (status, x-amzn-ErrorType, message)
HTTP_FAULTS: dict[str, tuple[int, str, str]] = {
    "accessDenied": (
        403,
        "AccessDeniedException",
        "You don't have access to the model with the specified model ID.",
    ),
    "unknownModel": (400, "ValidationException", "The provided model identifier is invalid."),
    "resourceNotFound": (
        404,
        "ResourceNotFoundException",
        "Could not resolve the foundation model from the provided model identifier.",
    ),
    "httpThrottling": (
        429,
        "ThrottlingException",
        "Too many requests, please wait before trying again.",
    ),
    "modelNotReadyException": (
        429,
        "ModelNotReadyException",
        "Model is not ready to serve inference requests. Try again later.",
    ),
    "serviceQuotaExceeded": (
        400,
        "ServiceQuotaExceededException",
        "Your request exceeds the service quota for your account.",
    ),
    "httpInternalServer": (
        500,
        "InternalServerException",
        "The system encountered an unexpected error during processing. Try your request again.",
    ),
    "httpServiceUnavailable": (
        503,
        "ServiceUnavailableException",
        "The service is unavailable. Try again later.",
    ),
}

TRANSPORT_FAULTS = ("reset", "drop")

ALL_FAULTS = (*STREAM_FAULTS, *HTTP_FAULTS, *TRANSPORT_FAULTS)
WHEN = ("now", "next_turn", "next_stream", "every_stream")


@dataclass
class Fault:
    """One failure to produce.

    ``kind``: a key of STREAM_FAULTS, HTTP_FAULTS or ``reset`` / ``drop``.
    ``when``: ``now`` (active streams; if none, the next stream once it starts),
    ``next_turn`` (instead of the next scenario turn's reply), ``next_stream``,
    ``every_stream`` (each stream opened from now on, until ``clear_faults()``).
    ``after_frames``: fire once the stream has received that many audioInput events
    (instead of on a timer), e.g. every new stream failing after 3 frames (issue 11).
    HTTP faults always apply to the next ``count`` requests. ``after_s`` delays it;
    ``stream`` limits it to one stream index; ``message`` overrides the text;
    ``error_code`` is the RST_STREAM code (default 2, INTERNAL_ERROR).
    """

    kind: str
    message: str | None = None
    when: str = "now"
    after_s: float = 0.0
    count: int = 1
    stream: int | None = None
    error_code: int = 2
    after_frames: int | None = None

    def __post_init__(self) -> None:
        if self.kind not in ALL_FAULTS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {', '.join(ALL_FAULTS)}")
        if self.when not in WHEN:
            raise ValueError(f"fault 'when' must be one of {', '.join(WHEN)}, not {self.when!r}")
        if self.after_frames is not None and (
            self.after_frames < 0 or self.is_http or self.when == "next_turn"
        ):
            raise ValueError(
                "after_frames (>= 0) applies to stream faults, not HTTP or next_turn ones"
            )
        if self.count < 1:
            raise ValueError("fault count must be >= 1")

    @property
    def is_http(self) -> bool:
        return self.kind in HTTP_FAULTS

    @classmethod
    def coerce(cls, value: str | dict[str, Any] | Fault) -> Fault:
        if isinstance(value, Fault):
            return value
        if isinstance(value, str):
            return cls(value)
        if isinstance(value, dict):
            unknown = set(value) - {
                "kind",
                "message",
                "when",
                "after_s",
                "at_s",
                "count",
                "stream",
                "error_code",
                "after_frames",
            }
            if unknown:
                raise ValueError(f"unknown fault keys {sorted(unknown)}")
            v = dict(value)
            if "at_s" in v:
                v["after_s"] = v.pop("at_s")
            return cls(**v)
        raise TypeError(f"a fault is a kind string, a dict or a Fault, not {type(value).__name__}")
