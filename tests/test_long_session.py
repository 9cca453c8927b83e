"""A long conversation: each turn reads the session's newest messages, as much as a prompt can hold,
and the older turns that named images; never the whole history (``state/context.py``). What a skill
is given and where each turn is routed are what reading everything would give, within the window."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from pathlib import Path

import pytest
from sqlalchemy import text

from assistant import protocol as p
from bench.delete_session import fill
from skills.base import ModelFreeSkill, SkillRequest
from state import context as state_context
from state import store
from state.db import make_engine, make_session_factory, upgrade
from state.models import ChatSession, Message, new_id
from tests.conftest import WordsRun, chat_manager, make_settings


@pytest.fixture()
def sessions(tmp_path: Path):  # noqa: ANN201
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    upgrade(engine)
    yield make_session_factory(engine)
    engine.dispose()


def _expected(rows: list[dict], chars: int | None, before: int | None, asked=None) -> list[tuple[int, bool]]:  # noqa: ANN001
    """The rule of ``state.context.contexts``, written plainly over all of a session's rows."""
    rows = [r for r in rows if before is None or r["position"] < before]
    if chars is None or not rows:
        return [(r["position"], True) for r in rows]
    keep, after = [], 0
    for r in reversed(rows):
        if after >= chars:
            break
        keep.append(r)
        after += len(r["text"]) + state_context.PER_MESSAGE
    first = keep[-1]["position"]
    older = [r for r in rows if r["position"] < first]
    named = [r["turn_id"] for r in older if r["attachment_ids"]]
    turns = set(named[-1:])  # the newest turn that named an attachment
    user_text = {r["turn_id"]: r["text"] for r in older if r["role"] == "user"}
    for r in older[::-1]:  # the newest VQA answers, back to one whose question was asked
        if r["role"] == "assistant" and r["skill"] == "vqa" and r["status"] == "completed":
            turns.add(r["turn_id"])
            if asked is None or asked(user_text.get(r["turn_id"], "")):
                break
    return [(r["position"], False) for r in older if r["turn_id"] in turns] + [(r["position"], True) for r in reversed(keep)]


def test_a_turn_reads_the_newest_messages_that_fit_and_the_older_turns_the_images_need(sessions) -> None:  # noqa: ANN001
    """Random sessions (up to 300 messages, so past the first read of 32 rows and the next of 128;
    texts of 0-400 characters; turns naming attachments on either message, some answered by VQA,
    some of those follow-ups) against the rule written plainly, for windows from one character to
    everything, with and without ``before``, with and without a test of the questions asked."""
    from assistant.image_context import asked

    rng = random.Random(7)
    with sessions.begin() as db:
        user = store.get_or_create_user(db, name="ann")
        data: dict[str, list[dict]] = {}
        for n in (0, 1, 2, 7, 33, 130, 300):
            sid = store.create_session(db, user_id=user.id).id
            rows = data[sid] = []
            for pos in range(n):
                turn = rows[-1]["turn_id"] if pos % 2 else new_id()
                named = rng.random() < (0.06 if pos % 2 == 0 else 0.03)
                text_ = rng.choice(["x" * rng.choice([0, 3, 40, 400]), "what is it?", "and in the first photo?"])
                rows.append({"id": new_id(), "session_id": sid, "turn_id": turn, "position": pos,
                             "role": ("user", "assistant")[pos % 2], "text": text_ if pos % 2 == 0 else "x" * rng.choice([3, 40]),
                             "status": rng.choice(["completed"] * 4 + ["failed"]),
                             "skill": rng.choice(["chat", "vqa", "caption"]) if pos % 2 else None,
                             "attachment_ids": [new_id()] if named else []})  # fmt: skip
            if rows:
                db.execute(Message.__table__.insert(), rows)
    assert sum(r["attachment_ids"] != [] for rows in data.values() for r in rows) >= 10
    answered = [r for rows in data.values() for r in rows if r["skill"] == "vqa" and r["status"] == "completed"]
    assert len(answered) >= 40
    with sessions() as db:
        windows = itertools.product((None, 1, 50, 450, 3000, 20000, 10**9), (None, 0, 1, 31, 100, 201), (None, asked))
        for chars, before, test in windows:
            got = state_context.contexts(db, session_ids=list(data), chars=chars, before=before, asked=test)
            for sid, rows in data.items():
                want = _expected(rows, chars, before, test)
                rows_got = got.get(sid, [])
                assert [(r.position, bool(r.recent)) for r in rows_got] == want, (len(rows), chars, before, test)
                by_position = {r["position"]: r for r in rows}
                for r in rows_got:
                    stored = by_position[r.position]
                    want_row = (stored["text"], stored["turn_id"], stored["attachment_ids"] or None)
                    assert (r.text, r.turn_id, r.attachment_ids) == want_row


