"""``python -m sonic_voice.emulators.kvs``: the KVS signaling stand-in as a process.

Prints one JSON line ``{"endpoint_url": ..., "ws_url": ..., "channels": {name: arn}, ...}``
on stdout once it listens (so a parent process or a browser test can read where it is), then
serves until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import signal
import sys

from sonic_voice.emulators.kvs.server import KvsEmulator


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sonic_voice.emulators.kvs", description=__doc__)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = any free port")
    p.add_argument("--region", default="us-west-2")
    p.add_argument(
        "--channel", action="append", default=[], help="channel to create at start (repeatable)"
    )
    p.add_argument("--max-viewers", type=int, default=10)
    p.add_argument(
        "--verify-secret", default=None, help="check WebSocket SigV4 signatures with this secret"
    )
    p.add_argument(
        "--tls",
        action="store_true",
        help="serve https/wss with a throwaway CA (sonic_voice.emulators.certs); the CA path is "
        "printed as ca_file",
    )
    p.add_argument("--cert-dir", default=None, help="where --tls writes its PEM files")
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> None:
    ssl_ctx = None
    info: dict = {}
    if args.tls:
        from sonic_voice.emulators.certs import make_certs

        bundle = make_certs(args.cert_dir)
        ssl_ctx = bundle.server_context()
        info["ca_file"] = str(bundle.ca_file)
    emu = KvsEmulator(
        args.host,
        args.port,
        region=args.region,
        channels=args.channel,
        max_viewers=args.max_viewers,
        verify_secret=args.verify_secret,
        ssl=ssl_ctx,
    )
    await emu.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    info.update(
        endpoint_url=emu.endpoint_url,
        ws_url=emu.ws_url,
        region=emu.region,
        channels={name: emu.channel_arn(name) for name in args.channel},
    )
    print(json.dumps(info), flush=True)
    try:
        await stop.wait()
    finally:
        await emu.stop()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    asyncio.run(serve(args))


if __name__ == "__main__":
    main()
