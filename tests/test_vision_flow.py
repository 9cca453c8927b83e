"""Images in a conversation, over a real websocket: caption, VQA, follow-ups about earlier images,
chat that sees what the vision skills said, overrides, refusals and batching across sessions."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from state.store import title_from
from skills.vision_worker import VisionWorker, VisionWorkerOptions
from tests.conftest import LiveServer, make_settings, start_server, ws_client
from tests.photos import auth, photo, upload
from tests.tiny_vision_models import build_tiny_blip


@pytest.fixture(scope="module")
def blip(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-blip")
    return {task: build_tiny_blip(root / task, task=task) for task in ("caption", "vqa")}


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path, blip: dict[str, Path]) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("vision"),
        tiny_chat_model,
        caption_model=str(blip["caption"]),
        vqa_model=str(blip["vqa"]),
        vision_device="cpu",
        vision_max_new_tokens=5,
        vision_batch_wait_ms=100,
        chat_context_tokens=2048,
    )
    srv = start_server(settings)
    yield srv
    srv.stop()


def sync(fn: Callable) -> Callable:
    """Run an async test body on a fresh event loop (the suite does not use pytest-asyncio)."""

    @functools.wraps(fn)
    def run(*args: object, **kwargs: object) -> None:
        asyncio.run(fn(*args, **kwargs))

    return run


def uploaded(live: LiveServer, token: str, session_id: str, name: str, fmt: str = "JPEG") -> str:
    r = upload(live.http, token, session_id, photo(name, fmt))
    assert r.status_code == 201, r.text
    return r.json()["id"]


async def routed_and_done(client, session_id: str, text: str, **extra: object) -> tuple[dict, dict]:  # noqa: ANN001
    turn_id, done = await client.turn(session_id, text, **extra)
    routed = next(e for e in client.events if e["type"] == "turn.routed" and e["turn_id"] == turn_id)
    return routed, done


def test_vision_skills_are_ready_and_listed(live: LiveServer) -> None:
    health = httpx.get(f"{live.http}/healthz").json()
    assert health["skills"]["caption"]["state"] == "ready" and health["skills"]["vqa"]["state"] == "ready"


@sync
async def test_a_conversation_about_two_photos(live: LiveServer) -> None:
    token = live.token("alice")
    async with ws_client(live, token) as c:
        assert c.hello["limits"]["max_image_bytes"] == live.settings.image_max_bytes
        sid = await c.new_session()
        astronaut = uploaded(live, token, sid, "astronaut")
        coffee = uploaded(live, token, sid, "coffee", "PNG")

        # 1. A photo with no text: captioned.
        routed, done = await routed_and_done(c, sid, "", attachment_ids=[astronaut])
        assert (routed["skill"], routed["attachment_id"], routed["overridden"]) == ("caption", astronaut, False)
        assert routed["confidence"] >= 0.9 and "no text" in routed["reason"]
        assert done["status"] == "completed" and done["skill"] == "caption" and done["text"]
        caption = done["text"]

        # 2. A second photo with a question: VQA about that photo.
        routed, done = await routed_and_done(c, sid, "how many people are there?", attachment_ids=[coffee])
        assert (routed["skill"], routed["attachment_id"]) == ("vqa", coffee)
        assert done["status"] == "completed" and done["text"] and done["usage"]["completion_tokens"] == 5
        answer_2 = done["text"]

        # 3. A follow-up about the first photo repeats the question about image 1.
        routed, done = await routed_and_done(c, sid, "and in the first photo?")
        assert (routed["skill"], routed["attachment_id"]) == ("vqa", astronaut)
        assert "image 1" in routed["reason"] and "how many people are there?" in routed["reason"]
        answer_3 = done["text"]

        # 4. "it" is the image the conversation is about now: the first one.
        routed, done = await routed_and_done(c, sid, "what colour is it?")
        assert (routed["skill"], routed["attachment_id"]) == ("vqa", astronaut)
        answer_4 = done["text"]

        # 5. An instruction goes to chat, whose prompt holds what the vision skills said.
        routed, done = await routed_and_done(c, sid, "write a short poem about it")
        assert routed["skill"] == "chat" and "attachment_id" not in routed
        assert done["status"] == "completed"
        prompt = live.app.state.skills["chat"].worker.recent_prompts[-1][1]  # type: ignore[attr-defined]
        assert "[image 1]" in prompt and "[image 2] how many people are there?" in prompt
        assert "[image 1] and in the first photo?" in prompt and "[image 1] what colour is it?" in prompt
        for said in (caption, answer_2, answer_3, answer_4):
            assert said in prompt
        assert prompt.index(caption) < prompt.index(answer_2) < prompt.rindex("write a short poem about it")

        # 6. Overrides win and are stored with the turn: a /command and the protocol's field.
        routed, done = await routed_and_done(c, sid, "/ask what is on the table?")
        assert (routed["skill"], routed["attachment_id"], routed["overridden"]) == ("vqa", astronaut, True)
        routed, done = await routed_and_done(c, sid, "what is in the second picture?", skill="chat")
        assert (routed["skill"], routed["overridden"], routed["confidence"]) == ("chat", True, 1.0)
        routed, done = await routed_and_done(c, sid, "", skill="caption", attachment_ids=[coffee])
        assert (routed["skill"], routed["attachment_id"], routed["overridden"]) == ("caption", coffee, True)

    stored = httpx.get(f"{live.http}/v1/sessions/{sid}/messages", headers=auth(token)).json()
    assert stored["session"]["title"] == title_from(caption, capitalise=True)  # a photo alone: named by its caption
    history = stored["messages"]
    replies = [m for m in history if m["role"] == "assistant"]
    assert [m["skill"] for m in replies] == ["caption", "vqa", "vqa", "vqa", "chat", "vqa", "chat", "caption"]
    assert [m["skill_override"] for m in replies] == [None] * 5 + ["vqa", "chat", "caption"]
    assert replies[2]["attachment_ids"] == [astronaut] and replies[2]["route_reason"]
    assert [m["attachment_ids"] for m in history if m["role"] == "user"][:2] == [[astronaut], [coffee]]


@sync
async def test_turns_with_unknown_or_foreign_images_are_refused(live: LiveServer) -> None:
    alice, bob = live.token("alice"), live.token("bob")
    async with ws_client(live, bob) as b:
        bob_sid = await b.new_session()
    bobs_photo = uploaded(live, bob, bob_sid, "rocket")
    async with ws_client(live, alice) as c:
        sid = await c.new_session()
        other_sid = await c.new_session()
        own_elsewhere = uploaded(live, alice, other_sid, "chelsea")
        for ids in ([bobs_photo], ["no-such-id"], [own_elsewhere]):
            eid = await c.send(type="turn.create", session_id=sid, text="what is this?", attachment_ids=ids)
            err = await c.until(lambda e, eid=eid: e.get("event_id") == eid)
            assert err["type"] == "error" and err["code"] == "attachment_not_found", err
        # Nothing was stored, and the connection still works.
        _, done = await c.turn(sid, "hello")
        assert done["status"] == "completed"
    history = httpx.get(f"{live.http}/v1/sessions/{sid}/messages", headers=auth(alice)).json()["messages"]
    assert [m["text"] for m in history if m["role"] == "user"] == ["hello"]


@sync
async def test_asking_about_a_picture_when_there_is_none(live: LiveServer) -> None:
    async with ws_client(live, live.token("alice")) as c:
        sid = await c.new_session()
        routed, done = await routed_and_done(c, sid, "what is in the picture?")
        assert routed["skill"] == "chat" and "no image" in routed["reason"] and done["status"] == "completed"
        for extra in ({"skill": "vqa"}, {"skill": "caption"}):
            routed, done = await routed_and_done(c, sid, "what is this?", **extra)
            assert routed["skill"] == extra["skill"] and "attachment_id" not in routed
            assert done["status"] == "failed" and done["error"]["code"] == "no_image", done
            assert "upload" in done["error"]["message"]


@sync
async def test_images_from_many_sessions_share_one_generate_call(live: LiveServer) -> None:
    token = live.token("carol")
    worker = live.app.state.skills["caption"].worker  # type: ignore[attr-defined]
    async with ws_client(live, token) as c:
        sessions = [await c.new_session() for _ in range(6)]
        ids = [uploaded(live, token, sid, name) for sid, name in zip(sessions, ["astronaut", "chelsea", "coffee"] * 2)]
        seen = len(worker.batch_sizes)
        for sid, i in zip(sessions, ids):  # all at once, before any reply
            await c.send(type="turn.create", session_id=sid, text="", attachment_ids=[i])
        dones = [await c.until_type("response.done", timeout=60) for _ in sessions]
    assert all(done["status"] == "completed" and done["text"] for done in dones)
    assert {done["session_id"] for done in dones} == set(sessions)
    batches = list(worker.batch_sizes)[seen:]
    assert sum(batches) == 6 and max(batches) >= 3, batches


def test_the_worker_fails_only_the_bad_image_of_a_batch(blip: dict[str, Path]) -> None:
    async def main() -> list:
        worker = VisionWorker(VisionWorkerOptions(model=str(blip["vqa"]), task="vqa", device="cpu", max_new_tokens=3))
        await asyncio.to_thread(worker.load)
        futures = [worker.submit(photo("astronaut"), "how many people?"), worker.submit(b"\xff\xd8\xffbroken", "q")]
        futures.append(worker.submit(photo("coffee"), "what colour is the cup?"))
        out = await asyncio.gather(*futures, return_exceptions=True)
        assert list(worker.batch_sizes) == [3]
        await worker.aclose()
        return out

    good, bad, also_good = asyncio.run(main())
    assert isinstance(good, tuple) and good[0] and good[1] == 3 and isinstance(also_good, tuple)
    assert getattr(bad, "code", None) == "image_corrupt"


@sync
async def test_a_vision_model_that_cannot_load_leaves_the_server_serving(
    tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path, blip: dict[str, Path]
) -> None:
    tmp = tmp_path_factory.mktemp("no-caption")
    settings = make_settings(tmp, tiny_chat_model, caption_model=str(tmp / "missing"), vqa_model=str(blip["vqa"]))
    srv = await asyncio.to_thread(start_server, settings)
    try:
        health = httpx.get(f"{srv.http}/healthz").json()
        assert health["status"] == "degraded" and health["skills"]["vqa"]["state"] == "ready"
        caption = health["skills"]["caption"]
        assert caption["state"] == "unavailable" and "ASSISTANT_CAPTION_MODEL" in caption["detail"]
        token = srv.token("alice")
        async with ws_client(srv, token) as c:
            sid = await c.new_session()
            image = uploaded(srv, token, sid, "rocket")
            routed, done = await routed_and_done(c, sid, "", attachment_ids=[image])
            assert routed["skill"] == "caption" and done["status"] == "failed"
            assert done["error"]["code"] == "skill_unavailable" and "ASSISTANT_CAPTION_MODEL" in done["error"]["message"]
            routed, done = await routed_and_done(c, sid, "is there a rocket in the photo?")
            assert routed["skill"] == "vqa" and done["status"] == "completed" and done["text"]
    finally:
        await asyncio.to_thread(srv.stop)
