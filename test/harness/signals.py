"""Deterministic test signals and the comparisons tests make on them."""

from __future__ import annotations

import numpy as np


def speech_like(seconds: float, rate: int, seed: int = 1, level: float = 0.3) -> np.ndarray:
    """A speech-like int16 signal: a harmonic source with a gliding pitch (90-220 Hz),
    two moving formant-ish resonances, and a 4 Hz syllabic envelope with short pauses.

    Broadband and non-periodic enough that cross-correlation finds one clear peak.
    """
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    f0 = 150 + 60 * np.sin(2 * np.pi * 0.7 * t + rng.uniform(0, 6)) + 10 * rng.standard_normal()
    phase = 2 * np.pi * np.cumsum(f0) / rate
    x = np.zeros(n)
    for k in range(1, 25):
        fk = k * f0
        formants = np.exp(-(((fk - (500 + 200 * np.sin(2 * np.pi * 1.3 * t))) / 250) ** 2))
        formants += 0.6 * np.exp(-(((fk - (1500 + 400 * np.sin(2 * np.pi * 0.9 * t))) / 400) ** 2))
        x += (formants + 0.02) * np.sin(k * phase + rng.uniform(0, 6)) / k**0.5
    x += 0.05 * rng.standard_normal(n)  # breath/fricative noise
    env = np.clip(np.sin(2 * np.pi * 4 * t + rng.uniform(0, 6)), 0, None) ** 0.6
    gate = (np.sin(2 * np.pi * 0.5 * t) > -0.8).astype(float)
    x *= env * gate
    x /= np.max(np.abs(x)) + 1e-9
    return np.round(x * level * 32767).astype(np.int16)


def silence(seconds: float, rate: int) -> np.ndarray:
    return np.zeros(int(seconds * rate), dtype=np.int16)


def best_alignment(reference: np.ndarray, recording: np.ndarray) -> tuple[int, float]:
    """Lag (in samples) of ``reference`` inside ``recording`` and the normalized
    cross-correlation at that lag (1.0 = identical shape)."""
    ref = reference.astype(np.float64)
    rec = recording.astype(np.float64)
    if len(rec) < len(ref):
        rec = np.concatenate((rec, np.zeros(len(ref) - len(rec))))
    nfft = 1 << int(np.ceil(np.log2(len(rec) + len(ref))))
    corr = np.fft.irfft(np.fft.rfft(rec, nfft) * np.conj(np.fft.rfft(ref, nfft)), nfft)
    corr = corr[: len(rec) - len(ref) + 1]
    lag = int(np.argmax(corr))
    seg = rec[lag : lag + len(ref)]
    denom = np.linalg.norm(ref) * np.linalg.norm(seg)
    return lag, float(np.dot(ref, seg) / denom) if denom else 0.0


def chunk_correlations(
    reference: np.ndarray, recording: np.ndarray, chunk: int, search: int, ahead: int = 0
) -> np.ndarray:
    """NCC of each ``chunk``-sample piece of ``reference`` at its own best lag, searched
    within ``search`` samples of where the previous piece was found (the first piece: of
    the global alignment). A single device glitch (an xrun that drops or repeats a few ms)
    lowers one piece, not the whole signal; corruption by the code under test (lost or
    reordered blocks, resampler state errors) lowers many.

    ``ahead``: a piece not found (NCC < 0.5) is looked for up to ``ahead`` samples later
    too, never earlier: an adaptive jitter buffer that deepens after a stall inserts whole
    20 ms frames, and on a loaded machine 140 ms at once made every later piece look lost
    (down to 0.06) against a fixed search window. Time never runs backwards, so reordered
    blocks still fail. A piece found with NCC below 0.5 does not move the search."""
    lag, _ = best_alignment(reference, recording)
    out = []
    for start in range(0, len(reference) - chunk + 1, chunk):
        piece = reference[start : start + chunk]
        if not np.any(piece):
            continue
        lo = max(0, lag + start - search)
        window = recording[lo : lag + start + chunk + search]
        if len(window) < chunk:
            out.append(0.0)
            continue
        at, ncc = best_alignment(piece, window)
        found = lo + at
        if ncc < 0.5 and ahead:
            wide = recording[lo : lag + start + chunk + search + ahead]
            at2, ncc2 = best_alignment(piece, wide)
            if ncc2 > ncc:
                found, ncc = lo + at2, ncc2
        out.append(ncc)
        if ncc >= 0.5:
            lag = found - start
    return np.array(out)


def silent_runs(x: np.ndarray, min_len: int = 3, threshold: int = 0) -> int:
    """How many runs of at least ``min_len`` samples with ``|x| <= threshold``."""
    quiet = np.abs(x.astype(np.int32)) <= threshold
    if not quiet.any():
        return 0
    edges = np.diff(np.concatenate(([0], quiet.astype(np.int8), [0])))
    starts, ends = np.where(edges == 1)[0], np.where(edges == -1)[0]
    return int(((ends - starts) >= min_len).sum())


def longest_silent_run(x: np.ndarray, threshold: int = 0) -> int:
    """Length of the longest run of samples with ``|x| <= threshold``."""
    quiet = np.abs(x.astype(np.int32)) <= threshold
    if not quiet.any():
        return 0
    edges = np.diff(np.concatenate(([0], quiet.astype(np.int8), [0])))
    starts, ends = np.where(edges == 1)[0], np.where(edges == -1)[0]
    return int((ends - starts).max())
