"""Chat first on a shared GPU (skills/chat_first.py): the chat scheduler raises a flag while prompts
wait for prefill; speech and vision steps, in processes of their own, wait on it, for a bounded time."""

from __future__ import annotations

import contextlib
import multiprocessing
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from assistant.settings import Settings
from skills.base import ModelFreeSkill, SkillRequest, SkillUsage
from skills.chat_first import ChatFirst
from skills.chat_worker import ChatWorker, ChatWorkerOptions
from skills.registry import build_skills
from skills.speech_worker import SpeechWorker, SpeechWorkerOptions
from skills.vision_worker import VisionWorker, VisionWorkerOptions
from tests.photos import photo
from tests.speech_fixtures import build_tiny_whisper
from tests.tiny_models import build_tiny_chat_model
from tests.tiny_vision_models import build_tiny_blip


def _media_process(first: ChatFirst, conn: Any) -> None:
    """A stand-in media process: one hold per command, answering the seconds it waited."""
    while conn.recv() == "hold":
        conn.send(first.hold())


@contextlib.contextmanager
def media_process(first: ChatFirst) -> Iterator[Any]:
    """``_media_process`` spawned with ``first``: send it "hold", receive the seconds it waited."""
    ctx = multiprocessing.get_context("spawn")
    conn, child = ctx.Pipe()
    proc = ctx.Process(target=_media_process, args=(first, child), daemon=True)
    proc.start()
    try:
        yield conn
    finally:
        conn.send("stop")
        proc.join(10)


def test_a_media_process_waits_while_chat_prompts_wait_and_never_longer_than_its_bound() -> None:
    first = ChatFirst(max_hold_s=0.6, min_run_s=30.0)
    with media_process(first) as conn:
        conn.send("hold")
        assert conn.recv() == 0.0  # no chat prompt waits: no wait at all
        first.set(True)
        conn.send("hold")
        time.sleep(0.2)
        first.set(False)  # the prompts are prefilled: the media step goes on
        waited = conn.recv()
        assert 0.1 < waited < 0.55, waited
        first.set(True)  # the next prompts of a burst: the next step holds again ...
        conn.send("hold")
        waited = conn.recv()
        assert 0.55 < waited < 1.5, waited  # ... for at most the bound, as they keep waiting
        conn.send("hold")
        assert conn.recv() == 0.0  # then media has its run

    stuck = ChatFirst(max_hold_s=0.2, min_run_s=0.0)
    stuck.set(True)  # a flag never cleared (a chat process that died mid-prefill) costs each step at most the bound
    waited = [stuck.hold() for _ in range(3)]
    assert all(0.19 < w < 0.5 for w in waited), waited
    assert stuck.held()[0] == 3


def test_a_routed_chat_turn_holds_media_until_its_prompt_is_due() -> None:
    """The web process ``expect``s a chat turn's prompt when it routes the turn: a media process's
    next step waits from then, before the chat scheduler has seen the prompt, until the expectation
    lapses (or the scheduler's flag takes over), never longer than the bound."""
    first = ChatFirst(max_hold_s=0.6, min_run_s=0.0)
    with media_process(first) as conn:
        conn.send("hold")
        assert conn.recv() == 0.0
        first.expect(0.25)
        conn.send("hold")
        assert 0.15 < conn.recv() < 0.55  # held until the prompt was due
        conn.send("hold")
        assert conn.recv() == 0.0  # lapsed: no hold
        first.expect(0.1)
        conn.send("hold")
        time.sleep(0.05)
        first.set(True)  # the prompt reached the scheduler and waits for prefill: still held ...
        time.sleep(0.2)
        first.set(False)  # ... until it is in
        assert 0.2 < conn.recv() < 0.55
        first.expect(5.0)
        conn.send("hold")
        assert 0.55 < conn.recv() < 1.5  # an expectation never met costs at most the bound


class _ExpectingSkill(ModelFreeSkill):
    """Records whether media was already held back when each of its turns started."""

    def __init__(self, name: str, first: ChatFirst | None) -> None:
        super().__init__()
        self.name, self.first, self.held_at_run, self.expected = name, first, [], []

    def expect(self, turns: int) -> None:
        self.expected.append(turns)
        if self.first is not None:
            self.first.expect(30.0)

    async def run(self, request: SkillRequest) -> Any:
        self.held_at_run.append(self.first is not None and self.first.pending())
        return _OneWord()


class _OneWord:
    def __init__(self) -> None:
        self.usage = SkillUsage()

    def cancel(self) -> None:
        pass

    async def __aiter__(self) -> Any:
        yield "ok"


