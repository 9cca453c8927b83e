"""Attachments (images, audio): bytes stored once by sha256 in a blob folder, rows owned by a user
and a session, referenced from turns by id. Never inline in history."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from state.models import Attachment


class BlobStore:
    """Content-addressed files: ``root/ab/abcdef...`` for sha256 ``abcdef...``. Writes are atomic."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, sha256: str, suffix: str = "") -> Path:
        return self.root / sha256[:2] / f"{sha256}{suffix}"

    def put(self, data: bytes, suffix: str = "") -> str:
        sha = hashlib.sha256(data).hexdigest()
        self.write(sha, data, suffix)
        return sha

    def write(self, sha256: str, data: bytes, suffix: str = "") -> Path:
        target = self.path(sha256, suffix)
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

    def read(self, sha256: str, suffix: str = "") -> bytes:
        return self.path(sha256, suffix).read_bytes()


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
    """The session's attachment for these bytes: the existing row when the same file was sent before."""
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
    return row


def get_attachment(db: Session, *, attachment_id: str, user_id: str) -> Attachment | None:
    """The attachment if it exists and belongs to ``user_id``; otherwise None."""
    row = db.get(Attachment, attachment_id)
    return row if row is not None and row.user_id == user_id else None


def session_attachments(db: Session, *, session_id: str, kind: str | None = None) -> Sequence[Attachment]:
    stmt = select(Attachment).where(Attachment.session_id == session_id)
    if kind is not None:
        stmt = stmt.where(Attachment.kind == kind)
    return db.scalars(stmt.order_by(Attachment.created_at, Attachment.id)).all()