def test_the_older_turns_the_images_need_are_a_few_index_seeks_however_many_named_images(sessions) -> None:  # noqa: ANN001
    """A session of 300 turns that each name an image (every fourth answered by VQA, the rest
    captioned): a turn reads its window and two older turns, the newest that named an image and the
    newest VQA answer, through ``ix_messages_attached``, ``ix_messages_vqa`` and the positions. It
    used to read all 300 older turns (44 ms of the event loop per turn at 4,000 messages)."""
    from sqlalchemy import event as sa_event

    from assistant.image_context import asked

    with sessions.begin() as db:
        sid = store.create_session(db, user_id=store.get_or_create_user(db, name="ann").id).id
        db.execute(Message.__table__.insert(), [
            {"id": new_id(), "session_id": sid, "turn_id": f"t{i // 2}", "position": i, "role": ("user", "assistant")[i % 2],
             "text": ("what colour is it?" if i % 8 == 0 else "x" * 100) if i % 2 == 0 else "y" * 100, "status": "completed",
             "skill": ("vqa" if i % 8 == 1 else "caption") if i % 2 else None, "attachment_ids": ["a"]} for i in range(600)
        ])  # fmt: skip
    statements: list[tuple[str, tuple]] = []
    engine = sessions.kw["bind"]
    sa_event.listen(engine, "before_cursor_execute", lambda conn, cur, sql, params, *a: statements.append((sql, params)))
    with sessions() as db:
        rows = state_context.context(db, session_id=sid, chars=1000, asked=asked)
        # the newest 7 messages (6 after the oldest of them, 164 characters each, measure under 1,000),
        # from a reply; before them the newest VQA turn, and the user message of the newest turn naming one
        older = [(584, False), (585, False), (592, False)]
        assert [(r.position, bool(r.recent)) for r in rows] == older + [(p_, True) for p_ in range(593, 600)]
        plans = {}
        for sql, params in list(statements):
            if sql.lstrip().startswith(("SELECT", "WITH")) and " messages" in sql:
                plan = " | ".join(str(r[-1]) for r in db.connection().exec_driver_sql(f"EXPLAIN QUERY PLAN {sql}", params))
                plans[plan] = sql
    uses = " || ".join(plans)
    for index in ("ix_messages_attached (session_id=? AND position<?)", "ix_messages_vqa (session_id=? AND position<?)",
                  "ix_messages_session_position (session_id=? AND position=?)"):  # fmt: skip
        assert f"INDEX {index}" in uses, uses
    assert "SCAN messages" not in uses, uses


def test_images_are_numbered_in_the_order_user_messages_first_named_them(sessions) -> None:  # noqa: ANN001
    """``store.add_turns`` records where each attachment was first named; the registry (``image 1``,
    ``image 2``, ...) built from that is what reading every user message in order gives, before any
    position, with the whole history or a window of it: images named twice, two in one turn, one
    named first by a reply (the router's choice, not a number), one uploaded and never named."""
    from assistant.image_context import image_context
    from state.attachments import add_attachment, attachment_refs

    rng = random.Random(3)
    with sessions.begin() as db:
        user = store.get_or_create_user(db, name="ann").id
        sid = store.create_session(db, user_id=user).id
        pool = [add_attachment(db, user_id=user, session_id=sid, sha256=f"{k:064x}", kind="image", mime_type="image/png",
                               size_bytes=1, meta={}).id for k in range(12)]  # fmt: skip
        turns = []
        for k in range(150):
            ids = rng.sample(pool[:11], rng.choice([0, 0, 1, 1, 2])) if k else []
            turns.append(store.NewTurn(sid, new_id(), "x" * rng.choice([5, 300]), ids + ids[:1] * (k % 7 == 0), "received", None))
        for batch in (turns[:1], turns[1:60], turns[60:]):  # one admission each: several turns of one session
            store.add_turns(db, turns=batch, titles={sid: "New chat"})
        db.execute(Message.__table__.update().where(Message.position == 201).values(attachment_ids=[pool[11]]))
    with sessions() as db:
        everything = store.history(db, session_id=sid)
        refs = attachment_refs(db, session_ids=[sid])[sid]
        assert refs[pool[11]].first_position is None  # a reply named it: no number
        for before in (1, 2, 41, 120, 299, 300):
            plain: list[str] = []
            for m in everything:
                if m.role == "user" and m.position < before:
                    plain += [i for i in m.attachment_ids if i not in plain]
            for chars in (None, 500):
                msgs = state_context.context(db, session_id=sid, chars=chars, before=before)
                images = image_context(refs, messages=msgs, before=before)
                assert images.image_ids == tuple(plain), (before, chars)
                for m in msgs:
                    if m.recent and m.role == "user" and m.attachment_ids:
                        want = "".join(f"[image {plain.index(i) + 1}] " for i in m.attachment_ids)
                        assert images.labels[m.turn_id] == want
        assert sorted(plain) == sorted(pool[:11])  # by position 300, every image but the reply's


