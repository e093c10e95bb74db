"""The robot as Amazon Kinesis Video Streams WebRTC master (pure asyncio, no ROS).

``KvsMaster`` (master.py) ties together the control plane (control.py, boto3 off the loop),
the presigned signaling WebSocket (signaling.py), one aiortc peer per viewer (peer.py) and
the audio tracks (audio.py). Import the pieces from their modules; this package import stays
light so the emulator and tests can load ``settings``/``signing`` without aiortc.
"""
