"""The Bedrock runtime stand-in: HTTPS + HTTP/2 on loopback, built on ``h2`` + asyncio.

Built on h2 directly (not hypercorn) so it can end or reset a response while the client
is still sending, as the service does (bedrock-sdk-notes.md, pitfall 3). Accepted sockets
get TCP_NODELAY so the stand-in adds no Nagle stalls of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import re
import socket
import ssl
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings

from sonic_voice.emulators.certs import CertBundle, make_certs
from sonic_voice.emulators.sonic import audio as synth
from sonic_voice.emulators.sonic.auth import AuthError, ChunkChain, verify_request
from sonic_voice.emulators.sonic.faults import HTTP_FAULTS, Fault
from sonic_voice.emulators.sonic.records import ErrorRecord, StreamRecord
from sonic_voice.emulators.sonic.scenario import Scenario
from sonic_voice.emulators.sonic.stream import StreamSession
from sonic_voice.sonic.events import NOVA_2_SONIC, NOVA_SONIC_V1

log = logging.getLogger(__name__)

DEFAULT_ACCESS_KEY = "AKIDSONICSTANDIN"
DEFAULT_SECRET_KEY = "sonic-standin-secret"
DEFAULT_REGION = "us-east-1"
DEFAULT_SESSION_LIMIT_S = 480.0
_PATH_RE = re.compile(r"^/model/(?P<model>[^/?]+)/invoke-with-bidirectional-stream(?:\?.*)?$")
_WINDOW = 1 << 24

AudioHook = Callable[[StreamRecord, bytes, int], None]


class _H2Conn:
    """One TLS connection speaking HTTP/2 as the server side."""

    def __init__(
        self, emu: SonicEmulator, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.emu = emu
        self.reader = reader
        self.writer = writer
        self.h2 = h2.connection.H2Connection(
            h2.config.H2Configuration(client_side=False, header_encoding="utf-8")
        )
        self.sessions: dict[int, StreamSession] = {}
        self._window_open = asyncio.Event()
        self.closed = False

    # -- output helpers (all synchronous h2 calls; flush hands the bytes to the transport)
    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.writer.write(data)

    async def send_data(self, sid: int, data: bytes, end_stream: bool = False) -> None:
        view = memoryview(data)
        while True:
            if self.closed:
                raise ConnectionError("connection closed")
            try:
                window = self.h2.local_flow_control_window(sid)
            except h2.exceptions.StreamClosedError:
                raise ConnectionError(f"stream {sid} closed") from None
            n = min(window, self.h2.max_outbound_frame_size, len(view))
            if n > 0 or not view:
                last = n == len(view)
                self.h2.send_data(sid, view[:n].tobytes(), end_stream=end_stream and last)
                self.flush()
                view = view[n:]
                if last:
                    return
                continue
            self._window_open.clear()
            await self._window_open.wait()

    def end_stream(self, sid: int) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.end_stream(sid)
            self.flush()

    def reset(self, sid: int, code: int) -> None:
        with contextlib.suppress(h2.exceptions.H2Error):
            self.h2.reset_stream(sid, error_code=code)
            self.flush()

    def abort(self) -> None:
        self.closed = True
        self.writer.transport.abort()

    def _respond_error(
        self, sid: int, status: int, error_type: str, message: str, rec: StreamRecord
    ) -> None:
        body = json.dumps({"message": message}).encode()
        self.h2.send_headers(
            sid,
            [
                (":status", str(status)),
                ("content-type", "application/json"),
                ("content-length", str(len(body))),
                ("x-amzn-requestid", str(uuid.uuid4())),
                (
                    "x-amzn-errortype",
                    f"{error_type}:http://internal.amazon.com/coral/com.amazon.bedrock/",
                ),
            ],
        )
        self.h2.send_data(sid, body, end_stream=True)
        self.flush()
        rec.http_status = status
        rec.end_reason = error_type
        rec.ended_ns = time.perf_counter_ns()
        rec.errors_sent.append(
            ErrorRecord("http", f"{error_type}: {message}", rec.ended_ns, status)
        )
        log.info("request %d -> %d %s: %s", rec.index, status, error_type, message)

    # -- input
    async def run(self) -> None:
        self.h2.initiate_connection()
        self.h2.update_settings(
            {
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: _WINDOW,
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: 128,
            }
        )
        self.h2.increment_flow_control_window(_WINDOW)
        self.flush()
        try:
            while not self.closed:
                data = await self.reader.read(65536)
                t_ns = time.perf_counter_ns()
                if not data:
                    break
                try:
                    events = self.h2.receive_data(data)
                except h2.exceptions.ProtocolError as e:
                    log.warning("HTTP/2 protocol error: %s", e)
                    self.flush()
                    break
                for ev in events:
                    self._handle(ev, t_ns)
                self.flush()
        except (ConnectionError, ssl.SSLError, OSError) as e:
            log.debug("connection ended: %s", e)
        finally:
            self.closed = True
            self._window_open.set()
            for s in list(self.sessions.values()):
                s.on_client_reset()
            with contextlib.suppress(Exception):
                self.writer.close()

    def _handle(self, ev: h2.events.Event, t_ns: int) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self._request(ev.stream_id, dict(ev.headers or []), t_ns)  # type: ignore[arg-type]
        elif isinstance(ev, h2.events.DataReceived):
            with contextlib.suppress(h2.exceptions.H2Error):
                self.h2.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
            s = self.sessions.get(ev.stream_id)
            if s is not None and ev.data:
                s.on_data(ev.data, t_ns)
        elif isinstance(ev, h2.events.StreamEnded):
            s = self.sessions.pop(ev.stream_id, None)
            if s is not None:
                s.on_input_end()
        elif isinstance(ev, h2.events.StreamReset):
            s = self.sessions.pop(ev.stream_id, None)
            if s is not None:
                s.on_client_reset()
            self._window_open.set()
        elif isinstance(ev, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
            self._window_open.set()
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self.closed = True
            self._window_open.set()

    def _request(self, sid: int, headers: dict[str, str], t_ns: int) -> None:
        emu = self.emu
        path = headers.get(":path", "")
        m = _PATH_RE.match(path)
        model_id = urllib.parse.unquote(m["model"]) if m else ""
        rec = StreamRecord(
            index=len(emu.records), stream_id=sid, model_id=model_id, path=path, started_ns=t_ns
        )
        emu.records.append(rec)
        emu._notify()
        if headers.get(":method") != "POST" or m is None:
            self._respond_error(
                sid, 404, "UnknownOperationException", "UnknownOperationException", rec
            )
            return
        hdrs = {k.lower(): v for k, v in headers.items() if not k.startswith(":")}
        hdrs["host"] = headers.get(":authority", "")
        try:
            auth = verify_request("POST", path, hdrs, emu.access_key, emu.secret_key, emu.region)
        except AuthError as e:
            self._respond_error(sid, e.status, e.error_type, e.message, rec)
            return
        rec.request_signature_ok = True
        fault = emu._take_http_fault()
        if fault is not None:
            status, etype, msg = HTTP_FAULTS[fault.kind]
            self._respond_error(sid, status, etype, fault.message or msg, rec)
            return
        if model_id not in emu.model_ids:
            self._respond_error(
                sid, 400, "ValidationException", "The provided model identifier is invalid.", rec
            )
            return
        if hdrs.get("x-amz-content-sha256") != "STREAMING-AWS4-HMAC-SHA256-EVENTS":
            self._respond_error(
                sid,
                400,
                "ValidationException",
                "x-amz-content-sha256 must be STREAMING-AWS4-HMAC-SHA256-EVENTS",
                rec,
            )
            return
        self.h2.send_headers(
            sid,
            [
                (":status", "200"),
                ("content-type", "application/vnd.amazon.eventstream"),
                ("x-amzn-requestid", str(uuid.uuid4())),
            ],
        )
        self.flush()
        rec.http_status = 200
        session = StreamSession(emu, self, sid, rec, ChunkChain(auth, emu.secret_key))
        self.sessions[sid] = session
        emu._active.append(session)
        session.start()


class SonicEmulator:
    """A local ``InvokeModelWithBidirectionalStream`` endpoint driven by a scenario.

    ``realtime``: True paces output audio at real time, False sends it as fast as the
    connection takes it, a float is a speed factor (2.0 = twice real time).
    ``session_limit_s``: the service's connection time limit (8 min); at the limit the
    stream gets a modelTimeoutException, like the service. 0 disables it.
    """

    def __init__(
        self,
        scenario: Scenario | dict[str, Any] | str | Path | None = None,
        *,
        access_key: str = DEFAULT_ACCESS_KEY,
        secret_key: str = DEFAULT_SECRET_KEY,
        region: str = DEFAULT_REGION,
        session_limit_s: float = DEFAULT_SESSION_LIMIT_S,
        realtime: bool | float = True,
        host: str = "127.0.0.1",
        port: int = 0,
        model_ids: tuple[str, ...] = (NOVA_2_SONIC, NOVA_SONIC_V1),
        certs: CertBundle | None = None,
    ) -> None:
        self.scenario = Scenario.load(scenario)
        self.access_key = access_key
        self.secret_key = secret_key
        self.region = region
        self.session_limit_s = float(session_limit_s)
        self.speed = 1.0 if realtime is True else (0.0 if realtime is False else float(realtime))
        self.host = host
        self.port = port
        self.model_ids = tuple(model_ids)
        self._certs = certs
        self._own_certs = certs is None
        self.records: list[StreamRecord] = []
        self._active: list[StreamSession] = []
        self._server: asyncio.Server | None = None
        self._conns: set[_H2Conn] = set()
        self._conn_tasks: set[asyncio.Task] = set()
        self._turn = 0
        self._http_faults: list[Fault] = []
        self._armed_stream_faults: list[Fault] = []
        self._every_stream_faults: list[Fault] = []
        self._armed_turn_faults: list[Fault] = []
        self._audio_in_hooks: list[AudioHook] = []
        self._audio_out_hooks: list[AudioHook] = []
        self._waiters: list[tuple[Callable[[], Any], asyncio.Future]] = []
        self._synth_cache: dict[tuple[str, str, int, int], bytes] = {}
        self.loop: asyncio.AbstractEventLoop | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> SonicEmulator:
        if self._certs is None:
            self._certs = await asyncio.to_thread(make_certs)
        ctx = self._certs.server_context(["h2"])
        self.loop = asyncio.get_running_loop()
        self._server = await asyncio.start_server(
            self._on_connect, self.host, self.port, ssl=ctx, limit=1 << 20
        )
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("Nova Sonic stand-in on %s (CA %s)", self.endpoint_uri, self.ca_file)
        return self

    async def stop(self) -> None:
        """Close the listener, every stream and connection (GOAWAY), remove the certs."""
        if self._server is not None:
            self._server.close()
        for s in list(self._active):
            await s.stop()
        for c in list(self._conns):
            with contextlib.suppress(Exception):
                c.h2.close_connection()
                c.flush()
                c.closed = True
                c.writer.close()
        for t in list(self._conn_tasks):
            t.cancel()
        await asyncio.gather(*self._conn_tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None
        for _, fut in self._waiters:
            if not fut.done():
                fut.cancel()
        if self._own_certs and self._certs is not None:
            self._certs.cleanup()
            self._certs = None

    async def __aenter__(self) -> SonicEmulator:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def endpoint_uri(self) -> str:
        return f"https://{self.host}:{self.port}"

    @property
    def ca_file(self) -> str:
        if self._certs is None:
            raise RuntimeError("start() the emulator first")
        return str(self._certs.ca_file)

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sslobj = writer.get_extra_info("ssl_object")
        if sslobj is None or sslobj.selected_alpn_protocol() != "h2":
            log.warning("client did not negotiate h2 (ALPN); closing")
            writer.close()
            return
        conn = _H2Conn(self, reader, writer)
        self._conns.add(conn)
        task = asyncio.current_task()
        if task is not None:
            self._conn_tasks.add(task)
        try:
            await conn.run()
        except asyncio.CancelledError:
            pass  # stop(): the handler task must end quietly (asyncio logs a cancelled one)
        finally:
            self._conns.discard(conn)
            if task is not None:
                self._conn_tasks.discard(task)

    # ------------------------------------------------------------------ public API
    @property
    def active_streams(self) -> list[StreamSession]:
        return list(self._active)

    def on_audio_input(self, callback: AudioHook) -> None:
        """``callback(record, pcm, t_ns)`` on every audioInput, t_ns = arrival perf_counter_ns."""
        self._audio_in_hooks.append(callback)

    def on_audio_output(self, callback: AudioHook) -> None:
        """``callback(record, pcm, t_ns)`` after every audioOutput write."""
        self._audio_out_hooks.append(callback)

    def inject(self, fault: str | dict[str, Any] | Fault) -> Fault:
        """Produce a fault (see :class:`Fault`). Call on the emulator's loop."""
        f = Fault.coerce(fault)
        if f.is_http:
            self._http_faults.extend(Fault(**{**f.__dict__, "count": 1}) for _ in range(f.count))
        elif f.when == "next_turn":
            self._armed_turn_faults.append(f)
        elif f.when == "every_stream":
            self._every_stream_faults.append(f)
        else:
            targets = (
                [s for s in self._active if f.stream is None or s.rec.index == f.stream]
                if f.when == "now"
                else []
            )
            if targets:
                for s in targets:
                    s.add_fault(f)
            else:
                self._armed_stream_faults.append(f)
        return f

    def clear_faults(self) -> None:
        """Forget every armed and every-stream fault (a storm test's recovery phase)."""
        self._http_faults.clear()
        self._armed_stream_faults.clear()
        self._every_stream_faults.clear()
        self._armed_turn_faults.clear()

    async def push_audio_output(self, pcm: bytes, stream: int | None = None) -> int:
        """Send one audioOutput chunk on an active stream now; returns the write time (ns)."""
        return await self._session(stream).push_audio(pcm)

    async def end_audio_output(self, stream: int | None = None) -> None:
        await self._session(stream).end_push()

    def _session(self, stream: int | None) -> StreamSession:
        for s in reversed(self._active):
            if stream is None or s.rec.index == stream:
                return s
        raise RuntimeError(f"no active stream{'' if stream is None else f' {stream}'}")

    async def wait_for(
        self,
        predicate: Callable[[], Any],
        timeout: float = 10.0,  # noqa: ASYNC109
    ) -> Any:
        """Wait until ``predicate()`` is truthy (re-checked on every record change)."""
        value = predicate()
        if value:
            return value
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        entry = (predicate, fut)
        self._waiters.append(entry)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise TimeoutError(f"condition not met within {timeout} s") from None
        finally:
            with contextlib.suppress(ValueError):
                self._waiters.remove(entry)

    def reset_scenario(
        self, scenario: Scenario | dict[str, Any] | str | Path | None = None
    ) -> None:
        """Start the turns over (optionally with a new scenario)."""
        if scenario is not None:
            self.scenario = Scenario.load(scenario)
        self._turn = 0

    # ------------------------------------------------------------------ stream-facing API
    # (stream.StreamHost: what a StreamSession may ask of its emulator)
    def notify(self) -> None:
        """Re-check every wait_for predicate (a record changed)."""
        self._notify()

    def stream_faults(self, index: int) -> list[Fault]:
        """The faults a new stream ``index`` gets: scenario, armed and every-stream ones."""
        out = [f for f in self.scenario.faults if f.stream is None or f.stream == index]
        out += self._take_armed_stream_faults(index)
        out += [f for f in self._every_stream_faults if f.stream is None or f.stream == index]
        return out

    def arm_turn_fault(self, fault: Fault) -> None:
        self._armed_turn_faults.append(fault)

    def take_turn_fault(self) -> Fault | None:
        return self._take_turn_fault()

    def next_turn(self, trigger: str, text: str = "") -> int | None:
        return self._next_turn(trigger, text)

    def audio_in(self, rec: StreamRecord, pcm: bytes, t_ns: int) -> None:
        for cb in self._audio_in_hooks:
            cb(rec, pcm, t_ns)

    def audio_out(self, rec: StreamRecord, pcm: bytes, t_ns: int) -> None:
        for cb in self._audio_out_hooks:
            cb(rec, pcm, t_ns)

    async def synth_cached(self, text: str, voice: str, wpm: int, rate: int) -> bytes:
        return await self._synth_cached(text, voice, wpm, rate)

    def stream_closed(self, stream: StreamSession) -> None:
        self._stream_closed(stream)

    # ------------------------------------------------------------------ internals
    def _notify(self) -> None:
        for pred, fut in list(self._waiters):
            if fut.done():
                continue
            try:
                value = pred()
            except Exception as e:  # noqa: BLE001 a broken predicate must fail the waiter, not us
                fut.set_exception(e)
                continue
            if value:
                fut.set_result(value)

    def _stream_closed(self, s: StreamSession) -> None:
        with contextlib.suppress(ValueError):
            self._active.remove(s)

    def _take_http_fault(self) -> Fault | None:
        return self._http_faults.pop(0) if self._http_faults else None

    def _take_armed_stream_faults(self, index: int) -> list[Fault]:
        out = [f for f in self._armed_stream_faults if f.stream is None or f.stream == index]
        for f in out:
            self._armed_stream_faults.remove(f)
        return out

    def _take_turn_fault(self) -> Fault | None:
        return self._armed_turn_faults.pop(0) if self._armed_turn_faults else None

    def _next_turn(self, trigger: str, text: str = "") -> int | None:
        turns = self.scenario.turns
        if not turns:
            return None
        if self._turn >= len(turns):
            if not self.scenario.loop:
                return None
            self._turn = 0
        if not turns[self._turn].fires_on(trigger, text):
            return None
        i = self._turn
        self._turn += 1
        return i

    async def _synth_cached(self, text: str, voice: str, wpm: int, rate: int) -> bytes:
        key = (text, voice, wpm, rate)
        if key not in self._synth_cache:
            self._synth_cache[key] = await synth.synthesize(text, voice, wpm, rate)
        return self._synth_cache[key]


