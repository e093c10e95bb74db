"""Speaker playback on libpulse's own API, so a flush also drops what the sound server holds.

Why: through PortAudio and ALSA's pulse plugin, ``flush()`` can only empty our queue; what
PortAudio, ALSA and PulseAudio already hold keeps playing (bench/audio_flush.py: flush ->
silence p50 55 ms, p99 66 ms quiet, 81 ms loaded with audio_io's defaults), and aborting the
PortAudio stream garbles the audio that follows. Here a flush empties our queue, then calls
``pa_stream_flush`` under the mainloop lock: the server drops the stream's buffer and
rewinds the sink over what it had rendered but not yet played: flush -> silence p50 4 ms,
p99 7-8 ms quiet and 13-14 ms under the standard load, 7 ms with real-time priority;
on a crowded machine the p99 rose to 22-73 ms (the mainloop thread holds its lock while it
waits for the GIL, and the flush waits for that lock; docs/audio-quality.md).

libpulse through ctypes (Debian's ``libpulse0``, installed with ``pulseaudio``): the
asynchronous API on a ``pa_threaded_mainloop`` (a C thread; Python only runs in the
callbacks). PyPI offers no fitting wrapper: ``pulsectl`` only does server control,
``pasimple`` is pa_simple (a blocking write that races a flush from another thread),
``libpulse`` runs the mainloop on an asyncio loop (audio_io has none, and a busy loop
would starve the device), ``soundcard`` has no flush.

The device pulls, as with PortAudio: the server asks for data (``minreq`` = one block)
and the write callback fills whole ``block_ms`` blocks from the :class:`PlaybackBuffer`
through ``buffer.read_into``, so :func:`sonic_voice.audio.echo.tap_playback` sees every
block at the moment it is handed to the server (silence included). The stream's target
length is ``latency`` + one block, what it holds right after a request is answered; the
sink holds one block more (``PA_STREAM_EARLY_REQUESTS``), and a flush rewinds it.

Works with PulseAudio and PipeWire's pulse server. Never imports rclpy.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
import time
from typing import TYPE_CHECKING

import numpy as np

from sonic_voice.audio.pcm import samples_per_block
from sonic_voice.audio.playback import SpeakerQueue

if TYPE_CHECKING:
    from sonic_voice.audio.devices import StreamSettings

log = logging.getLogger(__name__)

# pulse/def.h, pulse/sample.h
_CONTEXT_READY, _CONTEXT_FAILED, _CONTEXT_TERMINATED = 4, 5, 6
_STREAM_READY, _STREAM_FAILED, _STREAM_TERMINATED = 2, 3, 4
_CONTEXT_NOAUTOSPAWN = 0x1
_STREAM_START_CORKED = 0x1
_STREAM_EARLY_REQUESTS = 0x4000
_SAMPLE_S16LE = 3
_SEEK_RELATIVE = 0
_OPERATION_RUNNING = 0
_NO_VALUE = 0xFFFFFFFF  # (uint32_t) -1: "server's choice"

# Named latencies, as PortAudio's 'low'/'high' for the pulse device.
NAMED_LATENCY = {"low": 0.010, "high": 0.100}


class PulseUnavailableError(RuntimeError):
    """No PulseAudio (or pipewire-pulse) server answers."""


class SinkNotFoundError(LookupError):
    """The device spec names no sink of the server; the message lists the sinks."""


class _SampleSpec(ctypes.Structure):
    _fields_ = [("format", ctypes.c_int), ("rate", ctypes.c_uint32), ("channels", ctypes.c_uint8)]


class _BufferAttr(ctypes.Structure):
    _fields_ = [
        ("maxlength", ctypes.c_uint32),
        ("tlength", ctypes.c_uint32),
        ("prebuf", ctypes.c_uint32),
        ("minreq", ctypes.c_uint32),
        ("fragsize", ctypes.c_uint32),
    ]


class _SinkInfoHead(ctypes.Structure):
    """The first fields of ``pa_sink_info`` (only ever read through the server's pointer)."""

    _fields_ = [
        ("name", ctypes.c_char_p),
        ("index", ctypes.c_uint32),
        ("description", ctypes.c_char_p),
    ]


_vp, _int, _u32, _sz = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_size_t
_STATE_CB = ctypes.CFUNCTYPE(None, _vp, _vp)
_STREAM_REQUEST_CB = ctypes.CFUNCTYPE(None, _vp, _sz, _vp)
_STREAM_NOTIFY_CB = ctypes.CFUNCTYPE(None, _vp, _vp)
_SINK_INFO_CB = ctypes.CFUNCTYPE(None, _vp, ctypes.POINTER(_SinkInfoHead), _int, _vp)
_SUCCESS_CB = ctypes.CFUNCTYPE(None, _vp, _int, _vp)

_PROTOTYPES = {
    "pa_threaded_mainloop_new": (_vp, []),
    "pa_threaded_mainloop_get_api": (_vp, [_vp]),
    "pa_threaded_mainloop_start": (_int, [_vp]),
    "pa_threaded_mainloop_stop": (None, [_vp]),
    "pa_threaded_mainloop_free": (None, [_vp]),
    "pa_threaded_mainloop_lock": (None, [_vp]),
    "pa_threaded_mainloop_unlock": (None, [_vp]),
    "pa_context_new": (_vp, [_vp, ctypes.c_char_p]),
    "pa_context_set_state_callback": (None, [_vp, _STATE_CB, _vp]),
    "pa_context_connect": (_int, [_vp, ctypes.c_char_p, _int, _vp]),
    "pa_context_get_state": (_int, [_vp]),
    "pa_context_errno": (_int, [_vp]),
    "pa_context_disconnect": (None, [_vp]),
    "pa_context_unref": (None, [_vp]),
    "pa_context_get_sink_info_list": (_vp, [_vp, _SINK_INFO_CB, _vp]),
    "pa_strerror": (ctypes.c_char_p, [_int]),
    "pa_operation_unref": (None, [_vp]),
    "pa_stream_new": (_vp, [_vp, ctypes.c_char_p, ctypes.POINTER(_SampleSpec), _vp]),
    "pa_stream_set_state_callback": (None, [_vp, _STATE_CB, _vp]),
    "pa_stream_set_write_callback": (None, [_vp, _STREAM_REQUEST_CB, _vp]),
    "pa_stream_set_underflow_callback": (None, [_vp, _STREAM_NOTIFY_CB, _vp]),
    "pa_stream_connect_playback": (
        _int,
        [_vp, ctypes.c_char_p, ctypes.POINTER(_BufferAttr), _int, _vp, _vp],
    ),
    "pa_stream_get_state": (_int, [_vp]),
    "pa_stream_write": (_int, [_vp, _vp, _sz, _vp, ctypes.c_int64, _int]),
    "pa_stream_flush": (_vp, [_vp, _SUCCESS_CB, _vp]),
    "pa_stream_cork": (_vp, [_vp, _int, _SUCCESS_CB, _vp]),
    "pa_stream_disconnect": (_int, [_vp]),
    "pa_stream_unref": (None, [_vp]),
    "pa_stream_get_buffer_attr": (ctypes.POINTER(_BufferAttr), [_vp]),
    "pa_stream_get_device_name": (ctypes.c_char_p, [_vp]),
}

# Called in the write callback or under the mainloop lock, and never blocking: bound
# without releasing the GIL. A GIL release there hands the GIL to another thread, and
# taking it back waits out that thread's switch interval (5 ms) while the mainloop lock is
# held: a flush waiting for the lock waited that long too (flush call p50 10 ms under load).
_KEEP_GIL = {
    "pa_threaded_mainloop_unlock",
    "pa_stream_write",
    "pa_stream_get_state",
    "pa_context_get_state",
    "pa_stream_flush",
    "pa_operation_unref",
}

_lib: ctypes.CDLL | None = None


def _pa() -> ctypes.CDLL:
    """libpulse, loaded once with its prototypes; PulseUnavailableError where it is missing.

    The functions in ``_KEEP_GIL`` are bound through a second handle (``ctypes.PyDLL``,
    same library) so that they keep the GIL."""
    global _lib
    if _lib is None:
        path = ctypes.util.find_library("pulse") or "libpulse.so.0"
        try:
            lib, keep_gil = ctypes.CDLL(path), ctypes.PyDLL(path)
        except OSError as e:
            raise PulseUnavailableError(
                f"libpulse is not installed ({e}): apt-get install libpulse0"
            ) from None
        for name, (restype, argtypes) in _PROTOTYPES.items():
            fn = getattr(keep_gil if name in _KEEP_GIL else lib, name)
            fn.restype, fn.argtypes = restype, argtypes
            if name in _KEEP_GIL:
                setattr(lib, name, fn)
        _lib = lib
    return _lib


_NO_SUCCESS_CB = _SUCCESS_CB()  # NULL callback


class _Connection:
    """A threaded mainloop and a context connected to the server (``server`` None: the one
    libpulse finds on its own: $PULSE_SERVER, client.conf, the user's runtime socket)."""

    def __init__(self, name: str, server: str | None = None, timeout: float = 2.0) -> None:
        pa = self.pa = _pa()
        self.loop = pa.pa_threaded_mainloop_new()
        self.ctx = pa.pa_context_new(pa.pa_threaded_mainloop_get_api(self.loop), name.encode())
        self._ready = threading.Event()
        self.state = 0
        self._state_cb = _STATE_CB(self._on_state)
        pa.pa_context_set_state_callback(self.ctx, self._state_cb, None)
        if pa.pa_threaded_mainloop_start(self.loop) < 0:
            self.close()
            raise PulseUnavailableError("pa_threaded_mainloop_start failed")
        with self.locked():
            rc = pa.pa_context_connect(
                self.ctx, server.encode() if server else None, _CONTEXT_NOAUTOSPAWN, None
            )
        if rc < 0 or not self._ready.wait(timeout) or self.state != _CONTEXT_READY:
            why = self.error() if rc < 0 or self._ready.is_set() else f"no answer in {timeout} s"
            self.close()
            raise PulseUnavailableError(f"no PulseAudio server answers: {why}")

    def _on_state(self, ctx: int, _ud: int) -> None:
        self.state = self.pa.pa_context_get_state(ctx)
        if self.state in (_CONTEXT_READY, _CONTEXT_FAILED, _CONTEXT_TERMINATED):
            self._ready.set()

    def error(self) -> str:
        return self.pa.pa_strerror(self.pa.pa_context_errno(self.ctx)).decode()

    def locked(self) -> _Locked:
        return _Locked(self.pa, self.loop)

    def sinks(self, timeout: float = 2.0) -> list[tuple[str, str]]:
        """(name, description) of every sink."""
        found: list[tuple[str, str]] = []
        done = threading.Event()

        def on_sink(_ctx: int, info, eol: int, _ud: int) -> None:
            if eol:
                done.set()
            elif info:
                i = info.contents
                found.append(((i.name or b"").decode(), (i.description or b"").decode()))

        self._sink_cb = _SINK_INFO_CB(on_sink)  # kept: it may still be called after a timeout
        with self.locked():
            op = self.pa.pa_context_get_sink_info_list(self.ctx, self._sink_cb, None)
            if op:
                self.pa.pa_operation_unref(op)
        if not op or not done.wait(timeout):
            raise PulseUnavailableError(f"the server did not list its sinks: {self.error()}")
        return found

    def close(self) -> None:
        """Disconnect and stop the mainloop thread (joins it)."""
        pa = self.pa
        if self.loop is None:
            return
        with self.locked():
            if self.ctx:
                pa.pa_context_disconnect(self.ctx)
                pa.pa_context_unref(self.ctx)
                self.ctx = None
        pa.pa_threaded_mainloop_stop(self.loop)
        pa.pa_threaded_mainloop_free(self.loop)
        self.loop = None


class _Locked:
    def __init__(self, pa: ctypes.CDLL, loop: int) -> None:
        self.pa, self.loop = pa, loop

    def __enter__(self) -> None:
        self.pa.pa_threaded_mainloop_lock(self.loop)

    def __exit__(self, *exc: object) -> None:
        self.pa.pa_threaded_mainloop_unlock(self.loop)


def match_sink(spec: str | int | None, sinks: list[tuple[str, str]]) -> str | None:
    """The sink ``spec`` names, or None for the server's default sink.

    ``None``, ``""``, ``"default"`` and ``"pulse"`` (PortAudio's names for the sound server)
    mean the default sink; otherwise an exact sink name or description, then a
    case-insensitive substring of either. Raises :class:`SinkNotFoundError` when nothing
    matches (an index, or an ALSA device name: a PortAudio device)."""
    if spec in (None, "", "default", "pulse"):
        return None
    text = str(spec)
    for name, desc in sinks:
        if text in (name, desc):
            return name
    low = text.lower()
    for name, desc in sinks:
        if low in name.lower() or low in desc.lower():
            return name
    listing = ", ".join(f"{n} ({d})" for n, d in sinks) or "(none)"
    raise SinkNotFoundError(f"no PulseAudio sink matches {spec!r}; sinks: {listing}")


class PulsePlayback(SpeakerQueue):
    """Speaker playback through libpulse; the surface of
    :class:`sonic_voice.audio.devices.PlaybackStream` (``buffer``, ``device_rate``,
    ``device_name``, ``write``, ``flush``, ``start``, ``close``, ``active``,
    ``last_callback``, ``status_flags``).

    Opened corked (configure), uncorked by :meth:`start` (activate). ``settings`` is a
    ``StreamSettings``; its ``device`` is matched against the
    server's sinks (:func:`match_sink`). ``server``: a server address, None = libpulse's
    own search ($PULSE_SERVER, the user's socket). Raises :class:`PulseUnavailableError`
    (no server) or :class:`SinkNotFoundError` (no such sink).
    """

    backend = "pulse"

    def __init__(self, settings: StreamSettings, server: str | None = None) -> None:
        self.settings = settings
        latency = settings.latency
        try:
            latency = NAMED_LATENCY.get(latency, latency) if isinstance(latency, str) else latency
            self.latency = float(latency)
        except ValueError:
            raise ValueError(
                f"latency {settings.latency!r}: 'low', 'high' or seconds ('0.03')"
            ) from None
        # PulseAudio converts to the sink's rate itself (as it did behind PortAudio).
        self.device_rate = int(settings.device_rate or settings.rate)
        self._open_queue(self.device_rate)
        self.block = samples_per_block(self.device_rate, settings.block_ms)
        self._out = np.zeros(self.block, dtype=np.int16)
        self._silence = np.zeros(self.block, dtype=np.int16)
        self.last_callback = 0.0
        self.status_flags = 0  # server-side underflows (the write callback came late)
        self.flushes = 0
        self._untapped = 0  # blocks of silence still to write past the tap (after a flush)
        self._started = False
        self._stream_state = 0
        self._stream_ready = threading.Event()
        self._s = None
        self._life = threading.Lock()
        self._conn = _Connection("sonic_voice", server)
        pa = self.pa = self._conn.pa
        try:
            sink = match_sink(settings.device, self._conn.sinks())
        except BaseException:
            self._conn.close()
            raise
        self._cbs = (
            _STATE_CB(self._on_stream_state),
            _STREAM_REQUEST_CB(self._on_write),
            _STREAM_NOTIFY_CB(self._on_underflow),
        )
        spec = _SampleSpec(_SAMPLE_S16LE, self.device_rate, 1)
        nbytes = 2 * self.block
        attr = _BufferAttr(
            maxlength=_NO_VALUE,
            tlength=round(self.latency * self.device_rate) * 2 + nbytes,
            prebuf=_NO_VALUE,
            minreq=nbytes,
            fragsize=_NO_VALUE,
        )
        # EARLY_REQUESTS: fragment semantics, as ALSA's pulse plugin asks for: a request as
        # soon as one block is free, and the sink's own buffer set to one block (minreq).
        # ADJUST_LATENCY (or no flag) would size the sink's buffer (tlength - 2 minreq)/2,
        # here 0: the sink then wakes so often that the daemon's CPU went from 3.0 % to
        # 8.4 % of a core (null sink, 24 kHz stream) for no gain, since a flush rewinds the
        # sink anyway. No timing flags: nothing here reads the stream's timing.
        flags = _STREAM_START_CORKED | _STREAM_EARLY_REQUESTS
        with self._conn.locked():
            self._s = pa.pa_stream_new(self._conn.ctx, b"speaker", ctypes.byref(spec), None)
            if not self._s:
                why = self._conn.error()
                self._conn.close()
                raise PulseUnavailableError(f"pa_stream_new: {why}")
            pa.pa_stream_set_state_callback(self._s, self._cbs[0], None)
            pa.pa_stream_set_write_callback(self._s, self._cbs[1], None)
            pa.pa_stream_set_underflow_callback(self._s, self._cbs[2], None)
            rc = pa.pa_stream_connect_playback(
                self._s, sink.encode() if sink else None, ctypes.byref(attr), flags, None, None
            )
        if rc < 0 or not self._stream_ready.wait(5.0) or self._stream_state != _STREAM_READY:
            why = self._conn.error() if rc < 0 or self._stream_ready.is_set() else "no answer"
            self.close()
            raise PulseUnavailableError(f"cannot open a playback stream on {sink!r}: {why}")
        with self._conn.locked():
            got = pa.pa_stream_get_buffer_attr(self._s).contents
            self.buffer_attr = {k: getattr(got, k) for k, _ in _BufferAttr._fields_}
            self.device_name = (pa.pa_stream_get_device_name(self._s) or b"?").decode()
        log.debug("pulse playback on %s: %s", self.device_name, self.buffer_attr)

    # -- mainloop thread ---------------------------------------------------------------
    def _on_stream_state(self, s: int, _ud: int) -> None:
        self._stream_state = self.pa.pa_stream_get_state(s)
        if self._stream_state in (_STREAM_READY, _STREAM_FAILED, _STREAM_TERMINATED):
            self._stream_ready.set()

    def _on_underflow(self, _s: int, _ud: int) -> None:
        self.status_flags += 1

    def _on_write(self, s: int, nbytes: int, _ud: int) -> None:
        """The server asks for ``nbytes``: hand it whole blocks (what is short of a block
        stays requested and comes back with the next request)."""
        self.last_callback = time.monotonic()
        pa = self.pa
        for _ in range(nbytes // (2 * self.block)):
            if self._untapped > 0:
                # Refill after a flush: the server dropped audio the tap already saw, so the
                # silence standing in for it is not shown again (the echo canceller's far
                # end keeps the pace of what actually plays).
                self._untapped -= 1
                block = self._silence
            else:
                self.buffer.read_into(self._out)
                block = self._out
            pa.pa_stream_write(s, block.ctypes.data, 2 * self.block, None, 0, _SEEK_RELATIVE)

    # -- any thread --------------------------------------------------------------------
    def flush(self) -> int:
        """Drop everything queued, here and in the server (``pa_stream_flush``: the stream's
        buffer, and the sink rewinds what it rendered of it). Returns the samples dropped
        from our queue. Does not wait for the server."""
        dropped = self._drop_queued()
        conn = self._conn
        with self._life:  # close() cannot free the mainloop under us
            if conn.loop is None or not self._s or self._stream_state != _STREAM_READY:
                return dropped
            with conn.locked():
                op = self.pa.pa_stream_flush(self._s, _NO_SUCCESS_CB, None)
                if op:
                    self.pa.pa_operation_unref(op)
                    # What the server held and dropped: about its target length.
                    self._untapped = self.buffer_attr["tlength"] // (2 * self.block)
                    self.flushes += 1
        return dropped

    @property
    def active(self) -> bool:
        """Started, and neither the stream nor the server connection has failed."""
        return (
            self._started
            and self._stream_state == _STREAM_READY
            and self._conn.state == _CONTEXT_READY
        )

    def start(self) -> None:
        """Uncork: the server starts playing (and asking for blocks)."""
        self.last_callback = time.monotonic()
        with self._life:
            if not self._s:
                raise RuntimeError("PulsePlayback.start() after close()")
            with self._conn.locked():
                op = self.pa.pa_stream_cork(self._s, 0, _NO_SUCCESS_CB, None)
                if op:
                    self.pa.pa_operation_unref(op)
        self._started = True

    def close(self) -> None:
        """Disconnect the stream and the server; the mainloop thread is joined."""
        self._started = False
        with self._life:
            self._teardown()

    def _teardown(self) -> None:
        conn = self._conn
        if conn.loop is not None and self._s:
            with conn.locked():
                self.pa.pa_stream_set_write_callback(self._s, _STREAM_REQUEST_CB(), None)
                self.pa.pa_stream_set_state_callback(self._s, _STATE_CB(), None)
                self.pa.pa_stream_set_underflow_callback(self._s, _STREAM_NOTIFY_CB(), None)
                self.pa.pa_stream_disconnect(self._s)
                self.pa.pa_stream_unref(self._s)
                self._s = None
        conn.close()