class _Recorder(ModelFreeSkill):
    """Records what each turn was given; answers the same way whatever the history was."""

    def __init__(self, name: str, seen: list[tuple]) -> None:
        super().__init__()
        self.name, self.seen = name, seen

    async def run(self, request: SkillRequest) -> WordsRun:
        self.seen.append((self.name, request.text, b"".join(request.images).decode(), request.history))
        return WordsRun(f"{self.name} reply {len(self.seen)} " + "y" * 60, pause=0)


def _conversation(tmp: Path, history_chars: int) -> tuple[list[tuple], list[str]]:
    """Two photos, a long chat, then turns about the photos, the last two sent at once (the second
    queued behind the first). Returns what each skill was given, and the stored user texts."""
    from assistant.dialogue import DialogueManager
    from assistant.metrics import Metrics
    from state.attachments import BlobStore, add_attachment

    tmp.mkdir()
    settings = make_settings(tmp, tmp, load_models=False, history_chars=history_chars)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    factory = make_session_factory(engine)
    blobs = BlobStore(tmp / "blobs")
    seen: list[tuple] = []
    skills = {name: _Recorder(name, seen) for name in ("chat", "caption", "vqa")}
    dm = DialogueManager(settings=settings, sessions=factory, skills=skills, metrics=Metrics(), blobs=blobs)
    with factory.begin() as db:
        ann = store.get_or_create_user(db, name="ann").id

    async def scenario() -> str:
        sid = dm.create_session(user_id=ann, title=None, sub=None, event_id=None)
        with factory.begin() as db:
            ids = []
            for name in ("cat", "dog", "bird", "fish", "frog"):
                blobs.write(f"{name:0<64}", name.encode())
                ids.append(add_attachment(db, user_id=ann, session_id=sid, sha256=f"{name:0<64}", kind="image",
                                          mime_type="image/png", size_bytes=3, meta={}).id)  # fmt: skip
        turns = [("", [ids[0]]), ("how many legs does it have?", [ids[1]])]
        turns += [(f"tell me more about topic {k}, in detail", []) for k in range(12)]
        turns += [("and in the first photo?", []), ("describe image 2", []), ("what colour is it?", [])]
        # three more photos, captioned, then a long chat again: the last question is far back now
        turns += [("", [ids[2]]), ("", [ids[3]]), ("", [ids[4]])]
        turns += [(f"tell me more about topic {k}, in detail", []) for k in range(12, 24)]
        turns += [("and in image 4?", []), ("describe it", [])]
        for text_, attached in turns:
            await dm.submit_turn(user_id=ann, event=p.TurnCreate(session_id=sid, text=text_, attachment_ids=attached), sub=None)
            while dm._runners:
                await asyncio.sleep(0.001)
        await asyncio.gather(*(dm.submit_turn(user_id=ann, event=p.TurnCreate(session_id=sid, text=t), sub=None)
                               for t in ("a last question", "and one more")))  # fmt: skip
        while dm._runners:
            await asyncio.sleep(0.001)
        return sid

    sid = asyncio.run(scenario())
    with factory() as db:
        stored = [m.status for m in store.history(db, session_id=sid)]
    engine.dispose()
    return seen, stored


