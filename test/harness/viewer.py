"""An aiortc KVS *viewer* for tests and benchmarks: the browser's role, in Python.

It joins through the same control plane and presigned signaling WebSocket as a real viewer
(boto3 against the stand-in, botocore presigning with ``X-Amz-ClientId``), offers audio
(sendrecv) and a data channel, records what it hears with arrival times, and can trickle
its candidates (some before the offer) the way browsers do, to exercise the master's
candidate buffering.

Also runnable as a process (``python -m test.harness.viewer ...``): it prints ``connected``
once its peer is up and then streams speech until killed, so a test can make a viewer
vanish with SIGKILL (no DTLS close, no goodbye) or a bench can load the master.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import sys
import time
from typing import Any

import numpy as np
import websockets
from aiortc import RTCConfiguration, RTCPeerConnection, RTCSessionDescription

from sonic_voice.kvs.audio import PacedAudioTrack, frame_to_mono
from sonic_voice.kvs.control import ControlPlane
from sonic_voice.kvs.master import split_candidates
from sonic_voice.kvs.peer import parse_candidate
from sonic_voice.kvs.settings import KvsSettings

TEST_KEY = "AKIDVIEWERTEST"
TEST_SECRET = "test-secret"


def b64(obj: dict[str, Any]) -> str:
    return base64.b64encode(json.dumps(obj).encode()).decode()


class Viewer:
    """``await Viewer(endpoint_url, channel, client_id).join()``; ``say()``; ``heard()``."""

    def __init__(
        self,
        endpoint_url: str,
        channel: str,
        client_id: str,
        *,
        region: str = "us-west-2",
        send_rate: int = 16000,
        trickle: bool = False,
        secret: str = TEST_SECRET,
        config: RTCConfiguration | None = None,
    ) -> None:
        self.settings = KvsSettings(
            channel,
            region=region,
            endpoint_url=endpoint_url,
            access_key_id=TEST_KEY,
            secret_access_key=secret,
        )
        self.client_id = client_id
        self.trickle = trickle
        self.pc = RTCPeerConnection(config or RTCConfiguration(iceServers=[]))
        self.mic = PacedAudioTrack(send_rate)
        self.frames: list[tuple[float, np.ndarray]] = []  # (arrival, 48 kHz mono)
        self.frame_pts: list[int] = []  # RTP timestamp (48 kHz) of each frame in ``frames``
        self.messages: list[dict[str, Any]] = []
        self.signals: list[dict[str, Any]] = []  # every frame from the service
        self.connected = asyncio.Event()
        self.answered = asyncio.Event()
        self._ws: Any = None
        self._tasks: list[asyncio.Task] = []
        self._got_message = asyncio.Event()
        self.channel = self.pc.createDataChannel("kvsDataChannel")
        self.channel.on("message", self._on_message)
        self.channel_open = asyncio.Event()
        self.channel.on("open", self.channel_open.set)
        self.pc.addTrack(self.mic)
        self.pc.on("track", self._on_track)
        self.pc.on("connectionstatechange", self._on_state)

    # -- joining ------------------------------------------------------------------------
    async def join(self, timeout: float = 20.0) -> Viewer:  # noqa: ASYNC109
        control = await asyncio.to_thread(ControlPlane, self.settings, "VIEWER")
        url = await asyncio.to_thread(control.presigned_url, self.client_id)
        self._ws = await websockets.connect(url, proxy=None)
        self._tasks.append(asyncio.create_task(self._read(), name=f"viewer-{self.client_id}"))
        await self.pc.setLocalDescription(await self.pc.createOffer())
        sdp = self.pc.localDescription.sdp
        if self.trickle:
            stripped, cands = split_candidates(sdp)
            early, late = cands[:1], cands[1:]
            for c in early:  # before the offer: the master must buffer it
                await self._send("ICE_CANDIDATE", c)
            await self._send("SDP_OFFER", {"type": "offer", "sdp": stripped})
            for c in late:
                await self._send("ICE_CANDIDATE", c)
        else:
            await self._send("SDP_OFFER", {"type": "offer", "sdp": sdp})
        await asyncio.wait_for(self.connected.wait(), timeout)
        await asyncio.wait_for(self.channel_open.wait(), timeout)
        return self

    async def _send(self, action: str, payload: dict[str, Any]) -> None:
        await self._ws.send(json.dumps({"action": action, "messagePayload": b64(payload)}))

    async def _read(self) -> None:
        with contextlib.suppress(websockets.ConnectionClosed):
            async for text in self._ws:
                if not text.strip():
                    continue
                frame = json.loads(text)
                self.signals.append(frame)
                kind = frame.get("messageType")
                payload = frame.get("messagePayload")
                body = json.loads(base64.b64decode(payload)) if payload else None
                if kind == "SDP_ANSWER":
                    await self.pc.setRemoteDescription(RTCSessionDescription(body["sdp"], "answer"))
                    self.answered.set()
                elif kind == "ICE_CANDIDATE":
                    await self.answered.wait()
                    cand = parse_candidate(body)
                    if cand is not None:
                        await self.pc.addIceCandidate(cand)

    def _on_state(self) -> None:
        if self.pc.connectionState == "connected":
            self.connected.set()

    def _on_track(self, track: Any) -> None:
        async def record() -> None:
            from aiortc.mediastreams import MediaStreamError

            while True:
                try:
                    frame = await track.recv()
                except MediaStreamError:
                    return
                self.frames.append((time.monotonic(), frame_to_mono(frame)))
                self.frame_pts.append(int(frame.pts or 0))

        if track.kind == "audio":
            self._tasks.append(asyncio.create_task(record()))

    def _on_message(self, raw: str | bytes) -> None:
        with contextlib.suppress(ValueError):
            self.messages.append(json.loads(raw))
            self._got_message.set()

    # -- use ----------------------------------------------------------------------------
    def say(self, samples: np.ndarray) -> None:
        """Queue speech (int16 at ``send_rate``) on the microphone track."""
        self.mic.push(samples)

    def heard(self, since: float = 0.0) -> np.ndarray:
        """Everything received (48 kHz mono) from frames that arrived after ``since``."""
        chunks = [a for t, a in self.frames if t >= since]
        return np.concatenate(chunks) if chunks else np.zeros(0, np.int16)

    def send_raw(self, text: str) -> None:
        self.channel.send(text)

    def send_json(self, obj: dict[str, Any]) -> None:
        self.channel.send(json.dumps(obj))

    async def wait_message(self, pred: Any, timeout: float = 10.0) -> dict[str, Any]:  # noqa: ASYNC109
        deadline = time.monotonic() + timeout
        while True:
            for m in self.messages:
                if pred(m):
                    return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no matching message; got {self.messages}")
            self._got_message.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._got_message.wait(), left)

    async def close(self) -> None:
        """Leave politely: the peer closes (DTLS close_notify) and the socket closes."""
        self.mic.stop()
        await self.pc.close()
        if self._ws is not None:
            await self._ws.close()
        for t in self._tasks:
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


async def _main(args: argparse.Namespace) -> None:
    from test.harness.signals import speech_like

    viewer = Viewer(args.endpoint_url, args.channel, args.client_id, region=args.region)
    await viewer.join(args.timeout)
    print("connected", flush=True)
    speech = speech_like(2.0, 16000, seed=11)
    while True:  # a talking visitor: 2 s of speech every 2 s, paced by the track
        if viewer.mic.queued_seconds < 0.5:
            viewer.say(speech)
        await asyncio.sleep(0.1)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m test.harness.viewer")
    p.add_argument("--endpoint-url", required=True)
    p.add_argument("--channel", required=True)
    p.add_argument("--client-id", required=True)
    p.add_argument("--region", default="us-west-2")
    p.add_argument("--timeout", type=float, default=30.0)
    args = p.parse_args(argv)
    try:
        asyncio.run(_main(args))
    except KeyboardInterrupt:
        pass
    except Exception as e:  # noqa: BLE001
        print(f"viewer failed: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