def test_admitting_a_burst_of_chat_turns_expects_their_prompts_before_any_runs(tmp_path: Path) -> None:
    """A burst's admission tells the chat skill once how many turns it will run, before the first
    runs; a burst with no chat turn does not tell it."""
    import asyncio

    from assistant import protocol as p
    from assistant.dialogue import DialogueManager
    from assistant.metrics import Metrics
    from state import store
    from state.db import make_engine, make_session_factory, upgrade
    from tests.conftest import make_settings

    first = ChatFirst()
    chat, other = _ExpectingSkill("chat", first), _ExpectingSkill("caption", None)  # a vision skill has no flag to raise
    settings = make_settings(tmp_path, tmp_path, load_models=False)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    dm = DialogueManager(settings=settings, sessions=sessions, skills={"chat": chat, "caption": other}, metrics=Metrics())
    with sessions.begin() as db:
        ann = store.get_or_create_user(db, name="ann").id

    async def scenario() -> None:
        sids = [dm.create_session(user_id=ann, title=None, sub=None, event_id=None) for _ in range(5)]
        events = [p.TurnCreate(session_id=sid, text=f"hello {i}") for i, sid in enumerate(sids[:4])]
        events.append(p.TurnCreate(session_id=sids[4], text="describe it", skill="caption"))
        await asyncio.gather(*(dm.submit_turn(user_id=ann, event=e, sub=None) for e in events))
        while dm._runners:
            await asyncio.sleep(0.01)
        await dm.submit_turn(user_id=ann, event=p.TurnCreate(session_id=sids[4], text="and now?", skill="caption"), sub=None)
        while dm._runners:
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert chat.expected == [4] and chat.held_at_run == [True] * 4
    assert other.expected == [1, 1] and len(other.held_at_run) == 2


def test_the_chat_skill_holds_media_until_the_last_expected_turn_is_handed_over(tmp_path: Path) -> None:
    """``ChatSkill.expect(n)`` holds media until n turns have started (their prompts are with the
    scheduler, whose flag takes over), then at once lets it go: a lone turn costs media next to
    nothing. An expectation that lapses forgets turns that never started."""
    import asyncio

    from skills.base import HistoryItem
    from skills.chat import ChatSkill

    first = ChatFirst()
    model = build_tiny_chat_model(tmp_path / "chat", layers=2, hidden=32, weight_std=0.35)
    options = ChatWorkerOptions(model=str(model), device="cpu", max_new_tokens=4, context_tokens=64, engine="slots",
                                chat_first=first)  # fmt: skip
    skill = ChatSkill(options, system_prompt=None, context_tokens=64)

    async def scenario() -> list[bool]:
        await skill.start()
        seen = []
        skill.expect(3)
        for i in range(3):
            seen.append(first.expecting)
            run = await skill.run(SkillRequest("s", f"t{i}", "hi", (HistoryItem("user", "earlier"),), ()))
            async for _ in run:
                pass
        seen.append(first.expecting)
        skill.expect(2)  # two turns routed, one never starts (cancelled first) ...
        run = await skill.run(SkillRequest("s", "t3", "hi", (), ()))
        async for _ in run:
            pass
        seen.append(first.expecting)
        await asyncio.sleep(0.08)  # ... the expectation lapses
        seen.append(first.expecting)
        skill.expect(1)
        await skill.run(SkillRequest("s", "t4", "hi", (), ()))
        seen.append(first.expecting)  # the forgotten turn does not keep media held
        await skill.stop()
        return seen

    assert asyncio.run(scenario()) == [True, True, True, False, True, False, False]


def test_the_slot_scheduler_raises_the_flag_while_prompts_wait_for_prefill(tmp_path: Path) -> None:
    first = ChatFirst()
    model = build_tiny_chat_model(tmp_path / "chat", layers=2, hidden=32, weight_std=0.35)
    worker = ChatWorker(ChatWorkerOptions(model=str(model), device="cpu", max_new_tokens=12, context_tokens=64,
                                          engine="slots", chat_first=first))  # fmt: skip
    worker.load()
    engine, seen, queued = worker._manager.engine, [], threading.Event()
    prefill = engine.prefill

    def watched(rows: list[int], group: list[list[int]]) -> list[int]:
        queued.wait(10)
        seen.append(first.waiting)
        return prefill(rows, group)

    engine.prefill = watched
    try:
        assert not first.waiting
        for i in range(6):
            worker._manager.add_request(input_ids=[7 + i] * 5, request_id=f"r{i}", max_new_tokens=12)
        queued.set()
        finished: set[str] = set()
        deadline = time.monotonic() + 60
        while len(finished) < 6:
            assert time.monotonic() < deadline, finished
            out = worker._manager.get_result(timeout=0.05)
            if out is not None and out.is_finished():
                finished.add(out.request_id)
        assert seen and all(seen), seen  # every prefill ran with the media processes held back
        assert not first.waiting  # and nothing waits now, so nothing holds them
    finally:
        worker.close()


