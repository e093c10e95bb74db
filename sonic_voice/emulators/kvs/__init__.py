"""Local stand-in for KVS WebRTC signaling (control plane + signaling WebSocket).

``KvsEmulator`` runs on the caller's asyncio loop; ``KvsEmulatorThread`` runs one on its own
loop in a thread (for node tests and for callers whose loop makes blocking boto3 calls);
``python -m sonic_voice.emulators.kvs`` runs one as a process (for browser tests and benches).
"""

from sonic_voice.emulators.kvs.server import MALFORMED, MASTER, ApiError, KvsEmulator, Routed
from sonic_voice.emulators.kvs.thread import KvsEmulatorThread

__all__ = ["MALFORMED", "MASTER", "ApiError", "KvsEmulator", "KvsEmulatorThread", "Routed"]
