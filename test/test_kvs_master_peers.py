"""KvsMaster's peer handling that bench/mutation.py found untested (issue 16): a viewer
that offers again (a browser reload keeps its client id) gets a fresh peer, and the old
one is closed, not leaked. Against the KVS stand-in with a real KvsMaster, boto3,
botocore presigning, websockets and aiortc viewers on loopback (~2 s).
"""

from __future__ import annotations

import asyncio

import pytest

from sonic_voice.emulators.kvs import KvsEmulator
from sonic_voice.kvs.master import KvsMaster

from test.harness.viewer import TEST_SECRET, Viewer
from test.test_kvs_signaling import CHANNEL, master_settings

pytestmark = pytest.mark.timeout(90)

REPLACED = "replaced by a new offer from the same viewer"


@pytest.fixture
async def emu():
    e = KvsEmulator(channels=[CHANNEL], verify_secret=TEST_SECRET)
    await e.start()
    yield e
    await e.stop()


async def test_a_second_offer_from_a_viewer_closes_its_old_peer(emu: KvsEmulator) -> None:
    """Kills the deletion of ``await old.close(...)`` in ``_answer_offer``: the old peer
    would stay open beside the new one (its ICE, DTLS and audio tasks leaked, its viewer
    count gone), and nobody would ever close it."""
    master = KvsMaster(master_settings(emu))
    await master.start()
    first = second = None
    try:
        assert await master.wait_connected(10)
        first = await Viewer(emu.endpoint_url, CHANNEL, "visitor").join(timeout=20)
        assert await master.wait_viewers(1)
        old = master.peers["visitor"]
        # The same client id offers again (a reload): the stand-in replaces its socket.
        second = await Viewer(emu.endpoint_url, CHANNEL, "visitor").join(timeout=20)
        new = master.peers["visitor"]
        assert new is not old
        await asyncio.wait_for(new.connected.wait(), 10)
        assert old.closed.is_set(), "the old peer was left open"
        assert old.close_reason == REPLACED
        assert old.pc.connectionState == "closed"
        assert not [t for t in old.tasks if not t.done()], "the old peer's tasks still run"
        assert ("visitor", REPLACED) in master.closed_peers
        assert list(master.peers) == ["visitor"] and master.viewer_count == 1
    finally:
        for v in (first, second):
            if v is not None:
                await v.close()
        await master.stop()
