"""Audio in: raw PCM16 frames and uploaded files to 16 kHz mono float32, and the checks every
utterance passes before it reaches the speech model.

Files are decoded by the ``ffmpeg`` program (Debian package ``ffmpeg``) in a subprocess: webm/opus,
ogg, wav, mp3, m4a and anything else ffmpeg reads. Every fault is an ``AudioError`` with a code from
``assistant.protocol.ErrorCode``.
"""

from __future__ import annotations

import io
import shutil
import subprocess
import tempfile
import wave
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from assistant.protocol import ErrorCode

SAMPLE_RATE = 16_000
PCM16_BYTES_PER_SECOND = SAMPLE_RATE * 2


class AudioError(Exception):
    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class AudioLimits:
    max_seconds: float  # longest utterance or file
    max_bytes: int  # largest upload or stream, in bytes as received
    silence_rms: float  # below this RMS (full scale 1.0) the audio counts as silent


def pcm16_to_float(data: bytes) -> np.ndarray:
    """Little-endian mono PCM16 to float32 in [-1, 1]."""
    if len(data) % 2:
        raise AudioError(
            ErrorCode.audio_format_invalid,
            f"PCM16 audio has an odd number of bytes ({len(data)}); send whole 16-bit little-endian samples",
        )
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


def float_to_wav(samples: np.ndarray) -> bytes:
    """16 kHz mono float32 to a PCM16 WAV file (how streamed audio is kept as an attachment)."""
    pcm = (np.clip(samples, -1.0, 1.0) * 32767.0).astype("<i2")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
        w.writeframes(pcm.tobytes())
    return buf.getvalue()


def ffmpeg_path() -> str:
    path = shutil.which("ffmpeg")
    if path is None:
        raise AudioError(
            ErrorCode.audio_undecodable,
            "the server cannot decode audio files: the ffmpeg program is not installed (apt-get install ffmpeg)",
        )
    return path


def decode_file(data: bytes, *, max_seconds: float | None = None, timeout: float = 60.0) -> np.ndarray:
    """Any audio file ffmpeg reads to 16 kHz mono float32. Blocking: call it in a thread.

    With ``max_seconds`` ffmpeg stops one second past it, so a small file holding hours of audio
    cannot fill memory; the result is then longer than the limit and ``check_samples`` refuses it.

    The bytes go through a temporary file, not a pipe, because MP4/M4A files often keep their index
    at the end, which ffmpeg cannot reach on a pipe."""
    if not data:
        raise AudioError(ErrorCode.audio_empty, "the audio file is empty")
    exe = ffmpeg_path()
    with tempfile.TemporaryDirectory(prefix="audio-") as tmp:
        src = Path(tmp) / "input"
        src.write_bytes(data)
        cmd = [exe, "-nostdin", "-hide_banner", "-loglevel", "error", "-i", str(src), "-vn", "-map", "0:a:0",
               "-f", "f32le", "-acodec", "pcm_f32le", "-ac", "1", "-ar", str(SAMPLE_RATE)]  # fmt: skip
        if max_seconds is not None:
            cmd += ["-t", f"{max_seconds + 1:g}"]
        cmd.append("pipe:1")
        try:
            proc = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired:
            raise AudioError(ErrorCode.audio_undecodable, f"decoding the audio took longer than {timeout:.0f} s") from None
    if proc.returncode != 0:
        reason = proc.stderr.decode(errors="replace").strip().splitlines()
        detail = reason[-1][:200] if reason else f"ffmpeg exited with {proc.returncode}"
        raise AudioError(
            ErrorCode.audio_undecodable,
            f"the file is not audio ffmpeg can decode ({detail}); send webm/opus, ogg, wav, mp3 or m4a",
        )
    usable = len(proc.stdout) - len(proc.stdout) % 4
    return np.frombuffer(proc.stdout[:usable], dtype="<f4").astype(np.float32)


def check_samples(samples: np.ndarray, limits: AudioLimits) -> float:
    """Reject empty, too long and silent audio; returns the duration in milliseconds."""
    if samples.size == 0:
        raise AudioError(ErrorCode.audio_empty, "no audio was received")
    seconds = samples.size / SAMPLE_RATE
    if seconds > limits.max_seconds:
        raise AudioError(
            ErrorCode.audio_too_long, f"the audio is {seconds:.1f} s long; the limit is {limits.max_seconds:g} s"
        )
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64))))
    if rms < limits.silence_rms:
        raise AudioError(
            ErrorCode.audio_silent,
            f"the audio is silent (RMS {rms:.5f} < {limits.silence_rms:g}); check the microphone",
        )
    return round(seconds * 1000, 1)


def check_size(n_bytes: int, limits: AudioLimits) -> None:
    if n_bytes > limits.max_bytes:
        raise AudioError(ErrorCode.audio_too_large, f"the audio is {n_bytes} bytes; the limit is {limits.max_bytes}")