def test_the_speech_model_process_holds_its_decode_steps_for_chat(tmp_path: Path) -> None:
    """The flag reaches the speech model's own process: with chat prompts waiting, its steps hold."""
    first = ChatFirst(max_hold_s=0.05, min_run_s=0.0)
    path = build_tiny_whisper(tmp_path / "w.pt", weight_std=0.25, seed=3)
    options = dict(model=str(path), device="cpu", language="en", max_tokens=8, engine="static")
    t = np.arange(32000, dtype=np.float32) / 16000
    chirp = (0.3 * np.sin(2 * np.pi * (200 + 300 * t) * t)).astype(np.float32)
    alone = SpeechWorker(SpeechWorkerOptions(**options))
    held = SpeechWorker(SpeechWorkerOptions(**options, in_process=False, chat_first=first))
    texts = {}
    for name, worker in (("alone", alone), ("held", held)):
        worker.load()
        try:
            before = first.held()
            first.set(name == "held")
            texts[name] = worker.submit(chirp).result(timeout=120).text
            after = first.held()  # counted where the model runs, read here
            holds, seconds = after[0] - before[0], after[1] - before[1]
        finally:
            first.set(False)
            worker.close()
        if name == "held":
            # Before the encoder and each decode step: the 4-token prompt, then up to 8 sampled tokens.
            assert holds >= 5 and seconds >= 0.2, (holds, seconds)
        else:
            assert (holds, seconds) == (0, 0.0)
    assert texts["held"] == texts["alone"]  # holding changes when steps run, never what they decode


def test_vision_generate_holds_before_the_encoder_and_each_step(tmp_path: Path) -> None:
    first = ChatFirst(max_hold_s=0.01, min_run_s=0.0)
    model = build_tiny_blip(tmp_path / "caption", task="caption")
    items = [(photo("astronaut"), None), (photo("coffee"), None)]
    out = {}
    for name, flag in (("alone", None), ("held", first)):
        worker = VisionWorker(VisionWorkerOptions(model=str(model), task="caption", device="cpu", max_new_tokens=4,
                                                  chat_first=flag))  # fmt: skip
        worker.load_model()
        first.set(flag is not None)
        out[name] = worker.generate_batch(items)
    first.set(False)
    assert out["held"] == out["alone"]
    assert first.held()[0] >= 1 + max(n for _, n in out["held"]), first.held()


@pytest.mark.parametrize(("setting", "on"), [("on", True), ("off", False), ("auto", False)])
def test_one_flag_is_shared_by_chat_speech_and_vision_where_chat_first_is_on(setting: str, on: bool) -> None:
    """auto: on where the chat model runs on an NVIDIA GPU (this test pins the chat model to the CPU)."""
    settings = Settings(chat_model="chat", chat_device="cpu", speech_model="base", caption_model="c", vqa_model="v",
                        chat_first=setting)  # fmt: skip
    skills = build_skills(settings)
    flags = {name: skill.worker.options.chat_first for name, skill in skills.items()}
    assert set(flags) == {"chat", "speech", "caption", "vqa"}
    if on:
        assert isinstance(flags["chat"], ChatFirst) and all(f is flags["chat"] for f in flags.values())
    else:
        assert all(f is None for f in flags.values())


def test_the_server_reports_how_long_media_waited_for_chat(tmp_path: Path, tiny_chat_model: Path) -> None:
    """/metrics counts the steps that waited for chat prefill, and the seconds they waited, in
    whichever process they ran (a media model's own)."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from tests.conftest import make_settings, start_server

    def scrape(live: Any) -> dict[str, float]:
        text = httpx.get(f"{live.http}/metrics").text
        return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name.startswith("assistant_media_chat_first")}  # fmt: skip

    live = start_server(make_settings(tmp_path, tiny_chat_model, chat_first="on"))
    try:
        first = live.app.state.skills["chat"].chat_first
        assert isinstance(first, ChatFirst)
        assert scrape(live) == {"assistant_media_chat_first_holds_total": 0.0, "assistant_media_chat_first_held_seconds_total": 0.0}
        first.max_hold_s = 2.0  # the media process's copy: each hold below ends when its expectation lapses
        with media_process(first) as conn:
            conn.send("hold")
            assert conn.recv() == 0.0  # no chat prompt waits: not a hold
            for _ in range(2):
                first.expect(0.3)
                conn.send("hold")
                waited = conn.recv()
                assert 0.1 < waited < 1.5, waited
        seen = scrape(live)
        assert seen["assistant_media_chat_first_holds_total"] == 2.0
        assert 0.2 < seen["assistant_media_chat_first_held_seconds_total"] < 3.0, seen
    finally:
        live.stop()
