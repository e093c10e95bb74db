"""kvs_webrtc on a real ROS graph: an aiortc viewer's speech on audio/remote, audio/out in
the viewer's ears, viewer count, transcripts out and chat text in."""

from __future__ import annotations

import json
import threading
import time

import numpy as np
import pytest
import soxr
from rclpy.parameter import Parameter
from std_msgs.msg import Int32, String, UInt8MultiArray

from sonic_voice.contracts import VIEWER_TEXT, VIEWERS
from sonic_voice.emulators.kvs import KvsEmulatorThread
from sonic_voice.nodes.kvs_webrtc import KvsWebrtcNode
from sonic_voice.ros.topics import (
    AUDIO_QOS,
    EVENT_QOS,
    LATCHED_QOS,
    OUT_TOPIC,
    REMOTE_TOPIC,
    msg_pcm,
    pcm_msg,
)

from test.harness.ros import wait_for
from test.harness.signals import best_alignment, silence, speech_like
from test.harness.viewer import TEST_SECRET, Viewer
from test.test_kvs_link import answer_sdp, check_viewer_speech, opus_fmtp

VIEWER_TEXT_TOPIC, VIEWERS_TOPIC = VIEWER_TEXT.name, VIEWERS.name


@pytest.fixture
def stand_in(monkeypatch):
    # boto3's default chain picks these up (conftest scrubbed any real ones).
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIDNODE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", TEST_SECRET)
    emu = KvsEmulatorThread(channels=["robot"], verify_secret=TEST_SECRET).start()
    yield emu
    emu.stop()


class Listener:
    def __init__(self, graph) -> None:
        self.node = graph.node("kvs_listener")
        self.lock = threading.Lock()
        self.remote: list[np.ndarray] = []
        self.viewers: list[int] = []
        self.texts: list[dict] = []
        self.node.create_subscription(UInt8MultiArray, REMOTE_TOPIC, self._audio, AUDIO_QOS)
        self.node.create_subscription(
            Int32, VIEWERS_TOPIC, lambda m: self.viewers.append(m.data), LATCHED_QOS
        )
        self.node.create_subscription(
            String, VIEWER_TEXT_TOPIC, lambda m: self.texts.append(json.loads(m.data)), EVENT_QOS
        )
        self.out = self.node.create_publisher(UInt8MultiArray, OUT_TOPIC, AUDIO_QOS)
        self.transcript = self.node.create_publisher(String, "transcript", EVENT_QOS)

    def _audio(self, msg: UInt8MultiArray) -> None:
        with self.lock:
            self.remote.append(msg_pcm(msg).copy())

    def audio(self) -> np.ndarray:
        with self.lock:
            return np.concatenate(self.remote) if self.remote else np.zeros(0, np.int16)


def test_viewer_audio_and_text_through_the_node(ros_graph, stand_in) -> None:
    listener = Listener(ros_graph)
    params = {
        "channel_name": "robot",
        "endpoint_url": stand_in.endpoint_url,
        "ice_servers": "[]",
    }
    node = KvsWebrtcNode(
        context=ros_graph.context,
        parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
    )
    ros_graph.add(node)
    assert node.master is not None
    assert stand_in.wait_until(lambda: stand_in.emulator.master_connected(), 15)

    async def join() -> Viewer:
        return await Viewer(stand_in.endpoint_url, "robot", "visitor").join()

    viewer = stand_in.call(join(), 30)
    try:
        assert wait_for(lambda: listener.viewers and listener.viewers[-1] == 1, 10)

        # Viewer speech -> audio/remote (16 kHz, 32 ms blocks).
        speech = speech_like(2.0, 16000, seed=21)
        n0 = len(listener.audio())
        stand_in.loop.call_soon_threadsafe(
            viewer.say, np.concatenate([silence(0.2, 16000), speech, silence(0.4, 16000)])
        )

        # audio/remote flows all along (the viewer's track sends silence between words),
        # so "2.5 s of audio" is not "the speech is in": on a loaded machine the speech
        # started later than that and was judged before it arrived (pieces 0.05-0.35,
        # whole NCC 0.07). Wait until the whole utterance is in, wherever it starts.
        def speech_in() -> bool:
            got = listener.audio()[n0:]
            if len(got) < len(speech):
                return False
            lag, _ = best_alignment(speech, got)
            return lag + len(speech) + 3200 <= len(got)

        # (Not asserted: speech that never comes fails below, with its correlations.)
        wait_for(speech_in, 30, interval=0.25)
        assert {len(b) for b in listener.remote} == {512}
        # The node runs our receive path (default); it may move whole 20 ms frames.
        check_viewer_speech(speech, listener.audio()[n0:], resilient=True)
        peer = node.master.peers["visitor"]  # (a dict read from this thread is safe)
        assert peer.rx is not None and peer.rx.stats.normal >= 100, peer.rx
        assert (
            opus_fmtp(stand_in.sync(lambda: answer_sdp(stand_in.emulator, "visitor")))[
                "useinbandfec"
            ]
            == "1"
        )

        # audio/out (24 kHz, odd chunks) -> the viewer.
        robot = speech_like(2.0, 24000, seed=22)
        t0 = time.monotonic()
        for i in range(0, len(robot), 1111):
            listener.out.publish(pcm_msg(robot[i : i + 1111]))
        expected = soxr.resample(robot, 24000, 48000)
        assert wait_for(lambda: len(viewer.heard(t0)) >= len(expected) + 9600, 20)
        lag, ncc = best_alignment(expected, viewer.heard(t0))
        assert ncc >= 0.9, f"audio/out -> viewer: ncc {ncc:.3f} at lag {lag}"

        # transcript -> data channel; chat text -> kvs/viewer_text.
        listener.transcript.publish(String(data=json.dumps({"role": "USER", "text": "hello"})))
        assert wait_for(
            lambda: any(m.get("type") == "transcript" for m in list(viewer.messages)), 10
        )
        got = next(m for m in viewer.messages if m.get("type") == "transcript")
        assert got == {"type": "transcript", "role": "USER", "text": "hello"}
        stand_in.loop.call_soon_threadsafe(
            viewer.send_json, {"type": "text", "text": "take me to the lift"}
        )
        stand_in.loop.call_soon_threadsafe(viewer.send_json, {"event": {"textInput": {}}})
        assert wait_for(lambda: listener.texts, 10)
        assert listener.texts == [
            {"type": "text", "text": "take me to the lift", "viewer": "visitor"}
        ]
    finally:
        stand_in.call(viewer.close(), 15)
    assert wait_for(lambda: listener.viewers[-1] == 0, 15)


