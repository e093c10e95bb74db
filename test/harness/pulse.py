"""The test harness's audio devices: the package's virtual PulseAudio server.

See sonic_voice/audio/virtual.py: a null-sink speaker (record ``speaker.monitor``) and a
virtual microphone fed through the ``micfeed`` null sink.
"""

from __future__ import annotations

import time

from sonic_voice.audio.virtual import Recorder, VirtualAudio

__all__ = ["PulseServer", "Recorder"]


class PulseServer(VirtualAudio):
    """One private server per test session (conftest's ``pulse`` fixture)."""

    def echo_path(self, delay_ms: int = 60, gain_db: float = -10.0) -> int:
        """Route what the speaker plays into the microphone, about ``delay_ms`` later and
        attenuated by ``gain_db``: the acoustic echo of a robot whose speaker sits next to
        its microphone (module-loopback from ``speaker.monitor`` into ``micfeed``).
        Returns the module index for :meth:`remove_echo_path`."""
        out = self.pactl(
            "load-module",
            "module-loopback",
            "source=speaker.monitor",
            "sink=micfeed",
            f"latency_msec={int(delay_ms)}",
            "source_dont_move=true",
            "sink_dont_move=true",
        )
        module = int(out.stdout.strip())
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            index = None
            for line in self.pactl("list", "sink-inputs").stdout.splitlines():
                line = line.strip()
                if line.startswith("Sink Input #"):
                    index = line.split("#", 1)[1]
                elif line == f"Owner Module: {module}" and index is not None:
                    self.pactl("set-sink-input-volume", index, f"{gain_db}dB")
                    return module
            time.sleep(0.05)
        raise RuntimeError("module-loopback made no sink input")

    def remove_echo_path(self, module: int) -> None:
        self.pactl("unload-module", str(module), check=False)
