"""Speech test material: a tiny random-weight Whisper checkpoint and real speech from espeak-ng,
converted by ffmpeg to the formats browsers and phones send."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest

SPOKEN = "what is in this photo"
# ffmpeg output options per upload format (browser MediaRecorder and phone formats).
FORMATS = {
    "wav": ["-c:a", "pcm_s16le"],
    "webm": ["-c:a", "libopus", "-b:a", "24k"],
    "ogg": ["-c:a", "libopus", "-b:a", "24k"],
    "mp3": ["-c:a", "libmp3lame", "-b:a", "32k"],
    "m4a": ["-c:a", "aac", "-b:a", "32k"],
}
MIME = {"wav": "audio/wav", "webm": "audio/webm", "ogg": "audio/ogg", "mp3": "audio/mpeg", "m4a": "audio/mp4"}


def build_tiny_whisper(
    path: Path, *, seed: int = 0, multilingual: bool = False, weight_std: float | None = None
) -> Path:
    """A one-layer Whisper, English-only vocabulary dims unless ``multilingual``, saved as
    whisper.load_model reads it. The default initialisation gives near-uniform logits, whose argmax
    changes with the batch's rounding; ``weight_std`` (about 0.25) gives every step a clear winner."""
    import torch
    import whisper.model

    from bench.speech_rtf import random_whisper

    dims = whisper.model.ModelDimensions(
        n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2, n_audio_layer=1,
        n_vocab=51865 if multilingual else 51864, n_text_ctx=448, n_text_state=64, n_text_head=2, n_text_layer=1,
    )  # fmt: skip
    model = random_whisper(dims, seed)
    if weight_std is not None:
        from tests.tiny_models import widen_weights

        widen_weights(model, weight_std)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


def need_tools() -> None:
    for tool in ("ffmpeg", "espeak-ng"):
        if shutil.which(tool) is None:
            pytest.fail(f"{tool} is not installed; run scripts/install.sh (it installs the Debian package)")


def speak(folder: Path, text: str = SPOKEN, *, speed: int = 175) -> Path:
    """Real speech as a 16 kHz mono WAV."""
    need_tools()
    raw, out = folder / "espeak.wav", folder / "speech.wav"
    subprocess.run(["espeak-ng", "-s", str(speed), "-w", str(raw), text], check=True, timeout=60)
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(raw), "-ac", "1", "-ar", "16000", str(out)],
        check=True, timeout=60,
    )  # fmt: skip
    return out


def convert(wav: Path, fmt: str) -> Path:
    out = wav.with_suffix(f".{fmt}")
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-y", "-i", str(wav), *FORMATS[fmt], str(out)],
        check=True, timeout=60,
    )  # fmt: skip
    return out


@pytest.fixture(scope="session")
def tiny_whisper(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_whisper(tmp_path_factory.mktemp("tiny-whisper") / "tiny-whisper.pt")


@pytest.fixture(scope="session")
def speech_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The spoken sentence as wav, webm/opus, ogg/opus, mp3 and m4a/aac."""
    wav = speak(tmp_path_factory.mktemp("speech"))
    return {fmt: (wav if fmt == "wav" else convert(wav, fmt)) for fmt in FORMATS}
