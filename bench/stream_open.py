"""Opening a Nova Sonic stream: how long ``open_stream`` takes against the Bedrock stand-in
(real SDK, awscrt HTTP/2 + TLS, SigV4), and how much of it is building the HTTP client.

A stream opens when a visitor engages and at every rotation, so its cost is on the path
from a person's first word to the robot's first answer. The product's client shares one
TLS context per trust store and one awscrt event loop across the process's streams
(sonic_voice/sonic/transport.py); building them per stream cost ~45 ms of a ~70 ms open
(shared/findings.md). The stand-in runs in this process (the open's handshake is on the
loopback, so the figure is the robot's own cost plus the stand-in's).

    python bench/stream_open.py [--opens 40] [--load both|off|on]

Goals (set here: the client build should not show, the open stays well under one 32 ms
mic frame plus a loopback TLS handshake): client build p99 <= 1 ms, open p50 <= 40 ms.
"""

from __future__ import annotations

import argparse
import asyncio
import time

from _common import Figures, add_load_option, isolate, pct, phase, phases, setup_path


async def measure(n: int) -> tuple[list[float], list[float]]:
    from sonic_voice.emulators.sonic import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, EmulatorThread
    from sonic_voice.sonic import transport
    from sonic_voice.sonic.transport import BedrockSettings, open_stream

    emu = EmulatorThread(scenario={"turns": []}, realtime=False).start()
    settings = BedrockSettings(
        endpoint_uri=emu.endpoint_uri,
        ca_bundle=emu.ca_file,
        access_key_id=DEFAULT_ACCESS_KEY,
        secret_access_key=DEFAULT_SECRET_KEY,
    )
    opens, builds = [], []
    try:
        for i in range(n + 1):
            t0 = time.perf_counter()
            transport._make_http_client(settings)
            t1 = time.perf_counter()
            stream = await open_stream(settings)
            t2 = time.perf_counter()
            await stream.close()
            if i:  # the first one builds what the others share
                builds.append((t1 - t0) * 1000)
                opens.append((t2 - t1) * 1000)
    finally:
        emu.stop()
    return opens, builds


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--opens", type=int, default=40, help="streams opened per phase")
    add_load_option(ap)
    args = ap.parse_args()
    setup_path()
    figs = Figures()
    for name in phases(args.load):
        with phase(name) as info:
            opens, builds = asyncio.run(measure(args.opens))
        figs.phases.append(info)
        figs.add(name, "stream_open_p50", pct(opens, 50), "ms", "<= 40 ms")
        figs.add(name, "stream_open_p99", pct(opens, 99), "ms")
        figs.add(name, "http_client_build_p50", pct(builds, 50), "ms")
        figs.add(name, "http_client_build_p99", pct(builds, 99), "ms", "<= 1 ms")
    print(f"stream_open: {args.opens} streams opened and closed one after another per phase")
    figs.print()


if __name__ == "__main__":
    isolate()
    main()
