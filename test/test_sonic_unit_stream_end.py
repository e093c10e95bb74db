"""The product transport when the service ends a stream first (a modeled exception, the
connection time limit): closing it leaves no request-body writer of awscrt behind, so
nothing is collected half-run later (a traceback "Exception ignored in: <coroutine object
AIOHttp2ClientStream._set_request_body_generator>" on stderr, twice per full test run
before). Real SDK, real HTTP/2 to the Bedrock stand-in."""

from __future__ import annotations

import asyncio
import gc
import sys
from typing import Any

import pytest

from sonic_voice.emulators.sonic.server import SonicEmulator
from sonic_voice.sonic import events as E
from sonic_voice.sonic import transport

pytestmark = pytest.mark.timeout(60)


def _writers() -> list[asyncio.Task]:
    return [
        t
        for t in asyncio.all_tasks()
        if t.get_coro().__qualname__.endswith("_set_request_body_generator")
    ]


@pytest.mark.parametrize("write_after_end", [False, True])
async def test_a_stream_the_service_ended_leaves_no_writer_behind(write_after_end: bool) -> None:
    caught: list[Any] = []
    hook = sys.unraisablehook
    sys.unraisablehook = caught.append
    emu = SonicEmulator({"turns": []}, realtime=False)
    await emu.start()
    try:
        st = await transport.open_stream(
            transport.BedrockSettings(
                region=emu.region,
                endpoint_uri=emu.endpoint_uri,
                ca_bundle=emu.ca_file,
                access_key_id=emu.access_key,
                secret_access_key=emu.secret_key,
                open_timeout_s=10,
            )
        )
        for ev in (E.session_start(), E.prompt_start("p", "tiffany")):
            await st.send(ev)
        assert len(_writers()) == 1
        emu.inject("modelStreamErrorException")  # the service ends the stream
        with pytest.raises(Exception, match="model stream encountered an error"):
            while await st.receive() is not None:
                pass
        if write_after_end:  # what a session does before it learns of the end
            await st.send(E.audio_content_start("p", "audio"))
        await st.close()
        left = _writers()
        del st
        gc.collect()
        await asyncio.sleep(0)
        gc.collect()
        assert [t for t in left if not t.done()] == []
        assert [repr(u.object) for u in caught] == []
    finally:
        sys.unraisablehook = hook
        await emu.stop()


@pytest.mark.parametrize("fault", ["httpThrottling", "accessDenied"])
async def test_a_refused_stream_leaves_no_writer_behind(fault: str) -> None:
    """The service answers the request with an HTTP error: open_stream raises it, and the
    request-body writer of that attempt has ended (before: it waited forever, until the
    garbage collector closed it half-run)."""
    emu = SonicEmulator({"turns": []}, realtime=False)
    await emu.start()
    before = set(_writers())
    try:
        emu.inject(fault)
        with pytest.raises(transport.SonicStreamError):
            await transport.open_stream(
                transport.BedrockSettings(
                    region=emu.region,
                    endpoint_uri=emu.endpoint_uri,
                    ca_bundle=emu.ca_file,
                    access_key_id=emu.access_key,
                    secret_access_key=emu.secret_key,
                    open_timeout_s=10,
                )
            )
        mine = [t for t in _writers() if t not in before]
        assert [t for t in mine if not t.done()] == []
    finally:
        await emu.stop()
