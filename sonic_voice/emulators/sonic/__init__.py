"""Local Amazon Bedrock Nova Sonic stand-in (``InvokeModelWithBidirectionalStream``).

Library: ``async with SonicEmulator(scenario=...) as emu`` (or :class:`EmulatorThread`
for code on other loops); CLI: ``python -m sonic_voice.emulators.sonic``. See
docs/emulators.md.
"""

from sonic_voice.emulators.sonic.faults import HTTP_FAULTS, STREAM_FAULTS, Fault
from sonic_voice.emulators.sonic.records import (
    ErrorRecord,
    InputEvent,
    StreamRecord,
    ToolResultRecord,
)
from sonic_voice.emulators.sonic.scenario import Scenario, ToolCall, Turn
from sonic_voice.emulators.sonic.server import (
    DEFAULT_ACCESS_KEY,
    DEFAULT_REGION,
    DEFAULT_SECRET_KEY,
    EmulatorThread,
    SonicEmulator,
)

__all__ = [
    "DEFAULT_ACCESS_KEY",
    "DEFAULT_REGION",
    "DEFAULT_SECRET_KEY",
    "HTTP_FAULTS",
    "STREAM_FAULTS",
    "EmulatorThread",
    "ErrorRecord",
    "Fault",
    "InputEvent",
    "Scenario",
    "SonicEmulator",
    "StreamRecord",
    "ToolCall",
    "ToolResultRecord",
    "Turn",
]