def test_audio_path_parameters_reach_the_master(ros_graph) -> None:
    """resilient_receive / opus_fec / opus_bitrate / opus_packet_loss_pct become the master's
    settings (on by default); an out-of-range bitrate is refused by its descriptor."""

    def node_with(**params) -> KvsWebrtcNode:
        values = {"autostart": False, "channel_name": "robot", **params}
        node = KvsWebrtcNode(
            context=ros_graph.context,
            parameter_overrides=[Parameter(k, value=v) for k, v in values.items()],
        )
        ros_graph.add(node)
        return node

    s = node_with()._settings()
    assert (s.resilient_receive, s.opus_fec, s.opus_bitrate, s.opus_packet_loss_pct) == (
        True,
        True,
        32000,
        10,
    )
    node = node_with(
        resilient_receive=False, opus_fec=False, opus_bitrate=24000, opus_packet_loss_pct=20
    )
    s = node._settings()
    assert (s.resilient_receive, s.opus_fec, s.opus_bitrate, s.opus_packet_loss_pct) == (
        False,
        False,
        24000,
        20,
    )
    result = node.set_parameters([Parameter("opus_bitrate", value=1000)])[0]
    assert not result.successful and "opus_bitrate" in result.reason, result
    assert node.get_parameter("opus_bitrate").value == 24000


def test_guest_invite_service_and_qr_topic(ros_graph, stand_in) -> None:
    """~/create_invite mints a join link (in the URL fragment, never the query) for the
    stand-in's channel and publishes it as a QR code on ~/invite_qr."""
    from sensor_msgs.msg import Image
    from std_srvs.srv import Trigger

    from sonic_voice.kvs.invite import read_invite

    params = {
        "channel_name": "robot",
        "endpoint_url": stand_in.endpoint_url,
        "ice_servers": "[]",
        "invite_page_url": "https://robot.example/viewer/index.html",
    }
    node = KvsWebrtcNode(
        context=ros_graph.context,
        parameter_overrides=[Parameter(k, value=v) for k, v in params.items()],
    )
    ros_graph.add(node)
    probe = ros_graph.node("invite_probe")
    images: list[Image] = []
    probe.create_subscription(Image, "/kvs_webrtc/invite_qr", images.append, LATCHED_QOS)
    client = probe.create_client(Trigger, "/kvs_webrtc/create_invite")
    assert client.wait_for_service(timeout_sec=10)
    fut = client.call_async(Trigger.Request())
    assert wait_for(fut.done, 20)
    resp = fut.result()
    assert resp.success, resp.message
    page, _, fragment = resp.message.partition("#")
    assert page == "https://robot.example/viewer/index.html" and fragment.startswith("invite=")
    bundle = read_invite(resp.message)
    assert "X-Amz-Signature" in json.dumps(bundle) and bundle  # presigned, in the fragment
    assert wait_for(lambda: images, 10)
    img = images[-1]
    assert img.encoding == "mono8" and img.width == img.height >= 21 * 4
    assert set(bytes(img.data)) == {0, 255}
