"""Audio plumbing with no ROS inside: PCM16 frames, streaming resampling, the playback
buffer and PortAudio device streams."""

from sonic_voice.audio.pcm import (
    FrameChunker,
    apply_gain,
    float_to_pcm16,
    pcm16_to_float,
    samples_per_block,
)
from sonic_voice.audio.playback import PlaybackBuffer
from sonic_voice.audio.resample import StreamResampler

__all__ = [
    "FrameChunker",
    "PlaybackBuffer",
    "StreamResampler",
    "apply_gain",
    "float_to_pcm16",
    "pcm16_to_float",
    "samples_per_block",
]
