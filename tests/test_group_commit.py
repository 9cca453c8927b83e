"""Streamed text from many sessions is stored in shared transactions (group commit), and nothing
is lost or reordered by it: every word arrives once, in order, with gapless seqs, and the stored
reply and the event log say exactly what the client saw."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import pytest
from sqlalchemy import select

from bench.baseline import FloodSkill
from skills.base import ModelFreeSkill, SkillRequest
from assistant import protocol as p
from assistant.stream_writer import StreamWriter
from state import store
from state.db import make_engine, make_session_factory, upgrade
from state.models import ChatSession, Event, Message
from tests.conftest import LiveServer, WordsRun, chat_manager, make_settings, start_server, ws_client

WORDS = 120
SESSIONS = 8


@pytest.fixture(scope="module")
def flood_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("flood")
    live = start_server(make_settings(tmp, tmp, load_models=False), skills={"chat": FloodSkill(WORDS)})
    yield live
    live.stop()


def test_concurrent_streams_share_transactions_and_lose_nothing(flood_server: LiveServer) -> None:
    token = flood_server.token("dora")
    writer = flood_server.app.state.dialogue._writer
    batches_before = writer.batches

    async def one() -> tuple[str, list[dict]]:
        async with ws_client(flood_server, token) as c:
            sid = await c.new_session()
            _, done = await c.turn(sid, "go")
            return sid, [e for e in c.events if e.get("session_id") == sid and "seq" in e and e["seq"] is not None]

    async def all_sessions() -> list[tuple[str, list[dict]]]:
        return await asyncio.gather(*(one() for _ in range(SESSIONS)))

    results = asyncio.run(all_sessions())
    expected = "".join(f" w{i}" for i in range(WORDS))
    frames = 0
    with flood_server.app.state.sessions() as db:
        for sid, events in results:
            deltas = [e for e in events if e["type"] == "response.delta"]
            frames += len(deltas)
            assert "".join(e["delta"] for e in deltas) == expected
            seqs = [e["seq"] for e in events]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), "seqs have gaps or are out of order"
            done = events[-1]
            assert done["type"] == "response.done" and done["status"] == "completed" and done["text"] == expected
            reply = db.scalar(select(Message).where(Message.session_id == sid, Message.role == "assistant"))
            assert reply.text == expected and reply.first_token_at is not None
            assert reply.status == "completed" and reply.finished_at is not None
            # logged: every event but the deltas, which the reply's text and its done hold
            logged = db.scalars(select(Event).where(Event.session_id == sid).order_by(Event.seq)).all()
            assert [e.seq for e in logged][-len(seqs) + len(deltas) :] == [e["seq"] for e in events if e not in deltas]
            assert db.get(ChatSession, sid).last_seq == seqs[-1]
    batches = writer.batches - batches_before
    assert 0 < batches < frames, f"{frames} frames took {batches} transactions: no group commit"


def test_a_session_deleted_before_the_commit_fails_only_its_own_frames(tmp_path) -> None:  # noqa: ANN001
    """A reply still streaming when its session is deleted: the frames of the other sessions in the
    same group commit are stored and sent; the deleted session's writer gets a LookupError."""
    engine = make_engine(f"sqlite:///{tmp_path / 'a.db'}")
    upgrade(engine)
    sessions = make_session_factory(engine)
    sent: list[tuple[str, str]] = []
    with sessions.begin() as db:
        user = store.get_or_create_user(db, name="eve")
        ids = []
        for _ in range(2):
            sess = store.create_session(db, user_id=user.id)
            [(reply_id, _)] = store.add_turns(
                db, turns=[store.NewTurn(sess.id, f"t-{sess.id}", "hi", [], "running", None)], titles={sess.id: sess.title}
            )
            ids.append((sess.id, reply_id))

    async def scenario() -> list[object]:
        writer = StreamWriter(sessions, lambda sid, frame: sent.append((sid, frame)))
        futures = [
            writer.write(p.ResponseDelta(session_id=sid, turn_id=f"t-{sid}", delta="hello"), reply_id=rid, text="hello")
            for sid, rid in ids
        ]
        (gone_sid, _), (kept_sid, kept_rid) = ids
        done = writer.finish(
            p.ResponseDone(session_id=kept_sid, turn_id=f"t-{kept_sid}", status="completed", text="hello"),
            reply_id=kept_rid,
            fields={"status": "completed", "text": "hello", "finished_at": None, "error_code": None,
                    "prompt_tokens": 3, "completion_tokens": 1},
        )  # fmt: skip
        with sessions.begin() as db:  # deleted before the writer's flush (the next loop turn)
            store.delete_session(db, session=store.get_session(db, session_id=gone_sid, user_id=user.id))
        return await asyncio.gather(*futures, done, return_exceptions=True)

    gone, kept, finished = asyncio.run(scenario())
    assert isinstance(gone, LookupError)
    assert kept is None and finished is None
    (gone_sid, _), (kept_sid, kept_rid) = ids
    assert [sid for sid, _ in sent] == [kept_sid, kept_sid]
    assert ['"response.delta"' in sent[0][1], '"response.done"' in sent[1][1]] == [True, True]
    with sessions() as db:
        reply = db.get(Message, kept_rid)
        assert (reply.text, reply.status, reply.completion_tokens) == ("hello", "completed", 1)
        # the delta was sent (above) and numbered; the done, which holds the whole text, is logged
        assert [e.type for e in store.events_after(db, session_id=kept_sid, after_seq=0)] == ["response.done"]
        assert db.get(ChatSession, kept_sid).last_seq == 2


