"""The speech worker: loads through whisper.load_model, decodes concurrent utterances in one batch,
sends long audio through chunked transcription, and reports a model it cannot load."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future
from pathlib import Path

import numpy as np
import pytest

from assistant.audio import decode_file
from skills.base import SkillError
from skills.speech import SpeechSkill
from skills.speech_worker import SpeechWorker, SpeechWorkerOptions, _Request


@pytest.fixture(scope="module")
def worker(tiny_whisper: Path):  # noqa: ANN201
    w = SpeechWorker(SpeechWorkerOptions(model=str(tiny_whisper), device="cpu", max_tokens=6, batch_wait_ms=50))
    w.load()
    yield w
    w.close()


@pytest.fixture(scope="module")
def utterance(speech_files) -> np.ndarray:  # noqa: ANN001
    return decode_file(speech_files["wav"].read_bytes())


def test_concurrent_utterances_are_decoded_together(worker: SpeechWorker, utterance: np.ndarray) -> None:
    calls_before = worker.decode_calls
    others = [utterance * g for g in (0.5, 0.8, 1.0, 1.2, 1.5)]
    futures = [worker.submit(a) for a in [utterance, *others, utterance]]
    results = [f.result(timeout=120) for f in futures]
    assert all(r.text and r.tokens <= 6 and r.language == "en" for r in results)
    # Seven requests, far fewer decode passes: they shared batches.
    assert worker.decode_calls - calls_before < len(futures)
    assert max(worker.batch_sizes) >= 2
    # The same audio gives the same transcript wherever it sits in a batch.
    assert results[0].text == results[-1].text


def test_a_lone_utterance_starts_at_once_and_company_is_awaited_while_utterances_come_together(
    tiny_whisper: Path, utterance: np.ndarray
) -> None:
    # A speaker alone: with ten minutes to wait for company, the utterance is still decoded at once.
    alone = SpeechWorker(SpeechWorkerOptions(model=str(tiny_whisper), device="cpu", max_tokens=6, batch_wait_ms=600_000))
    alone.load()
    try:
        assert alone.submit(utterance).result(timeout=60).text
        assert alone.submit(utterance * 0.5).result(timeout=60).text
        assert list(alone.batch_sizes) == [1, 1]
    finally:
        alone.close()

    # Once a batch had company, the next lone utterance waits for the one that arrives 0.3 s later.
    busy = SpeechWorker(SpeechWorkerOptions(model="unused", batch_size=2, batch_wait_ms=30_000))
    utterances = [_Request(utterance, Future()) for _ in range(4)]
    busy._queue.put(utterances[1])
    assert busy._next_batch(utterances[0]) == ([utterances[0], utterances[1]], False)
    threading.Timer(0.3, busy._queue.put, [utterances[3]]).start()
    assert busy._next_batch(utterances[2]) == ([utterances[2], utterances[3]], False)


def test_audio_over_30_seconds_goes_through_chunked_transcription(worker: SpeechWorker, utterance) -> None:  # noqa: ANN001
    long = np.concatenate([utterance, np.zeros(16_000, np.float32)] * 14)  # ~34 s
    assert long.size > 30 * 16_000
    before = worker.transcribe_calls
    result = worker.submit(long).result(timeout=120)
    assert worker.transcribe_calls == before + 1 and result.text


def test_a_missing_model_makes_the_skill_unavailable_and_says_which_setting(tmp_path: Path) -> None:
    async def scenario() -> None:
        skill = SpeechSkill(SpeechWorkerOptions(model=str(tmp_path / "nope.pt"), device="cpu"))
        await skill.start()
        st = skill.status()
        assert st.state == "unavailable" and "ASSISTANT_SPEECH_MODEL" in (st.detail or "")
        with pytest.raises(SkillError) as err:
            await skill.transcribe(np.ones(16_000, np.float32))
        assert err.value.code == "skill_unavailable"
        unknown = SpeechSkill(SpeechWorkerOptions(model="no-such-whisper", device="cpu"))
        await unknown.start()
        assert unknown.status().state == "unavailable" and "tiny" in (unknown.status().detail or "")

    asyncio.run(scenario())