class EmulatorThread:
    """Runs a :class:`SonicEmulator` on its own loop in a thread (for ROS-node tests).

    ``with EmulatorThread(scenario=...) as emu:`` then ``emu.endpoint_uri``,
    ``emu.ca_file``, ``emu.records``, ``emu.inject(...)``, ``emu.wait_for(pred, timeout)``,
    ``emu.call(coro_fn, *args)`` run on the emulator's loop from any thread.
    """

    def __init__(self, **kwargs: Any) -> None:
        self._kwargs = kwargs
        self.emulator: SonicEmulator | None = None
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, name="sonic-emulator", daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_forever()

    def _submit(self, coro: Any) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def start(self) -> EmulatorThread:
        self._thread.start()

        async def make() -> SonicEmulator:
            return await SonicEmulator(**self._kwargs).start()

        self.emulator = self._submit(make()).result(30)
        return self

    def stop(self) -> None:
        if self.emulator is not None:
            self._submit(self.emulator.stop()).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    def __enter__(self) -> EmulatorThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def _emu(self) -> SonicEmulator:
        if self.emulator is None:
            raise RuntimeError("EmulatorThread not started")
        return self.emulator

    @property
    def endpoint_uri(self) -> str:
        return self._emu.endpoint_uri

    @property
    def ca_file(self) -> str:
        return self._emu.ca_file

    @property
    def records(self) -> list[StreamRecord]:
        """The live list (appended on the emulator thread): read, do not mutate."""
        return self._emu.records

    def inject(self, fault: str | dict[str, Any] | Fault) -> Fault:
        async def do() -> Fault:
            return self._emu.inject(fault)

        return self._submit(do()).result(10)

    def call(self, fn: Callable[..., Any], *args: Any, timeout: float = 30.0) -> Any:
        """Run ``fn(*args)`` (a coroutine function or plain function) on the emulator loop."""

        async def do() -> Any:
            r = fn(*args)
            if asyncio.iscoroutine(r):
                r = await r
            return r

        return self._submit(do()).result(timeout)

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
        return self._submit(self._emu.wait_for(predicate, timeout)).result(timeout + 5)

    def on_audio_input(self, callback: AudioHook) -> None:
        """The callback runs on the emulator thread."""
        self._loop.call_soon_threadsafe(self._emu.on_audio_input, callback)

    def on_audio_output(self, callback: AudioHook) -> None:
        self._loop.call_soon_threadsafe(self._emu.on_audio_output, callback)

    def push_audio_output(self, pcm: bytes, stream: int | None = None) -> int:
        return self._submit(self._emu.push_audio_output(pcm, stream)).result(10)
