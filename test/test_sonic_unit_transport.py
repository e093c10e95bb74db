"""The product transport's HTTP client (sonic_voice/sonic/transport.py): every stream of
the process shares one TLS context per trust store and one awscrt event loop, instead of
building them per stream (~45 ms of a ~70 ms open); its constructor mirrors the SDK's."""

from __future__ import annotations

import concurrent.futures

import pytest
from smithy_http.aio.crt import AWSCRTHTTPClient, AWSCRTHTTPClientConfig

from sonic_voice.emulators.sonic import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, EmulatorThread
from sonic_voice.sonic import transport
from sonic_voice.sonic.transport import BedrockSettings, SonicStreamError, open_stream

pytestmark = pytest.mark.timeout(60)


def test_the_client_sets_what_the_sdk_constructor_sets() -> None:
    """_Client replaces AWSCRTHTTPClient.__init__; an SDK that sets other attributes
    needs the replacement updated (this fails first)."""
    sdk = AWSCRTHTTPClient(client_config=AWSCRTHTTPClientConfig(force_http_2=True))
    assert set(vars(sdk)) == transport.SDK_CLIENT_ATTRS


async def test_streams_share_tls_contexts_and_the_event_loop() -> None:
    a = transport._make_http_client(BedrockSettings())
    b = transport._make_http_client(BedrockSettings())
    assert set(transport.SDK_CLIENT_ATTRS) <= set(vars(a))
    assert a._tls_ctx is b._tls_ctx
    assert a._client_bootstrap is b._client_bootstrap
    assert a._connections is not b._connections and a.failure is not b.failure
    emu = EmulatorThread(scenario={"turns": []}, realtime=False).start()
    try:
        c = transport._make_http_client(BedrockSettings(ca_bundle=emu.ca_file))
        assert c._tls_ctx is not a._tls_ctx  # its own trust store
        assert transport._make_http_client(BedrockSettings(ca_bundle=emu.ca_file))._tls_ctx is (
            c._tls_ctx
        )
    finally:
        emu.stop()


async def test_shared_contexts_still_verify_each_endpoint() -> None:
    """Two stand-ins with different private CAs: a stream to each opens with its own CA
    file, and the first one's CA does not verify the second (the cache is per trust store,
    not one context for all)."""
    one = EmulatorThread(scenario={"turns": []}, realtime=False).start()
    two = EmulatorThread(scenario={"turns": []}, realtime=False).start()
    keys = {"access_key_id": DEFAULT_ACCESS_KEY, "secret_access_key": DEFAULT_SECRET_KEY}
    try:
        assert one.ca_file != two.ca_file  # each stand-in makes its own CA
        for emu in (one, two, one):
            s = await open_stream(
                BedrockSettings(endpoint_uri=emu.endpoint_uri, ca_bundle=emu.ca_file, **keys)
            )
            await s.close()
        with pytest.raises(SonicStreamError):
            await open_stream(
                BedrockSettings(
                    endpoint_uri=two.endpoint_uri, ca_bundle=one.ca_file, open_timeout_s=5, **keys
                )
            )
    finally:
        one.stop()
        two.stop()


def test_a_connect_given_up_is_not_an_error_in_awscrts_thread() -> None:
    """awscrt sets a connection attempt's outcome on its future without asking whether the
    waiter gave up: on a cancelled future that raised InvalidStateError in awscrt's thread
    ("Exception ignored ..." in every full run once an open was abandoned mid-connect).
    Called as awscrt's thread calls it, with a failure and with the future cancelled."""
    from awscrt import http as crt_http

    assert transport.guard_cancelled_connects()  # the hook point is still there
    given_up: concurrent.futures.Future = concurrent.futures.Future()
    given_up.cancel()
    core = crt_http._HttpClientConnectionCore(
        host_name="127.0.0.1", port=1, connect_future=given_up
    )
    core._on_connection_setup(None, 1049, crt_http.HttpVersion.Unknown)  # raised before
    assert given_up.cancelled()
    # a waiter still there gets the failure, as before
    waiting: concurrent.futures.Future = concurrent.futures.Future()
    core = crt_http._HttpClientConnectionCore(host_name="127.0.0.1", port=1, connect_future=waiting)
    core._on_connection_setup(None, 1049, crt_http.HttpVersion.Unknown)
    assert waiting.exception() is not None
