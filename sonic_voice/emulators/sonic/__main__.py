"""``python -m sonic_voice.emulators.sonic``: run the Nova Sonic stand-in until Ctrl-C.

Prints the endpoint URI, the CA file and the settings a client needs (for example the
environment for ``AWS_ENDPOINT_URL_BEDROCK_RUNTIME``), then serves the scenario.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal

from sonic_voice.emulators.certs import make_certs
from sonic_voice.emulators.sonic.faults import ALL_FAULTS
from sonic_voice.emulators.sonic.server import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_REGION,
    DEFAULT_SECRET_KEY,
    DEFAULT_SESSION_LIMIT_S,
    SonicEmulator,
)


def _args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m sonic_voice.emulators.sonic", description=__doc__)
    p.add_argument("--scenario", help="scenario YAML (default config/scenarios/default.yaml)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0 = pick a free port")
    p.add_argument("--access-key", default=DEFAULT_ACCESS_KEY)
    p.add_argument("--secret-key", default=DEFAULT_SECRET_KEY)
    p.add_argument("--region", default=DEFAULT_REGION)
    p.add_argument(
        "--session-limit-s",
        type=float,
        default=DEFAULT_SESSION_LIMIT_S,
        help="connection time limit, as the service's 8 min (0 = none)",
    )
    p.add_argument("--speed", type=float, default=1.0, help="audio pacing (0 = unpaced)")
    p.add_argument("--fault-on-start", action="append", default=[], choices=ALL_FAULTS)
    p.add_argument(
        "--cert-dir",
        help="write the CA (ca.pem) and server certificate here, so a client can be told "
        "where the CA is before the stand-in starts (default: a fresh temp dir)",
    )
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


async def _serve(a: argparse.Namespace) -> None:
    emu = SonicEmulator(
        a.scenario,
        access_key=a.access_key,
        secret_key=a.secret_key,
        region=a.region,
        session_limit_s=a.session_limit_s,
        realtime=a.speed if a.speed > 0 else False,
        host=a.host,
        port=a.port,
        certs=make_certs(a.cert_dir) if a.cert_dir else None,
    )
    await emu.start()
    for f in a.fault_on_start:
        emu.inject(f)
    print(f"endpoint_uri: {emu.endpoint_uri}", flush=True)
    print(f"ca_file: {emu.ca_file}", flush=True)
    print(f"region: {emu.region}  access_key: {emu.access_key}  scenario: {emu.scenario.name}")
    print(
        f"env: AWS_ENDPOINT_URL_BEDROCK_RUNTIME={emu.endpoint_uri} AWS_REGION={emu.region} "
        f"AWS_ACCESS_KEY_ID={emu.access_key} AWS_SECRET_ACCESS_KEY={emu.secret_key}",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        await emu.stop()
        for r in emu.records:
            print(
                f"stream {r.index}: {r.model_id} status={r.http_status} "
                f"events={len(r.events)} audio_frames={r.audio_frames} "
                f"turns={r.turns_fired} end={r.end_reason}"
            )


def main(argv: list[str] | None = None) -> None:
    a = _args(argv)
    logging.basicConfig(
        level=logging.DEBUG if a.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        asyncio.run(_serve(a))
    except ValueError as e:  # bad scenario: say what and where, no traceback
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