def test_a_long_conversation_is_routed_as_with_its_whole_history_and_the_skill_gets_its_newest_part(tmp_path: Path) -> None:
    whole, whole_status = _conversation(tmp_path / "whole", history_chars=0)
    window, window_status = _conversation(tmp_path / "window", history_chars=800)
    assert whole_status == window_status and set(whole_status) == {"completed"} and len(whole_status) == 72
    # Every turn goes to the same skill, about the same image, with the same text: image numbers, the
    # image in focus and the last question asked about one come from turns long out of the window.
    assert [s[:3] for s in window] == [s[:3] for s in whole]
    assert [s[:3] for s in whole[14:17]] == [
        ("vqa", "how many legs does it have?", "cat"),  # "and in the first photo?": the earlier question
        ("caption", "describe image 2", "dog"),
        ("vqa", "what colour is it?", "dog"),
    ]
    assert [s[:3] for s in whole[17:20]] == [("caption", "", "bird"), ("caption", "", "fish"), ("caption", "", "frog")]
    assert [s[:3] for s in whole[-4:-2]] == [
        ("vqa", "what colour is it?", "fish"),  # "and in image 4?": the question 17 turns back
        ("caption", "describe it", "fish"),
    ]
    for (name, _, _, got), (_, _, _, everything) in zip(window, whole):
        # The newest messages while the later ones measure under 800 characters, starting with a user's.
        assert got == everything[len(everything) - len(got):]
        assert not got or got[0].role == "user"
        assert sum(len(h.text) + state_context.PER_MESSAGE for h in got[1:]) < 800 + 30  # "[image N] " labels the stored text
        if len(everything) > 12:
            assert 2 <= len(got) < len(everything) // 2
    # the queued turn was given the turn before it, answer included
    question, answer = window[-1][3][-2:]
    assert (question.role, question.text, answer.role) == ("user", "a last question", "assistant")
    assert answer.position == question.position + 1  # each with its place in the session (the prompt's start, kept)
    assert window[-1][3][-1].text.startswith(f"chat reply {len(window) - 1} ")


def _rows(factory, sid: str) -> list[int]:  # noqa: ANN001
    with factory() as db:
        return [db.execute(text(f"SELECT count(*) FROM {t} WHERE {c} = :s"), {"s": sid}).scalar()
                for t, c in (("events", "session_id"), ("messages", "session_id"), ("sessions", "id"))]  # fmt: skip


def test_deleting_a_long_session_hides_it_at_once_and_removes_it_in_short_transactions(tmp_path) -> None:  # noqa: ANN001
    """A session of 2,000 messages and 20,000 events: gone for every lookup as the delete returns;
    its rows are removed ``PURGE_ROWS`` at a time (one transaction held the event loop 129-198 ms for
    4,000 messages and 80,000 events, ``bench/delete_session.py``), and another session's turn streams meanwhile."""
    from sqlalchemy import event as sa_event

    from assistant.dialogue import PURGE_ROWS
    from bench.baseline import FloodSkill

    engine, factory, dm = chat_manager(tmp_path, FloodSkill(200))
    with factory.begin() as db:
        ann = store.get_or_create_user(db, name="ann").id
    sid = fill(factory, ann, messages=2000, events=20000)
    deletes: list[int] = []
    sa_event.listen(engine, "after_cursor_execute",
                    lambda conn, cur, sql, *a: deletes.append(cur.rowcount) if sql.startswith("DELETE") else None)  # fmt: skip
    seen: list[tuple[str, int]] = []  # (frame type, chunks deleted by then), for the other session's frames

    class Watcher:
        def deliver(self, frame: str) -> None:
            seen.append((json.loads(frame)["type"], len(deletes)))

        def replay(self, frames: list[str]) -> None:
            pass

    async def scenario() -> None:
        other = dm.create_session(user_id=ann, title=None, sub=None, event_id=None)
        assert await dm.delete_session(user_id=ann, session_id=sid)
        with factory() as db:  # hidden at once, its rows still there
            assert store.get_session(db, session_id=sid, user_id=ann) is None
            assert sid not in [s.id for s in store.list_sessions(db, user_id=ann)]
            assert store.session_heads(db, session_ids=[sid]) == {}
        assert _rows(factory, sid)[0] > 10000
        with pytest.raises(Exception, match="no session"):
            await dm.submit_turn(user_id=ann, event=p.TurnCreate(session_id=sid, text="hello?"), sub=None)
        assert not await dm.delete_session(user_id=ann, session_id=sid)
        await dm.submit_turn(user_id=ann, event=p.TurnCreate(session_id=other, text="meanwhile"), sub=Watcher())
        while dm._runners or dm._purges:
            await asyncio.sleep(0.01)

    asyncio.run(scenario())
    assert _rows(factory, sid) == [0, 0, 0]
    assert max(deletes) <= PURGE_ROWS and sum(deletes) >= 22000 and len(deletes) >= 22000 // PURGE_ROWS
    first_delta = next(n for kind, n in seen if kind == "response.delta")
    assert first_delta < len(deletes) // 2, f"the other session's first words waited for {first_delta} of {len(deletes)} deletes"
    assert seen[-1][0] == "response.done"
    engine.dispose()


