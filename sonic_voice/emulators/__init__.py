"""Local stand-ins for the cloud services, speaking the real wire protocols.

Only the far end is local: tests drive the real SDKs (awscrt HTTP/2, SigV4, event-stream
framing; boto3; aiortc) against these servers on loopback. Pure asyncio, no rclpy.
"""
