"""Virtual audio devices: a private PulseAudio server with a speaker and a microphone.

Used by the offline demo (a robot with no sound card, or a laptop that should stay
quiet) and by the tests.

- ``speaker``: a null sink, the default output; what the package plays is recorded from
  ``speaker.monitor``.
- ``mic``: the default input, a source remapped from the monitor of the null sink
  ``micfeed``; whatever a test plays into ``micfeed`` is what the microphone hears.

PortAudio reaches it through ALSA's pulse plugin (libasound2-plugins), so capture and
playback go through the same code path as on a robot with a real sound card.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

CONFIG = """
load-module module-native-protocol-unix auth-anonymous=1 socket={socket}
load-module module-null-sink sink_name=speaker rate=48000 channels=2 sink_properties=device.description=Speaker
load-module module-null-sink sink_name=micfeed rate=48000 channels=2 sink_properties=device.description=MicFeed
load-module module-remap-source source_name=mic master=micfeed.monitor source_properties=device.description=Microphone
set-default-sink speaker
set-default-source mic
"""  # noqa: E501


class VirtualAudio:
    """Starts ``pulseaudio`` in a temp dir; ``env`` holds what clients need."""

    def __init__(self) -> None:
        if not shutil.which("pulseaudio"):
            raise RuntimeError(
                "pulseaudio is not installed: sudo apt-get install pulseaudio pulseaudio-utils "
                "libasound2-plugins (scripts/setup.sh does it when run as root)"
            )
        self.dir = Path(tempfile.mkdtemp(prefix="sv-pulse-"))
        self.socket = self.dir / "native"
        (self.dir / "default.pa").write_text(CONFIG.format(socket=self.socket))
        self.env = {
            "PULSE_SERVER": f"unix:{self.socket}",
            "PULSE_RUNTIME_PATH": str(self.dir),
            "PULSE_STATE_PATH": str(self.dir),
            "PULSE_COOKIE": str(self.dir / "cookie"),
        }
        penv = {**os.environ, **self.env, "HOME": str(self.dir), "XDG_RUNTIME_DIR": str(self.dir)}
        self._log = open(self.dir / "pulse.log", "wb")
        self.proc = subprocess.Popen(
            [
                "pulseaudio",
                "-n",
                "-F",
                str(self.dir / "default.pa"),
                "--daemonize=no",
                "--exit-idle-time=-1",
                "--use-pid-file=no",
                "--disable-shm=yes",
                "--system=no",
                # Real-time scheduling where allowed (root, or rtkit): on a busy machine a
                # starved daemon drops samples silently (the client sees no overflow).
                "--high-priority=yes",
                "--realtime=yes",
                "--no-cpu-limit=yes",
            ],
            env=penv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"pulseaudio exited: {(self.dir / 'pulse.log').read_text()}")
            if self.pactl("info", check=False).returncode == 0:
                break
            time.sleep(0.05)
        else:
            raise RuntimeError("pulseaudio did not come up in 10 s")
        # Real-time priority for the daemon's threads where allowed (root): on a busy
        # machine a starved daemon drops samples silently (the client sees no overflow).
        _realtime(self.proc)
        # A null sink with no client does not run its clock: the microphone would deliver
        # nothing and the speaker would drain irregularly. Real cards always run, so keep
        # one silent client on each (zeros add nothing to what tests play or record).
        self._room = [self._silence_into(sink) for sink in ("micfeed", "speaker")]

    def _silence_into(self, sink: str) -> subprocess.Popen:
        proc = subprocess.Popen(
            [
                "pacat",
                "--playback",
                "-d",
                sink,
                "--raw",
                "--format=s16le",
                "--rate=48000",
                "--channels=2",
                "--latency-msec=50",
            ],
            env=self.client_env(),
            stdin=open("/dev/zero", "rb"),
        )
        _realtime(proc)
        return proc

    def warm_up(self) -> None:
        """Open and run one PortAudio stream: the first stream of a fresh daemon stalls
        for a while (measured here), which would otherwise land in whichever test is first.
        Call with this server's environment already exported."""
        import sounddevice as sd

        with (
            sd.OutputStream(samplerate=24000, channels=1, dtype="int16", latency=0.02),
            sd.InputStream(samplerate=16000, channels=1, dtype="int16", latency=0.02),
        ):
            time.sleep(1.5)

    def export(self) -> None:
        """Point this process's PortAudio at the virtual devices (re-enumerates them)."""
        os.environ.update(self.env)
        import sounddevice

        sounddevice._terminate()
        sounddevice._initialize()

    def client_env(self) -> dict[str, str]:
        return {**os.environ, **self.env}

    def pactl(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        return subprocess.run(
            ["pactl", *args], env=self.client_env(), capture_output=True, text=True, check=check
        )

    def play_into_mic(
        self, samples: np.ndarray, rate: int, latency_ms: int = 300
    ) -> subprocess.Popen:
        """Start playing int16 mono ``samples`` into the virtual microphone (returns at once).

        A deep client buffer (300 ms): with a small one pacat underruns on a loaded machine
        and PulseAudio fills the hole with silence (5-70 ms holes were measured), which no
        test of ours should mistake for a bug. The extra latency only moves where the sound
        starts; tests find that by correlation.

        pacat reads the samples from an in-memory file (memfd), not a pipe: on a pipe whose
        writer has closed, poll() reports POLLHUP even while pacat has masked stdin out
        (its buffer full), so pacat spun through ppoll/read/getpid until it had read the
        last byte: 1.8-3.6 CPU-s per 2 s line, mostly kernel, under SCHED_FIFO (a whole
        core on a 2-core robot). A regular file never reports POLLHUP: 0.02 CPU-s per line
        (bench/virtual_mic.py)."""
        data = np.ascontiguousarray(samples, dtype="<i2").tobytes()
        fd = os.memfd_create("sv-mic-line", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.lseek(fd, 0, os.SEEK_SET)
            proc = subprocess.Popen(
                [
                    "pacat",
                    "--playback",
                    "-d",
                    "micfeed",
                    "--raw",
                    "--format=s16le",
                    f"--rate={rate}",
                    "--channels=1",
                    f"--latency-msec={latency_ms}",
                ],
                env=self.client_env(),
                stdin=fd,
            )
        finally:
            os.close(fd)
        _realtime(proc)
        return proc

    def record_speaker(self, rate: int) -> Recorder:
        """Record what the speaker plays, as int16 mono at ``rate``."""
        return Recorder(self, "speaker.monitor", rate)

    def close(self) -> None:
        for p in self._room:
            p.kill()
            p.wait()
            p.stdin and p.stdin.close()
        self.proc.terminate()
        try:
            self.proc.wait(5)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _realtime(proc: subprocess.Popen, priority: int = 20) -> None:
    """SCHED_FIFO for an audio process's threads where allowed (root): on a busy machine a
    starved daemon or client drops samples silently (the PortAudio client sees no xrun)."""
    if os.geteuid() == 0 and shutil.which("chrt"):
        subprocess.run(
            ["chrt", "-a", "-f", "-p", str(priority), str(proc.pid)],
            capture_output=True,
            check=False,
        )


class Recorder:
    """``parec`` from a source; ``stop()`` returns the samples recorded so far."""

    def __init__(self, server: VirtualAudio, source: str, rate: int) -> None:
        self.rate = rate
        self.proc = subprocess.Popen(
            [
                "parec",
                "-d",
                source,
                "--raw",
                "--format=s16le",
                f"--rate={rate}",
                "--channels=1",
                "--latency-msec=10",
            ],
            env=server.client_env(),
            stdout=subprocess.PIPE,
        )
        _realtime(self.proc)
        self._chunks: list[bytes] = []
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while True:
            b = self.proc.stdout.read1(4096)
            if not b:
                return
            self._chunks.append(b)

    def wait_started(self, timeout: float = 5.0) -> None:
        """Return once audio flows (parec's first stream on a fresh daemon takes ~0.5 s)."""
        deadline = time.monotonic() + timeout
        while not self._chunks:
            if time.monotonic() > deadline:
                raise TimeoutError("parec delivered nothing")
            time.sleep(0.01)

    def samples(self) -> np.ndarray:
        data = b"".join(self._chunks)
        return np.frombuffer(data[: len(data) // 2 * 2], dtype="<i2")

    def stop(self) -> np.ndarray:
        self.proc.terminate()
        self.proc.wait(5)
        self._thread.join(5)
        return self.samples()

    def __enter__(self) -> Recorder:
        self.wait_started()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.stop()