def test_a_purge_cut_off_by_a_shutdown_goes_on_at_the_next_start(tmp_path) -> None:  # noqa: ANN001
    """Deleted, partly purged, then the server stopped: the next start removes the rest, and the
    deleted session's unfinished turn is not logged as interrupted (nobody can see it)."""
    from assistant.dialogue import DialogueManager
    from assistant.metrics import Metrics

    settings = make_settings(tmp_path, tmp_path, load_models=False)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    factory = make_session_factory(engine)
    with factory.begin() as db:
        ann = store.get_or_create_user(db, name="ann").id
    sid = fill(factory, ann, messages=600, events=3000)
    with factory.begin() as db:
        db.execute(text("UPDATE messages SET status = 'running' WHERE session_id = :s AND position = 599"), {"s": sid})
        store.mark_deleted(db, session=db.get(ChatSession, sid))
        store.purge_session(db, session_id=sid, limit=1000)
    assert _rows(factory, sid) == [2000, 600, 1]

    async def start() -> int:
        dm = DialogueManager(settings=settings, sessions=factory, skills={}, metrics=Metrics())
        interrupted = dm.recover()
        while dm._purges:
            await asyncio.sleep(0.01)
        return interrupted

    assert asyncio.run(start()) == 0
    assert _rows(factory, sid) == [0, 0, 0]
    engine.dispose()


class _Client:
    """A subscriber that keeps what it is sent: the replay, then live events."""

    def __init__(self) -> None:
        self.replayed: list[dict] = []
        self.live: list[dict] = []

    def deliver(self, frame: str) -> None:
        self.live.append(json.loads(frame))

    def replay(self, frames: list[str]) -> None:
        self.replayed.extend(json.loads(f) for f in frames)


def test_a_resume_sends_ended_replies_as_their_done_and_the_streaming_one_from_where_the_client_was(tmp_path: Path) -> None:
    """Opening a conversation replays a few events a turn, not every frame: an ended reply comes as
    its ``response.done`` (the whole text); the reply still streaming comes as its deltas after
    the client's ``last_seq``, then live, with nothing lost or doubled, even when another turn's
    ``response.done`` (a queued turn cancelled) was logged in the middle of the stream."""
    from bench.baseline import FloodSkill

    engine, factory, dm = chat_manager(tmp_path, FloodSkill(150, 0.002))
    with factory.begin() as db:
        ann = store.get_or_create_user(db, name="ann").id
    watcher, fresh, midway = _Client(), _Client(), _Client()

    def deltas(events: list[dict], turn_id: str) -> list[dict]:
        return [e for e in events if e["type"] == "response.delta" and e["turn_id"] == turn_id]

    async def until(cond) -> None:  # noqa: ANN001
        while not cond():
            await asyncio.sleep(0.001)

    async def scenario() -> tuple[str, str, str, int]:
        sid = dm.create_session(user_id=ann, title=None, sub=watcher, event_id=None)
        first = await dm.submit_turn(user_id=ann, event=p.TurnCreate(session_id=sid, text="one"), sub=None)
        await until(lambda: not dm._runners)
        second = await dm.submit_turn(user_id=ann, event=p.TurnCreate(session_id=sid, text="two"), sub=None)
        third = await dm.submit_turn(user_id=ann, event=p.TurnCreate(session_id=sid, text="three"), sub=None)
        await until(lambda: len(deltas(watcher.live, second)) >= 20)
        dm.cancel(user_id=ann, event=p.ResponseCancel(session_id=sid, turn_id=third))
        await until(lambda: len(deltas(watcher.live, second)) >= 40)
        dm.resume(user_id=ann, session_id=sid, last_seq=0, sub=fresh, event_id=None)
        mid = deltas(watcher.live, second)[30]["seq"]
        dm.resume(user_id=ann, session_id=sid, last_seq=mid, sub=midway, event_id=None)
        await until(lambda: not dm._runners)
        return first, second, third, mid

    first, second, third, mid = asyncio.run(scenario())
    engine.dispose()
    done = {e["turn_id"]: e for e in watcher.live if e["type"] == "response.done"}
    assert done[first]["status"] == done[second]["status"] == "completed" and done[third]["status"] == "cancelled"
    assert done[second]["text"] == "".join(f" w{i}" for i in range(150))
    # The ended reply: its done, not its 150 frames; the cancelled turn's events are there.
    assert deltas(fresh.replayed, first) == [] and done[first] in fresh.replayed
    assert [e["type"] for e in fresh.replayed if e.get("turn_id") == third] == [
        "turn.created", "turn.queued", "response.done"]
    # The streaming reply: each of its deltas once, in order, some replayed and the rest live.
    for client, after in ((fresh, 0), (midway, mid)):
        got = deltas(client.replayed, second) + deltas(client.live, second)
        want = [e for e in deltas(watcher.live, second) if e["seq"] > after]
        assert got == want and deltas(client.replayed, second) and deltas(client.live, second)
        seqs = [e["seq"] for e in client.replayed]
        assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs) and all(s > after for s in seqs)
    assert midway.replayed[0]["seq"] > mid and len(fresh.replayed) < 60