class HistorySkill(ModelFreeSkill):
    """Answers with the history it was given, so the test can see what each turn was told."""

    name = "chat"

    async def run(self, request: SkillRequest) -> WordsRun:
        seen = "|".join(f"{h.role}:{h.text.strip()}" for h in request.history)
        return WordsRun(f"[{request.text}] saw {seen or 'nothing'}")


def test_each_turn_sees_the_whole_answer_of_the_turn_before_it(tmp_path) -> None:  # noqa: ANN001
    """Turns sent at once to one session: the first is routed as it is admitted, the others wait in
    the queue. Each must be given the previous turns with their final answers (stored by the group
    commit before the next turn reads the session)."""
    live = start_server(make_settings(tmp_path, tmp_path, load_models=False), skills={"chat": HistorySkill()})
    try:

        async def scenario() -> list[dict]:
            async with ws_client(live, live.token("hal")) as c:
                sid = await c.new_session()
                for text in ("one", "two", "three"):
                    await c.send(type="turn.create", session_id=sid, text=text)
                dones = []
                while len(dones) < 3:
                    ev = await c.recv()
                    if ev["type"] == "response.done":
                        dones.append(ev)
                _, later = await c.turn(sid, "four")  # the session idle again: routed on admission
                return [*dones, later]

        one, two, three, four = asyncio.run(scenario())
    finally:
        live.stop()
    assert [d["status"] for d in (one, two, three, four)] == ["completed"] * 4
    assert one["text"].strip() == "[one] saw nothing"
    assert two["text"].strip() == "[two] saw user:one|assistant:[one] saw nothing"
    assert three["text"].strip() == f"[three] saw user:one|assistant:{one['text'].strip()}|user:two|assistant:{two['text'].strip()}"
    assert four["text"].strip().startswith("[four] saw user:one|") and four["text"].strip().endswith(
        f"user:three|assistant:{three['text'].strip()}"
    )


