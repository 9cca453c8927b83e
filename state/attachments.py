"""Attachments (images, audio): bytes stored once by sha256 in a blob folder, rows owned by a user
and a session, referenced from turns by id. Never inline in history."""

from __future__ import annotations

import os
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from sqlalchemy import bindparam, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from state.models import Attachment, ChatSession, Message


class BlobStore:
    """Content-addressed files: ``root/ab/abcdef...`` for sha256 ``abcdef...``. Writes are atomic.

    The same bytes are stored once for every session and user that sends them, so a blob is removed
    only when no attachment row refers to it any more (``release_blobs``). A request that writes a
    blob pins it until the row that refers to it is committed: a session deleted meanwhile must not
    remove bytes another request is about to refer to."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._lock = threading.Lock()
        self._pins: Counter[str] = Counter()

    def path(self, sha256: str) -> Path:
        return self.root / sha256[:2] / sha256

    def write(self, sha256: str, data: bytes) -> Path:
        target = self.path(sha256)
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        return target

    def read(self, sha256: str) -> bytes:
        return self.path(sha256).read_bytes()

    @contextmanager
    def pinned(self, shas: Iterable[str]) -> Iterator[None]:
        """Keep ``shas`` from removal while they are written and the rows referring to them stored."""
        shas = list(shas)
        with self._lock:
            self._pins.update(shas)
        try:
            yield
        finally:
            with self._lock:
                self._pins.subtract(shas)
                self._pins = +self._pins  # drop the zero counts

    def remove_unreferenced(self, shas: Iterable[str], referenced: Callable[[set[str]], set[str]]) -> set[str]:
        """Remove the files of ``shas`` that are neither pinned nor in ``referenced(candidates)``."""
        with self._lock:  # a pin taken meanwhile waits: its write then finds the file gone and writes it again
            candidates = {sha for sha in shas if not self._pins[sha]}
            gone = candidates - referenced(candidates) if candidates else set()
            for sha in gone:
                self.path(sha).unlink(missing_ok=True)
        return gone


DERIVED_BLOBS = ("display_sha256", "thumbnail_sha256")  # an image's meta: the oriented copy served, the thumbnail


def blob_refs(row: Attachment) -> set[str]:
    """Every blob an attachment row refers to: the file as sent, and those derived from it."""
    meta = row.meta or {}
    return {row.sha256} | {meta[k] for k in DERIVED_BLOBS if meta.get(k)}


def referenced_blobs(db: Session, shas: set[str]) -> set[str]:
    """Which of ``shas`` some attachment row (any session, any user) still refers to."""
    derived = [func.json_extract(Attachment.meta, f"$.{key}") for key in DERIVED_BLOBS]
    rows = db.execute(
        select(Attachment.sha256, *derived).where(or_(Attachment.sha256.in_(shas), *(d.in_(shas) for d in derived)))
    )
    return {sha for row in rows for sha in row if sha in shas}


def release_blobs(sessions: sessionmaker[Session], blobs: BlobStore, shas: Iterable[str]) -> set[str]:
    """Remove the files of ``shas`` no attachment refers to any more; returns those removed."""
    with sessions() as db:
        return blobs.remove_unreferenced(shas, lambda candidates: referenced_blobs(db, candidates))


def sweep_blobs(sessions: sessionmaker[Session], blobs: BlobStore, *, stale_s: float = 3600.0) -> int:
    """Remove every file in the blob folder no attachment refers to: those of sessions deleted
    before deletes removed them, and writes a crash cut off. Returns how many went."""
    if not blobs.root.is_dir():
        return 0
    shas, removed, now = [], 0, time.time()
    for path in blobs.root.glob("*/*"):
        if path.name.startswith(".tmp-"):  # an atomic write that never finished
            if now - path.stat().st_mtime > stale_s:
                path.unlink(missing_ok=True)
                removed += 1
        elif len(path.name) == 64 and path.parent.name == path.name[:2]:
            shas.append(path.name)
    for start in range(0, len(shas), 500):  # within SQLite's bound variables per statement
        removed += len(release_blobs(sessions, blobs, shas[start : start + 500]))
    return removed


def add_attachment(
    db: Session,
    *,
    user_id: str,
    session_id: str,
    sha256: str,
    kind: str,
    mime_type: str,
    size_bytes: int,
    meta: dict,
) -> Attachment:
    """The session's attachment for these bytes: the existing row when the same file was sent before.
    Raises ``SessionGone`` when the session is deleted (or being purged: its row is still there)."""
    existing = db.scalar(select(Attachment).where(Attachment.session_id == session_id, Attachment.sha256 == sha256))
    if existing is not None:
        return existing
    row = Attachment(
        user_id=user_id,
        session_id=session_id,
        sha256=sha256,
        kind=kind,
        mime_type=mime_type,
        size_bytes=size_bytes,
        meta=meta,
    )
    db.add(row)
    db.flush()
    # Read after the insert, which holds SQLite's write lock until the commit: a delete is either
    # seen here or waits, and never purges a row this upload adds (its files would stay behind).
    if db.scalar(select(ChatSession.deleted).where(ChatSession.id == session_id)) is not False:
        raise SessionGone(session_id)
    return row


class SessionGone(LookupError):
    """The session an attachment was being added to is deleted."""


def get_attachment(db: Session, *, attachment_id: str, user_id: str) -> Attachment | None:
    """The attachment if it exists and belongs to ``user_id``; otherwise None."""
    row = db.get(Attachment, attachment_id)
    return row if row is not None and row.user_id == user_id else None


def attachment_in_use(db: Session, row: Attachment) -> bool:
    """Whether a turn refers to the attachment: a message's ``attachment_ids`` (the user's turn, or the
    reply of the vision skill that looked at it), or the spoken turn a recording became."""
    if (row.meta or {}).get("turn_id"):
        return True
    lists = db.scalars(select(Message.attachment_ids).where(Message.session_id == row.session_id))
    return any(row.id in (ids or ()) for ids in lists)


def session_attachments(db: Session, *, session_id: str) -> Sequence[Attachment]:
    stmt = select(Attachment).where(Attachment.session_id == session_id)
    return db.scalars(stmt.order_by(Attachment.created_at, Attachment.id)).all()


_attachments_t = Attachment.__table__


class AttachmentRef(NamedTuple):
    """What a turn needs of an attachment (a plain tuple: a long session may have thousands, and a
    SQLAlchemy Row's attributes cost ~10x a tuple's)."""

    session_id: str
    id: str
    user_id: str
    kind: str
    first_position: int | None  # where a user message of the session first named it (None: none has)
    first_index: int | None  # its place among that message's ids


_REFS = select(*(_attachments_t.c[k] for k in AttachmentRef._fields)).where(
    _attachments_t.c.session_id.in_(bindparam("sids", expanding=True))
)


def attachment_refs(db: Session, *, session_ids: Collection[str]) -> dict[str, dict[str, AttachmentRef]]:
    """Each of these sessions' attachments as ``id -> AttachmentRef``, in one prepared Core read:
    what admitting a turn checks its attachment ids against and numbers and labels the session's
    images with (no ORM objects, no JSON to parse). A session with none maps to ``{}``."""
    out: dict[str, dict[str, AttachmentRef]] = {sid: {} for sid in session_ids}
    if out:
        make = AttachmentRef._make
        for ref in map(make, db.connection().execute(_REFS, {"sids": list(out)}).all()):  # all(): one fetch, not one a row
            out[ref.session_id][ref.id] = ref
    return out