def test_a_reply_stopped_by_its_sessions_delete_leaves_no_deltas_behind(tmp_path: Path) -> None:
    """The stream writer keeps the streaming reply's deltas in memory (deltas are not logged) until
    its reply ends. A reply whose task is cancelled (its session deleted mid-stream) ends without the
    writer's ``finish``; its deltas go too, including those still waiting for the next commit."""
    from bench.baseline import FloodSkill

    engine, factory, dm = chat_manager(tmp_path, FloodSkill(400, 0.002))
    with factory.begin() as db:
        ann = store.get_or_create_user(db, name="ann").id
    watcher = _Client()

    async def scenario() -> tuple[list, list]:
        sid = dm.create_session(user_id=ann, title=None, sub=watcher, event_id=None)
        await dm.submit_turn(user_id=ann, event=p.TurnCreate(session_id=sid, text="talk"), sub=None)
        while sum(e["type"] == "response.delta" for e in watcher.live) < 10:
            await asyncio.sleep(0.001)
        held = dm._writer.streaming_after(sid, 0)
        assert await dm.delete_session(user_id=ann, session_id=sid)
        while dm._runners or dm._purges:
            await asyncio.sleep(0.01)
        return held, dm._writer.streaming_after(sid, 0)

    held, left = asyncio.run(scenario())
    engine.dispose()
    assert len(held) >= 10 and left == [] and dm._writer._streaming == {}


def test_an_upload_that_lands_while_its_session_is_being_deleted_is_refused(sessions) -> None:  # noqa: ANN001
    """The upload checked the session before its delete, and adds its row after it: refused
    (``SessionGone``: the route says 404 and releases the files), and no row is left for the purge
    to take with the session (its files would have stayed behind)."""
    from state.attachments import SessionGone, add_attachment, session_attachments

    with sessions.begin() as db:
        ann = store.get_or_create_user(db, name="ann").id
        sid = store.create_session(db, user_id=ann).id
        kept = store.create_session(db, user_id=ann).id
    with sessions.begin() as db:
        store.mark_deleted(db, session=db.get(ChatSession, sid))
    with pytest.raises(SessionGone), sessions.begin() as db:
        add_attachment(db, user_id=ann, session_id=sid, sha256="a" * 64, kind="image", mime_type="image/png", size_bytes=1, meta={})
    with sessions.begin() as db:
        row = add_attachment(db, user_id=ann, session_id=kept, sha256="a" * 64, kind="image", mime_type="image/png",
                             size_bytes=1, meta={})  # fmt: skip
        assert row.session_id == kept
    with sessions() as db:
        assert session_attachments(db, session_id=sid) == [] and len(session_attachments(db, session_id=kept)) == 1
