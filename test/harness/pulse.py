"""The test harness's audio devices: the package's virtual PulseAudio server.

See sonic_voice/audio/virtual.py: a null-sink speaker (record ``speaker.monitor``) and a
virtual microphone fed through the ``micfeed`` null sink.
"""

from __future__ import annotations

from sonic_voice.audio.virtual import Recorder, VirtualAudio

__all__ = ["PulseServer", "Recorder"]


class PulseServer(VirtualAudio):
    """One private server per test session (conftest's ``pulse`` fixture)."""
