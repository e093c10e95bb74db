"""SIGINT/SIGTERM reach the stop event through a relay thread, never inside the handler
(sonic_voice/ros/runtime.py SignalRelay): the handler may run while the main thread holds
the event's own lock, where ``Event.set()`` deadlocks."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from sonic_voice.app.cli import Signals
from sonic_voice.ros.runtime import SignalRelay


def _handler_returns(handler, timeout: float = 2.0) -> bool:
    """Run ``handler`` with the stop event's lock held, as when a signal lands inside
    ``Event.wait``'s entry; True if it returned (on a thread, so a deadlock cannot hang
    the test)."""
    done = threading.Event()

    def call() -> None:
        handler()
        done.set()

    threading.Thread(target=call, daemon=True).start()
    return done.wait(timeout)


def test_a_signal_landing_inside_the_events_lock_does_not_deadlock() -> None:
    stop = threading.Event()
    relay = SignalRelay(lambda _signum: stop.set())
    with stop._cond:  # the main thread inside Event.wait's entry
        assert _handler_returns(lambda: relay.handler(signal.SIGTERM))
        assert not stop.is_set()  # not yet: the relay waits for the lock
    assert stop.wait(2.0)


def test_the_old_handler_shape_deadlocks_there() -> None:
    """What the test above guards against: ``stop.set()`` in the handler, with the lock
    held, never returns."""
    stop = threading.Event()
    with stop._cond:
        assert not _handler_returns(stop.set, timeout=0.3)
    # (the blocked thread finishes now that the lock is free)


def test_runner_signals_set_the_stop_event_and_raise_while_starting() -> None:
    signals = Signals()
    old = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        signals.install()
        with pytest.raises(KeyboardInterrupt):  # while starting, a signal raises
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1.0)  # the handler runs here at the latest
        assert signals.event.wait(2.0) and signals.name == "SIGTERM"
        signals.raising = False
        signals.event.clear()
        os.kill(os.getpid(), signal.SIGINT)
        assert signals.event.wait(2.0) and signals.name == "SIGINT"
    finally:
        signal.signal(signal.SIGTERM, old[0])
        signal.signal(signal.SIGINT, old[1])