def test_turns_sent_at_once_are_admitted_in_one_transaction_and_each_fails_alone(tmp_path) -> None:  # noqa: ANN001
    """Turns submitted in the same turn of the event loop (a burst from many connections) are
    stored, routed and acknowledged with one commit. Their order and queueing are what one at a time
    would give: the second turn to a session waits behind the first; a foreign session, an unknown
    attachment and an empty turn are refused with their own errors, and the others go on."""
    from sqlalchemy import event as sa_event

    from assistant.dialogue import DialogueError

    engine, sessions, dm = chat_manager(tmp_path, HistorySkill())
    with sessions.begin() as db:
        ann, bob = store.get_or_create_user(db, name="ann").id, store.get_or_create_user(db, name="bob").id
    commits: list[int] = []
    sa_event.listen(engine, "commit", lambda conn: commits.append(1))

    async def scenario() -> tuple[list[object], list[object]]:
        a1, a2, a3 = (dm.create_session(user_id=ann, title=None, sub=None, event_id=None) for _ in range(3))
        b1 = dm.create_session(user_id=bob, title=None, sub=None, event_id=None)
        commits.clear()
        burst = [
            (ann, a1, "first", ()), (ann, a1, "second", ()), (ann, a2, "other session", ()),
            (ann, b1, "not mine", ()), (ann, a3, "", ("nope",)), (ann, a3, "   ", ()), (bob, b1, "bob's own", ()),
        ]  # fmt: skip
        futures = [
            dm.submit_turn(user_id=u, event=p.TurnCreate(session_id=s, text=t, attachment_ids=list(att)), sub=None)
            for u, s, t, att in burst
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        admitted_with = len(commits)
        while dm._runners:  # every admitted turn runs to its end
            await asyncio.sleep(0.01)
        return results, [admitted_with, a1, a2, b1, a3]

    results, (admitted_with, a1, a2, b1, a3) = asyncio.run(scenario())
    assert admitted_with == 1, f"{admitted_with} commits for one burst of turns"
    first, second, other, foreign, unknown_att, empty, bobs = results
    assert all(isinstance(r, str) for r in (first, second, other, bobs))
    assert isinstance(foreign, DialogueError) and foreign.code == p.ErrorCode.session_not_found
    assert isinstance(unknown_att, DialogueError) and unknown_att.code == p.ErrorCode.attachment_not_found
    assert isinstance(empty, DialogueError) and empty.code == p.ErrorCode.empty_turn
    with sessions() as db:
        log = [(e.type, e.seq) for e in store.events_after(db, session_id=a1, after_seq=1)]
        types = [t for t, _ in log]
        # the first is routed as it is admitted; the second waits behind it, then runs
        assert types[:4] == ["turn.created", "turn.routed", "turn.created", "turn.queued"]
        seqs = [s for _, s in log]
        assert seqs[:4] == [2, 3, 4, 5] and seqs == sorted(set(seqs)), "seqs have gaps or are out of order"
        # the gaps after that are the replies' deltas: numbered and sent, not logged
        assert db.get(ChatSession, a1).last_seq == seqs[-1] > len(seqs) + 1
        msgs = store.history(db, session_id=a1)
        assert [(m.position, m.role, m.text.strip()) for m in msgs] == [
            (0, "user", "first"), (1, "assistant", "[first] saw nothing"),
            (2, "user", "second"), (3, "assistant", "[second] saw user:first|assistant:[first] saw nothing"),
        ]  # fmt: skip
        assert [m.status for m in msgs if m.role == "assistant"] == ["completed", "completed"]
        titles = {s.id: s.title for s in (db.get(ChatSession, sid) for sid in (a1, a2, b1, a3))}
        assert titles == {a1: "first", a2: "other session", b1: "bob's own", a3: "New chat"}
        assert [m.text for m in store.history(db, session_id=b1)][:1] == ["bob's own"]
        assert store.history(db, session_id=a3) == []


class LookSkill(ModelFreeSkill):
    """A vision skill that answers with the bytes it was shown and the history it was given."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name

    async def run(self, request: SkillRequest) -> WordsRun:
        seen = "|".join(f"{h.role}:{h.text.strip()}" for h in request.history)
        return WordsRun(f"{self.name} of {b''.join(request.images).decode()}; saw {seen or 'nothing'}")


def test_a_burst_of_image_turns_reads_the_attachments_once_and_each_turn_gets_its_own_image(tmp_path) -> None:  # noqa: ANN001
    """Turns about images in several sessions, sent at once: the sessions' attachments are read with
    one statement for the whole burst (not two per turn: the admission of a vision turn cost 1.5x the
    event-loop time, ``bench/media_web.py``); each turn is routed to its own session's image, the
    history labels earlier images, a turn queued behind another is routed when it runs, and an
    image of another session is refused."""
    from sqlalchemy import event as sa_event

    from assistant.dialogue import DialogueError, DialogueManager
    from assistant.metrics import Metrics
    from state.attachments import BlobStore, add_attachment

    settings = make_settings(tmp_path, tmp_path, load_models=False)
    engine = make_engine(settings.database_url)
    upgrade(engine)
    sessions = make_session_factory(engine)
    blobs = BlobStore(tmp_path / "blobs")
    skills = {"chat": HistorySkill(), "caption": LookSkill("caption"), "vqa": LookSkill("vqa")}
    dm = DialogueManager(settings=settings, sessions=sessions, skills=skills, metrics=Metrics(), blobs=blobs)
    with sessions.begin() as db:
        ann = store.get_or_create_user(db, name="ann").id
    reads: list[str] = []
    listing = "FROM attachments \nWHERE attachments.session_id"  # a session's attachments, not one by id
    sa_event.listen(engine, "before_cursor_execute", lambda *a: reads.append(a[2]) if listing in a[2] else None)

    def image(db, sid: str, name: str) -> str:  # noqa: ANN001
        sha = f"{name:0<64}"
        blobs.write(sha, name.encode())
        return add_attachment(db, user_id=ann, session_id=sid, sha256=sha, kind="image", mime_type="image/png",
                              size_bytes=len(name), meta={}).id  # fmt: skip

    async def scenario() -> list[object]:
        s1, s2, s3 = (dm.create_session(user_id=ann, title=None, sub=None, event_id=None) for _ in range(3))
        with sessions.begin() as db:
            cat, dog, owl = image(db, s1, "cat"), image(db, s2, "dog"), image(db, s3, "owl")
        await dm.submit_turn(user_id=ann, event=p.TurnCreate(session_id=s3, text="", attachment_ids=[owl]), sub=None)
        while dm._runners:
            await asyncio.sleep(0.01)
        reads.clear()
        burst = [
            (s1, "", [cat]), (s1, "what colour is it?", []), (s2, "how many legs?", [dog]),
            (s3, "what is it doing?", []), (s2, "and this one?", [cat]),
        ]  # fmt: skip
        results = await asyncio.gather(
            *(dm.submit_turn(user_id=ann, event=p.TurnCreate(session_id=s, text=t, attachment_ids=a), sub=None)
              for s, t, a in burst),
            return_exceptions=True,
        )  # fmt: skip
        admission_reads = list(reads)
        while dm._runners:
            await asyncio.sleep(0.01)
        return [admission_reads, results, s1, s2, s3]

    admission_reads, results, s1, s2, s3 = asyncio.run(scenario())
    assert len(admission_reads) <= 2, f"{admission_reads} reads of the attachments to admit one burst"
    assert all(isinstance(r, str) for r in results[:4])
    assert isinstance(results[4], DialogueError) and results[4].code == p.ErrorCode.attachment_not_found
    with sessions() as db:
        history = {sid: store.history(db, session_id=sid) for sid in (s1, s2, s3)}
    replies = {sid: [m.text.strip() for m in msgs if m.role == "assistant"] for sid, msgs in history.items()}
    assert replies[s1] == ["caption of cat; saw nothing", "vqa of cat; saw user:[image 1]|assistant:caption of cat; saw nothing"]
    assert replies[s2] == ["vqa of dog; saw nothing"]
    assert replies[s3][1] == "vqa of owl; saw user:[image 1]|assistant:caption of owl; saw nothing"


def test_a_turn_that_fails_the_shared_transaction_fails_alone(tmp_path) -> None:  # noqa: ANN001
    """When storing a burst fails (here a database trigger refuses one turn's row), the burst is
    rolled back and each turn is admitted again on its own: the bad one gets an error, the others
    are stored and answered."""
    from sqlalchemy import text

    engine, sessions, dm = chat_manager(tmp_path, HistorySkill())
    with engine.begin() as conn:
        conn.execute(
            text(
                "CREATE TRIGGER poison BEFORE INSERT ON messages WHEN NEW.text = 'poison' "
                "BEGIN SELECT RAISE(ABORT, 'this row is refused'); END"
            )
        )
    with sessions.begin() as db:
        ann = store.get_or_create_user(db, name="ann").id

    async def scenario() -> tuple[list[object], list[str]]:
        sids = [dm.create_session(user_id=ann, title=None, sub=None, event_id=None) for _ in range(3)]
        futures = [
            dm.submit_turn(user_id=ann, event=p.TurnCreate(session_id=sid, text=t), sub=None)
            for sid, t in zip(sids, ("fine", "poison", "also fine"))
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        while dm._runners:
            await asyncio.sleep(0.01)
        return results, sids

    (ok1, bad, ok2), sids = asyncio.run(scenario())
    assert isinstance(ok1, str) and isinstance(ok2, str)
    assert "this row is refused" in str(bad)
    with sessions() as db:
        assert [m.text for m in store.history(db, session_id=sids[1])] == []
        assert [e.type for e in store.events_after(db, session_id=sids[1], after_seq=1)] == []
        for sid, said in ((sids[0], "fine"), (sids[2], "also fine")):
            msgs = store.history(db, session_id=sid)
            assert [m.text.strip() for m in msgs] == [said, f"[{said}] saw nothing"]
            assert msgs[1].status == "completed"


class _Listener:
    """A subscriber that keeps the frames it is given, or raises on each when ``broken``."""

    def __init__(self, broken: bool = False) -> None:
        self.broken, self.frames = broken, []

    def deliver(self, frame: str) -> None:
        if self.broken:
            raise RuntimeError("this subscriber is broken")
        self.frames.append(frame)

    def replay(self, frames: list[str]) -> None:
        self.frames.extend(frames)


def test_a_broken_subscriber_or_a_turn_that_cannot_be_queued_fails_no_other_turn(tmp_path) -> None:  # noqa: ANN001
    """After a burst's commit each turn is announced to its subscribers and queued. A subscriber that
    raises is detached (its session's turn still runs), and a turn whose queueing fails is stored as
    failed; the burst's later turns are queued and answered either way."""
    engine, sessions, dm = chat_manager(tmp_path, HistorySkill())
    with sessions.begin() as db:
        ann = store.get_or_create_user(db, name="ann").id
    queue_turn = dm._queue_turn
    refused: list[str] = []

    def queue_or_fail(it) -> None:  # noqa: ANN001 - a bug injected into the second session's turn
        if it.event.text == "unqueueable":
            refused.append(it.turn.turn_id)
            raise RuntimeError("injected: queueing this turn fails")
        queue_turn(it)

    dm._queue_turn = queue_or_fail
    listeners = [_Listener(), _Listener(broken=True), _Listener(), _Listener()]

    async def scenario() -> tuple[list[object], list[str]]:
        sids = [dm.create_session(user_id=ann, title=None, sub=None, event_id=None) for _ in range(4)]
        futures = [
            dm.submit_turn(user_id=ann, event=p.TurnCreate(session_id=sid, text=t), sub=sub)
            for sid, t, sub in zip(sids, ("first", "heard by no one", "unqueueable", "last"), listeners)
        ]
        results = await asyncio.gather(*futures, return_exceptions=True)
        while dm._runners:
            await asyncio.sleep(0.01)
        return results, sids

    results, sids = asyncio.run(scenario())
    assert all(isinstance(r, str) for r in results), results  # every turn was stored and acknowledged
    assert refused == [results[2]]
    assert all(listeners[1] not in subs for subs in dm._subscribers.values())
    for listener, sid in ((listeners[0], sids[0]), (listeners[3], sids[3])):
        kinds = [json.loads(f)["type"] for f in listener.frames]
        assert kinds[0] == "turn.created" and kinds[-1] == "response.done", kinds
    with sessions() as db:
        for sid, said in ((sids[0], "first"), (sids[1], "heard by no one"), (sids[3], "last")):
            msgs = store.history(db, session_id=sid)
            assert [m.text.strip() for m in msgs] == [said, f"[{said}] saw nothing"]
            assert msgs[1].status == "completed"
        failed = store.history(db, session_id=sids[2])
        assert [m.text for m in failed][:1] == ["unqueueable"] and failed[1].status == "failed"
        assert [e.type for e in store.events_after(db, session_id=sids[2], after_seq=0)][-1] == "response.done"


def test_many_streams_share_the_servers_frames_a_second_and_lose_no_word(tmp_path) -> None:  # noqa: ANN001
    """With ``delta_frames_per_s`` set, the streams running together send no more frames a second
    than it allows (each stream's interval is the number of streams over the cap), while each
    reply's first word still goes out at once in a frame of its own and every word arrives, in
    order. Without the cap the same streams send a frame per word (``delta_flush_interval`` is 0)."""
    from assistant.dialogue import DialogueManager
    from assistant.metrics import Metrics

    streams, words = 8, 40

    def run(cap: float) -> tuple[list[list[str]], float]:
        folder = tmp_path / f"cap{int(cap)}"
        folder.mkdir()
        settings = make_settings(folder, folder, load_models=False, delta_flush_interval=0.0, delta_frames_per_s=cap)
        engine = make_engine(settings.database_url)
        upgrade(engine)
        sessions = make_session_factory(engine)
        skill = FloodSkill(words, pace_s=0.004)
        dm = DialogueManager(settings=settings, sessions=sessions, skills={"chat": skill}, metrics=Metrics())
        with sessions.begin() as db:
            ann = store.get_or_create_user(db, name="ann").id
        listeners = [_Listener() for _ in range(streams)]

        async def scenario() -> float:
            sids = [dm.create_session(user_id=ann, title=None, sub=None, event_id=None) for _ in range(streams)]
            started = asyncio.get_running_loop().time()
            await asyncio.gather(*(
                dm.submit_turn(user_id=ann, event=p.TurnCreate(session_id=sid, text="go"), sub=sub)
                for sid, sub in zip(sids, listeners)
            ))  # fmt: skip
            while dm._runners:
                await asyncio.sleep(0.005)
            return asyncio.get_running_loop().time() - started

        wall = asyncio.run(scenario())
        engine.dispose()
        deltas = [[e["delta"] for e in map(json.loads, sub.frames) if e["type"] == "response.delta"] for sub in listeners]
        return deltas, wall

    uncapped, _ = run(0.0)
    capped, wall = run(100.0)
    expected = "".join(f" w{i}" for i in range(words))
    for deltas in uncapped + capped:
        assert "".join(deltas) == expected and deltas[0] == " w0"
    sent = sum(len(d) for d in capped)
    # In between a stream's first and last frames, one per (streams / cap) seconds at most.
    assert sent <= 100.0 * wall * 1.5 + 2 * streams, f"{sent} frames in {wall:.2f} s with a cap of 100 a second"
    assert sum(len(d) for d in uncapped) >= 3 * sent, (sent, wall)


def test_opening_a_conversation_longer_than_the_outbound_queue_replays_all_of_it(tmp_path) -> None:  # noqa: ANN001
    """A client opening an old conversation resumes from seq 0 and is sent its event log (each
    ended reply as its ``response.done``), which for a long conversation holds more frames than a
    connection may have queued (the limit that disconnects a client too slow to read its live
    events). The replay is no such backlog: the client gets every event, in order, then
    ``session.resumed``, and stays connected."""
    limit = 20
    settings = make_settings(tmp_path, tmp_path, load_models=False, max_outbound_queue=limit)
    live = start_server(settings, skills={"chat": FloodSkill(150)})
    try:

        async def scenario() -> tuple[int, list[dict], dict, dict]:
            token = live.token("rhea")
            async with ws_client(live, token) as c:
                sid = await c.new_session()
                for k in range(8):
                    await c.turn(sid, f"turn {k}")
            async with ws_client(live, token) as c:  # another device opens it
                await c.send(type="session.resume", session_id=sid, last_seq=0)
                resumed = await c.until_type("session.resumed", timeout=60)
                replayed = [e for e in c.events if e.get("session_id") == sid and e.get("seq") is not None]
                pong = await c.until_type("pong", event_id=await c.send(type="ping"))
            return limit, replayed, resumed, pong

        limit, replayed, resumed, pong = asyncio.run(scenario())
    finally:
        live.stop()
    assert resumed["replayed"] > limit, "the conversation is not longer than the queue"
    assert [e["type"] for e in replayed] == ["session.created"] + ["turn.created", "turn.routed", "response.done"] * 8
    assert [e["seq"] for e in replayed] == sorted(e["seq"] for e in replayed) and replayed[-1]["seq"] == resumed["last_seq"]
    assert resumed["replayed"] == len(replayed) and pong["type"] == "pong"
    assert {e["text"] for e in replayed if e["type"] == "response.done"} == {"".join(f" w{i}" for i in range(150))}
