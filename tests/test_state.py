"""State: Alembic builds exactly the models' schema, SQLite runs in WAL mode, seqs are monotonic,
blobs are removed once nothing refers to them."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from state import db as state_db
from state import store
from state.attachments import BlobStore, add_attachment, release_blobs, sweep_blobs
from state.models import Base, ChatSession


@pytest.fixture()
def engine(tmp_path: Path):  # noqa: ANN201
    eng = state_db.make_engine(f"sqlite:///{tmp_path / 'nested' / 'a.db'}")
    state_db.upgrade(eng)
    yield eng
    eng.dispose()


def test_migrations_build_the_models_schema(engine) -> None:  # noqa: ANN001
    with engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), Base.metadata)
    assert diff == []
    assert {"users", "tokens", "sessions", "messages", "attachments", "events", "alembic_version"} <= set(
        inspect(engine).get_table_names()
    )


def test_upgrade_is_idempotent_and_sqlite_uses_wal(engine) -> None:  # noqa: ANN001
    state_db.upgrade(engine)  # a second start must not fail
    with engine.connect() as conn:
        assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1


def _engine_at(path: Path, revision: str):  # noqa: ANN202
    """A database file migrated up to ``revision`` only: what an older server left."""
    from alembic import command

    eng = state_db.make_engine(f"sqlite:///{path}")
    cfg = state_db.alembic_config(eng.url.render_as_string(hide_password=False))
    with eng.begin() as conn:
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    return eng


def test_the_upgrade_numbers_the_images_an_older_server_stored(tmp_path: Path) -> None:
    """Before 0007 image numbers were worked out from every user message at each turn; the upgrade
    writes where each attachment was first named by a user message (a reply's choice does not count),
    and a server that stores more turns then carries on from there."""
    from state.attachments import attachment_refs
    from state.models import Message, new_id

    eng = _engine_at(tmp_path / "old.db", "0006")
    factory = state_db.make_session_factory(eng)
    with factory.begin() as db:
        user = store.get_or_create_user(db, name="old").id
        sid = store.create_session(db, user_id=user, title=None).id
        for a in "abcde":  # the attachments table as 0006 had it (the model has the new columns)
            db.execute(text("INSERT INTO attachments (id, user_id, session_id, sha256, kind, mime_type, size_bytes, meta, "
                            "created_at) VALUES (:a, :u, :s, :a, 'image', 'image/png', 1, '{}', '2026-01-01')"),
                       {"a": a, "u": user, "s": sid})  # fmt: skip
        named = {0: ["b"], 4: ["d", "a", "d"], 6: ["b", "e"], 9: ["c"]}  # c: only in a reply
        db.execute(Message.__table__.insert(), [
            {"id": new_id(), "session_id": sid, "turn_id": f"t{pos // 2}", "position": pos, "text": "", "status": "completed",
             "role": ("user", "assistant")[pos % 2], "attachment_ids": named.get(pos, [])} for pos in range(10)
        ])  # fmt: skip
    state_db.upgrade(eng)
    with factory.begin() as db:
        refs = attachment_refs(db, session_ids=[sid])[sid]
        assert {a: (r.first_position, r.first_index) for a, r in refs.items()} == {
            "a": (4, 1), "b": (0, 0), "c": (None, None), "d": (4, 0), "e": (6, 1)
        }
        turn = store.NewTurn(sid, "t5", "and these?", ["e", "c"], "received", None)
        store.add_turns(db, turns=[turn], titles={sid: "New chat"})
        refs = attachment_refs(db, session_ids=[sid])[sid]
        assert (refs["c"].first_position, refs["c"].first_index, refs["e"].first_position) == (10, 1, 6)
        assert db.query(Message).count() == 12
    with eng.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    eng.dispose()


def test_the_upgrade_removes_the_deltas_an_older_server_logged(tmp_path: Path) -> None:
    """Before 0006 every streamed delta was logged; a resume never read them once their reply had
    ended. The upgrade deletes them and keeps every other event."""
    eng = _engine_at(tmp_path / "old.db", "0005")
    factory = state_db.make_session_factory(eng)
    with factory.begin() as db:
        sid = store.create_session(db, user_id=store.get_or_create_user(db, name="old").id, title=None).id
        kinds = ["turn.created", "turn.routed", *["response.delta"] * 5, "response.done"] * 2
        store.append_events(db, events=[(sid, kind, lambda seq, k=kind: f'{{"type":"{k}","seq":{seq}}}') for kind in kinds])
    state_db.upgrade(eng)
    with factory() as db:
        kept = store.events_after(db, session_id=sid, after_seq=0)
        assert [(e.seq, e.type) for e in kept] == [(seq, kind) for seq, kind in enumerate(kinds, 1) if kind != "response.delta"]
        assert db.get(ChatSession, sid).last_seq == len(kinds)
    with eng.connect() as conn:
        assert compare_metadata(MigrationContext.configure(conn), Base.metadata) == []
    eng.dispose()


def test_tokens_are_stored_hashed_and_resolve_to_their_user(engine) -> None:  # noqa: ANN001
    factory = state_db.make_session_factory(engine)
    with factory.begin() as db:
        alice = store.get_or_create_user(db, name="alice")
        secret = store.create_token(db, user=alice)
    with factory() as db:
        assert store.user_for_token(db, token=secret).name == "alice"
        assert store.user_for_token(db, token=secret + "x") is None
        stored = db.execute(text("SELECT token_hash FROM tokens")).scalars().all()
        assert secret not in stored and store.hash_token(secret) in stored
    with factory.begin() as db:
        store.revoke_tokens(db, user=store.get_or_create_user(db, name="alice"))
    with factory() as db:
        assert store.user_for_token(db, token=secret) is None


def test_event_seq_is_monotonic_per_session_and_replayable(engine) -> None:  # noqa: ANN001
    factory = state_db.make_session_factory(engine)
    with factory.begin() as db:
        user = store.get_or_create_user(db, name="u")
        a = store.create_session(db, user_id=user.id).id
        b = store.create_session(db, user_id=user.id).id
    seqs = {a: [], b: []}
    for sid in (a, b, a, a, b):
        with factory.begin() as db:
            seqs[sid].append(store.append_event(db, session_id=sid, event_type="x", payload_for_seq=lambda s: f'{{"seq":{s}}}'))
    assert seqs == {a: [1, 2, 3], b: [1, 2]}
    with factory() as db:
        assert [e.seq for e in store.events_after(db, session_id=a, after_seq=1)] == [2, 3]
        with pytest.raises(LookupError):
            store.append_event(db, session_id="missing", event_type="x", payload_for_seq=str)


def test_sessions_belong_to_their_user(engine) -> None:  # noqa: ANN001
    factory = state_db.make_session_factory(engine)
    with factory.begin() as db:
        alice = store.get_or_create_user(db, name="alice")
        bob = store.get_or_create_user(db, name="bob")
        sid = store.create_session(db, user_id=alice.id, title="mine").id
    with factory() as db:
        assert store.get_session(db, session_id=sid, user_id=alice.id).title == "mine"
        assert store.get_session(db, session_id=sid, user_id=bob.id) is None
        assert store.list_sessions(db, user_id=bob.id) == []


def test_wal_checkpoints_run_beside_the_writers_not_in_their_commits(tmp_path: Path) -> None:
    """The server's connections never checkpoint in a commit (that is the event loop's time); the
    checkpoint thread copies the WAL back while they write, and its stop leaves an empty WAL and a
    database file that holds everything."""
    import time

    from state.checkpoints import WalCheckpointer

    path = tmp_path / "a.db"
    eng = state_db.make_engine(f"sqlite:///{path}", background_checkpoints=True)
    state_db.upgrade(eng)
    wal = Path(f"{path}-wal")

    def write(n: int) -> None:
        for _ in range(n):  # each commit appends pages to the WAL
            with state_db.make_session_factory(eng).begin() as db:
                store.create_session(db, user_id=store.get_or_create_user(db, name="u").id, title="x" * 2000)

    write(600)  # well past SQLite's 1,000-page automatic checkpoint
    with eng.connect() as conn:
        assert conn.execute(text("PRAGMA wal_autocheckpoint")).scalar() == 0
        page = conn.execute(text("PRAGMA page_size")).scalar()
    size = wal.stat().st_size
    assert size > 1000 * page, "the writers' own commits checkpointed (the WAL was rewound)"

    ckpt = WalCheckpointer(path, interval_s=0.05)
    ckpt.start()
    try:
        deadline = time.monotonic() + 10
        while (ckpt.last is None or ckpt.last[1] != ckpt.last[2]) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ckpt.last is not None and ckpt.last[0] == 0 and ckpt.last[1] == ckpt.last[2], ckpt.last
        write(600)  # the WAL is rewound after a full checkpoint, not grown
        assert wal.stat().st_size <= size * 1.1
    finally:
        ckpt.stop()
    eng.dispose()
    assert not wal.exists() or wal.stat().st_size == 0
    import sqlite3

    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT count(*) FROM sessions").fetchone()[0] == 1200


def test_blobs_go_when_no_attachment_refers_to_them_and_never_while_pinned(engine, tmp_path: Path) -> None:  # noqa: ANN001
    """A blob is shared by every row with the same bytes (any session, any user, as the file sent
    or as an image's thumbnail); it is removed only once none refers to it, and never while a
    request that is about to store a row for it holds a pin."""
    factory = state_db.make_session_factory(engine)
    blobs = BlobStore(tmp_path / "blobs")
    photo, thumb, other = (hashlib.sha256(b).hexdigest() for b in (b"photo", b"thumb", b"other"))
    for sha, data in ((photo, b"photo"), (thumb, b"thumb"), (other, b"other")):
        blobs.write(sha, data)
    with factory.begin() as db:
        alice = store.get_or_create_user(db, name="alice")
        bob = store.get_or_create_user(db, name="bob")
        mine = store.create_session(db, user_id=alice.id)
        theirs = store.create_session(db, user_id=bob.id)
        for sess, owner in ((mine, alice), (theirs, bob)):
            add_attachment(
                db, user_id=owner.id, session_id=sess.id, sha256=photo, kind="image", mime_type="image/jpeg",
                size_bytes=5, meta={"display_sha256": photo, "thumbnail_sha256": thumb},
            )  # fmt: skip
        mine_id = mine.id
    with factory.begin() as db:
        store.delete_session(db, session=store.get_session(db, session_id=mine_id, user_id=alice.id))
    assert release_blobs(factory, blobs, {photo, thumb, other}) == {other}  # bob's row still refers to two
    assert blobs.read(photo) == b"photo" and blobs.read(thumb) == b"thumb" and not blobs.path(other).exists()

    with factory.begin() as db:
        store.delete_session(db, session=store.get_session(db, session_id=theirs.id, user_id=bob.id))
    with blobs.pinned([photo]):  # an upload of the same photo is between its write and its row
        assert release_blobs(factory, blobs, {photo, thumb}) == {thumb}
        assert blobs.read(photo) == b"photo"
    assert release_blobs(factory, blobs, {photo}) == {photo}
    assert not any(p.is_file() for p in blobs.root.rglob("*"))


def test_the_sweep_removes_files_no_row_refers_to_and_stale_partial_writes(engine, tmp_path: Path) -> None:  # noqa: ANN001
    """What the server runs at start: files of sessions deleted before deletes removed them, and
    atomic writes a crash cut off, go; referenced files and a write still in progress stay."""
    factory = state_db.make_session_factory(engine)
    blobs = BlobStore(tmp_path / "blobs")
    kept, orphans = blobs.write(hashlib.sha256(b"kept").hexdigest(), b"kept"), [
        blobs.write(hashlib.sha256(bytes([i])).hexdigest(), bytes([i])) for i in range(3)
    ]
    with factory.begin() as db:
        alice = store.get_or_create_user(db, name="alice")
        sess = store.create_session(db, user_id=alice.id)
        add_attachment(
            db, user_id=alice.id, session_id=sess.id, sha256=kept.name, kind="audio", mime_type="audio/wav",
            size_bytes=4, meta={},
        )  # fmt: skip
    stale, fresh = kept.parent / ".tmp-crashed", kept.parent / ".tmp-writing"
    stale.write_bytes(b"x")
    fresh.write_bytes(b"x")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    assert sweep_blobs(factory, blobs) == 4
    assert kept.read_bytes() == b"kept" and fresh.exists()
    assert not stale.exists() and not any(p.exists() for p in orphans)
    assert sweep_blobs(factory, blobs) == 0
