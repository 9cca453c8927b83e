"""Read a PCM WAV file as float32 mono at 16 kHz (no ffmpeg needed for the checks here)."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np


def read_wav_16k(path: Path) -> np.ndarray:
    with wave.open(str(path), "rb") as wf:
        if wf.getsampwidth() != 2:
            raise ValueError(f"{path}: only 16-bit PCM WAV is supported")
        rate, channels = wf.getframerate(), wf.getnchannels()
        pcm = np.frombuffer(wf.readframes(wf.getnframes()), dtype="<i2").astype(np.float32) / 32768.0
    if channels > 1:
        pcm = pcm.reshape(-1, channels).mean(axis=1)
    if rate == 16000:
        return pcm
    n = int(round(len(pcm) * 16000 / rate))
    return np.interp(np.arange(n) * (rate / 16000), np.arange(len(pcm)), pcm).astype(np.float32)
