"""The robot's Opus encoder (sonic_voice/kvs/opus_send.py): libopus called directly gives
the packets PyAV's encoder gave, bit for bit; the frames of silence between utterances are
encoded at a low complexity without changing what the viewer hears."""

from __future__ import annotations

import asyncio
import fractions
import time

import av
import numpy as np
import opuslib
import pytest

from sonic_voice.kvs.opus_send import (
    LibOpusEncoder,
    OpusFecTrack,
    OpusSendConfig,
    libopus,
    make_opus_encoder,
)

from test.harness.signals import best_alignment, speech_like

RATE = 24000  # Nova Sonic's rate, which the robot feeds libopus at (kvs/peer.py)


def _pyav_packets(cfg: OpusSendConfig, pcm: np.ndarray) -> list[bytes]:
    enc = make_opus_encoder(cfg)
    f = cfg.input_rate // 50
    tb = fractions.Fraction(1, cfg.input_rate)
    out = []
    for i in range(len(pcm) // f):
        frame = av.AudioFrame.from_ndarray(
            pcm[i * f : (i + 1) * f].reshape(1, -1), format="s16", layout="mono"
        )
        frame.sample_rate = cfg.input_rate
        frame.time_base = tb
        frame.pts = i * f
        out += [bytes(p) for p in enc.encode(frame)]
    return out


@pytest.mark.parametrize(
    "cfg",
    [
        OpusSendConfig(input_rate=RATE),
        OpusSendConfig(),
        OpusSendConfig(input_rate=RATE, complexity=5, bitrate=24000, packet_loss_pct=20),
        OpusSendConfig(input_rate=RATE, fec=False, dtx=True),
        OpusSendConfig(bitrate=96000),  # CELT/hybrid: VBR constraint and more matter
    ],
    ids=["24k", "48k", "c5-24kbps-20pct", "nofec-dtx", "48k-96kbps"],
)
def test_direct_libopus_gives_pyavs_packets_bit_for_bit(cfg: OpusSendConfig) -> None:
    speech = speech_like(3.0, cfg.input_rate, seed=5)
    speech[len(speech) // 3 : len(speech) // 2] = 0  # a pause inside
    want = _pyav_packets(cfg, speech)
    enc = LibOpusEncoder(cfg)
    f = cfg.input_rate // 50
    got = [bytes(enc.encode_pcm(speech[i * f : (i + 1) * f], i * f)) for i in range(len(want))]
    assert len(want) == len(speech) // f
    same = sum(a == b for a, b in zip(want, got, strict=True))
    assert same == len(want), f"{same} of {len(want)} packets identical ({libopus()._name})"


def test_libopus_is_the_one_pyav_uses_or_the_systems() -> None:
    version = libopus().opus_get_version_string().decode()
    assert version.startswith("libopus 1."), version


def test_config_rejects_out_of_range_complexity() -> None:
    with pytest.raises(ValueError, match=r"silence_complexity must be 0\.\.10"):
        OpusSendConfig(silence_complexity=11)
    with pytest.raises(ValueError, match=r"complexity must be 0\.\.10"):
        OpusSendConfig(complexity=-1)


async def _run_track(cfg: OpusSendConfig, parts: list[np.ndarray]) -> tuple[list[bytes], list]:
    """Push ``parts`` (speech, or None for that many frames of nothing queued) and take the
    track's packets without waiting for real time; also each packet's encoder complexity."""
    track = OpusFecTrack(cfg)
    packets: list[bytes] = []
    complexities: list[int] = []
    f = cfg.input_rate // 50
    for part in parts:
        if isinstance(part, int):
            n = part
        else:
            track.push(part, RATE)
            n = len(part) // f
        for _ in range(n):
            track._start = time.monotonic() - track._pts / track.rate  # due now
            packets.append(bytes(await track.recv()))
            complexities.append(track._enc.complexity)
    track.stop()
    return packets, complexities


def _decode(packets: list[bytes]) -> np.ndarray:
    dec = opuslib.Decoder(48000, 1)
    return np.concatenate([np.frombuffer(dec.decode(p, 960), dtype="<i2") for p in packets]).astype(
        np.int16
    )


@pytest.mark.parametrize("adaptive", [False, True], ids=["libopus", "opuslib"])
def test_silence_at_low_complexity_sounds_the_same(adaptive: bool) -> None:
    first = speech_like(1.0, RATE, seed=11)
    second = speech_like(1.5, RATE, seed=12)
    parts = [first, 50, second, 20]  # 1 s of speech, 1 s of nothing, 1.5 s, 0.4 s
    low_cfg = OpusSendConfig(input_rate=RATE, adaptive=adaptive, silence_complexity=0)
    full_cfg = OpusSendConfig(input_rate=RATE, adaptive=adaptive, silence_complexity=None)
    low, low_c = asyncio.run(_run_track(low_cfg, parts))
    full, full_c = asyncio.run(_run_track(full_cfg, parts))
    assert len(low) == len(full) == 50 + 50 + 75 + 20
    # The encoder went down after pause_after silent frames and back up for the speech.
    assert low_c[50 : 50 + low_cfg.pause_after] == [10] * low_cfg.pause_after
    assert set(low_c[50 + low_cfg.pause_after + 1 : 100]) == {0}
    assert set(low_c[100:175]) == {10} and set(full_c) == {10}
    a, b = _decode(low), _decode(full)
    pause = slice(60 * 960, 100 * 960)  # after the last word's tail has decayed
    assert np.abs(a[pause]).max() <= max(8, np.abs(b[pause]).max()), "the pause is not silent"
    ref = np.repeat(second, 2)  # 48 kHz reference of the speech after the pause
    tail = slice(100 * 960, 180 * 960)
    _, ncc_low = best_alignment(ref, a[tail])
    _, ncc_full = best_alignment(ref, b[tail])
    assert ncc_full >= 0.9, f"full complexity: ncc {ncc_full:.3f}"
    assert ncc_low >= ncc_full - 0.01, f"after a quiet pause ncc {ncc_low:.3f} vs {ncc_full:.3f}"


@pytest.mark.parametrize("adaptive", [False, True], ids=["libopus", "opuslib"])
def test_packets_carry_fec_by_the_expected_loss_they_are_told(adaptive: bool) -> None:
    """libopus adds the LBRR copy of the previous frame only when its expected loss is over
    0 (and then on the voiced frames: ~60 % of this signal's): the configured
    ``packet_loss_pct`` must reach the encoder (both of them)."""
    from sonic_voice.kvs.jitter import packet_has_fec

    speech = [speech_like(1.0, RATE, seed=13)]
    for pct, want in ((10, True), (0, False)):
        cfg = OpusSendConfig(input_rate=RATE, adaptive=adaptive, packet_loss_pct=pct)
        packets, _ = asyncio.run(_run_track(cfg, speech))
        with_fec = sum(packet_has_fec(p) for p in packets[5:])
        assert (with_fec > 0.3 * len(packets[5:])) if want else with_fec == 0, (pct, with_fec)
