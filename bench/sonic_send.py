"""CPU per input event on the SDK's send path: the stock SDK beside sonic/sdk_hooks.py.

One ``audioInput`` event of a 32 ms microphone frame (512 samples: ~1.45 KB of JSON) as
``SonicStream.send`` hands it over: the model objects, ``input_stream.send`` (serialize,
identity, sign, frame) into a writer that keeps nothing. Both publishers are built as the
client builds them (the stock ``AWSEventPublisher`` with the stock ``AsyncEventSigner``;
``ChunkPublisher`` with ``CachedKeyEventSigner``), alternating in blocks so both see the
same machine. Two conditions:

- **warm**: events back to back (caches hot; the best case);
- **cold**: ~8 MB of other memory touched between events, as the rest of the stack does
  between two 32 ms frames (the running stack's figure was ~2.5x the warm one).

It also checks that both produce the same bytes on a fixed clock (else it exits 1).

    python bench/sonic_send.py [--events 3000]

Goal (set here): the hooks' cold p50 <= 150 us per event, i.e. <= 0.5 % of one core at 31
events a second (issue 10: ~20 % of one core for the whole stack), and a small share of
the uplink's 2.5 ms p99. Measured on the 2-core development machine (3000 events, other
developers' tests running, 2 runs): stock warm 183-184 / cold 423-425 us p50, hooks warm
33 / cold 134-141 us p50.
"""

from __future__ import annotations

import argparse
import asyncio
import time
import types

import numpy as np

from _common import figure, isolate, pct, setup_path


class Sink:
    """A writer that keeps only the last frame (the HTTP body in the client)."""

    last = b""

    async def write(self, data: bytes) -> None:
        self.last = data


def publishers() -> tuple[object, object, Sink, Sink]:
    from aws_sdk_signers import AsyncEventSigner
    from smithy_aws_core.identity import AWSCredentialsIdentity
    from smithy_aws_core.identity.static import StaticCredentialsResolver
    from smithy_aws_event_stream.aio import AWSEventPublisher, SigningConfig
    from smithy_aws_event_stream.events import EventHeaderEncoder
    from smithy_json import JSONCodec

    from sonic_voice.sonic import sdk_hooks

    identity = AWSCredentialsIdentity(access_key_id="AKIDBENCH", secret_access_key="s" * 40)

    def config(signer_cls: type) -> SigningConfig:
        return SigningConfig(
            signer=signer_cls(initial_signature=b"0" * 64, event_encoder_cls=EventHeaderEncoder),
            signing_properties={"region": "us-east-1", "service": "bedrock"},
            identity_resolver=StaticCredentialsResolver(identity),
            identity_properties={},
        )

    a, b = Sink(), Sink()
    stock = AWSEventPublisher(
        payload_codec=JSONCodec(), async_writer=a, signing_config=config(AsyncEventSigner)
    )
    hooks = sdk_hooks.ChunkPublisher(
        payload_codec=JSONCodec(),
        async_writer=b,
        signing_config=config(sdk_hooks.CachedKeyEventSigner),
    )
    return stock, hooks, a, b


async def same_bytes() -> bool:
    """Both publishers, one fixed clock, a few events: the same frames."""
    import datetime

    import aws_sdk_signers.signers as stock_signers

    from sonic_voice.sonic import events as ev
    from sonic_voice.sonic import sdk_hooks

    fixed = datetime.datetime(2026, 11, 30, 12, 0, 0, 123456, tzinfo=datetime.UTC)

    class Clock(datetime.datetime):
        @classmethod
        def now(cls, tz: object = None) -> datetime.datetime:  # type: ignore[override]
            return fixed

    module = types.SimpleNamespace(datetime=Clock, UTC=datetime.UTC)
    saved = stock_signers.datetime, sdk_hooks._utcnow
    stock_signers.datetime, sdk_hooks._utcnow = module, lambda: fixed  # type: ignore[assignment]
    try:
        stock, hooks, a, b = publishers()
        for i in range(5):
            event = ev.audio_input("p", "a", bytes([i]) * 1024)
            await stock.send(chunk(event))  # type: ignore[attr-defined]
            await hooks.send(chunk(event))  # type: ignore[attr-defined]
            if a.last != b.last:
                return False
        return True
    finally:
        stock_signers.datetime, sdk_hooks._utcnow = saved  # type: ignore[assignment]


def chunk(event: bytes) -> object:
    from aws_sdk_bedrock_runtime.models import (
        BidirectionalInputPayloadPart,
        InvokeModelWithBidirectionalStreamInputChunk,
    )

    return InvokeModelWithBidirectionalStreamInputChunk(
        value=BidirectionalInputPayloadPart(bytes_=event)
    )


async def measure(n: int, cold: bool) -> dict[str, list[float]]:
    from sonic_voice.sonic import events as ev

    stock, hooks, _, _ = publishers()
    rng = np.random.default_rng(1)
    frames = [rng.integers(-3000, 3000, 512, dtype=np.int16).tobytes() for _ in range(64)]
    other = np.ones(1 << 20)  # 8 MB: more than the L2 cache of the development machine
    out: dict[str, list[float]] = {"stock": [], "hooks": []}
    block = 100
    for start in range(0, n, block):
        for name, pub in (("stock", stock), ("hooks", hooks)):
            times = out[name]
            for i in range(start, min(n, start + block)):
                event = ev.audio_input("prompt-1", "audio-1", frames[i % len(frames)])
                if cold:
                    other += 1.0
                t0 = time.perf_counter_ns()
                await pub.send(chunk(event))  # type: ignore[attr-defined]
                times.append((time.perf_counter_ns() - t0) / 1e3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=3000, help="events per publisher and condition")
    args = ap.parse_args()
    isolate()
    setup_path()
    if not asyncio.run(same_bytes()):
        raise SystemExit("sonic_send: the hooks' frames differ from the SDK's")
    print(f"sonic_send: {args.events} audioInput events (32 ms, 512 samples) per publisher")
    print("same_bytes_as_sdk: yes")
    for cond in ("warm", "cold"):
        times = asyncio.run(measure(args.events, cond == "cold"))
        for name, values in times.items():
            goal = "<= 150 us" if (name, cond) == ("hooks", "cold") else ""
            figure(f"send_event_{cond}_{name}_p50", pct(values, 50), "us", goal)
            figure(f"send_event_{cond}_{name}_p99", pct(values, 99), "us")


if __name__ == "__main__":
    main()
