"""Image uploads over HTTP: validate, store by sha256, serve the image and its thumbnail.

Images are referenced from turns by the id returned here (``turn.create``'s ``attachment_ids``).
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Literal

from fastapi import APIRouter, HTTPException, Request, Response, UploadFile
from pydantic import BaseModel
from sqlalchemy.exc import IntegrityError

from assistant.auth import User
from assistant.images import ImageLimits, ImageRejected, check_image
from state import store
from state.attachments import (
    BlobStore,
    SessionGone,
    add_attachment,
    attachment_in_use,
    blob_refs,
    get_attachment,
    release_blobs,
    session_attachments,
)
from state.models import Attachment

router = APIRouter(prefix="/v1", tags=["attachments"])

# Content-addressed bytes never change: let the browser keep them.
_CACHE = {"Cache-Control": "private, max-age=31536000, immutable"}


class AttachmentOut(BaseModel):
    id: str
    kind: Literal["image"] = "image"
    mime_type: str
    width: int
    height: int
    size_bytes: int
    sha256: str
    thumbnail_url: str
    url: str


def attachment_out(row: Attachment) -> AttachmentOut:
    return AttachmentOut(
        id=row.id,
        mime_type=row.mime_type,
        width=int(row.meta.get("width", 0)),
        height=int(row.meta.get("height", 0)),
        size_bytes=row.size_bytes,
        sha256=row.sha256,
        thumbnail_url=f"/v1/attachments/{row.id}/thumbnail",
        url=f"/v1/attachments/{row.id}",
    )


def _error(code: str, message: str, http_status: int) -> HTTPException:
    return HTTPException(http_status, detail={"code": code, "message": message})


def _not_found(attachment_id: str) -> HTTPException:
    return _error("attachment_not_found", f"no attachment {attachment_id!r} for this user", 404)


def _read_limited(file: UploadFile, limit: int) -> bytes:
    """At most ``limit + 1`` bytes, so an oversized upload is refused without reading all of it."""
    return file.file.read(limit + 1)


@router.post("/sessions/{session_id}/attachments", response_model=AttachmentOut, status_code=201)
def upload_image(request: Request, user: User, session_id: str, file: UploadFile) -> AttachmentOut:
    """Upload an image to a session (multipart field ``file``). The same bytes twice give the same id."""
    settings = request.app.state.settings
    blobs: BlobStore = request.app.state.blobs
    with request.app.state.sessions() as db:
        if store.get_session(db, session_id=session_id, user_id=user.id) is None:
            raise _error("session_not_found", f"no session {session_id!r}", 404)
    data = _read_limited(file, settings.image_max_bytes)
    sha = _sha256(data)
    with request.app.state.sessions() as db:
        existing = next((a for a in session_attachments(db, session_id=session_id) if a.sha256 == sha), None)
        if existing is not None:
            return attachment_out(existing)
    limits = ImageLimits(settings.image_max_bytes, settings.image_max_pixels, settings.image_thumbnail_px)
    try:
        image = check_image(data, limits)
    except ImageRejected as exc:
        raise _error(exc.code.value, exc.message, exc.status) from None
    display_sha, thumbnail_sha = _sha256(image.display), _sha256(image.thumbnail)
    files = {sha: data, display_sha: image.display, thumbnail_sha: image.thumbnail}
    meta = {
        "width": image.width,
        "height": image.height,
        "format": image.format,
        "display_sha256": display_sha,
        "display_mime_type": image.display_mime_type,
        "thumbnail_sha256": thumbnail_sha,
    }
    try:
        with blobs.pinned(files):  # a session deleted meanwhile leaves these files alone
            for blob_sha, blob in files.items():
                blobs.write(blob_sha, blob)
            with request.app.state.sessions.begin() as db:
                row = add_attachment(
                    db,
                    user_id=user.id,
                    session_id=session_id,
                    sha256=sha,
                    kind="image",
                    mime_type=image.mime_type,
                    size_bytes=len(data),
                    meta=meta,
                )
                return attachment_out(row)
    except (IntegrityError, SessionGone):  # the same bytes uploaded at the same moment, or the session deleted meanwhile
        with request.app.state.sessions() as db:
            row = next((a for a in session_attachments(db, session_id=session_id) if a.sha256 == sha), None)
            if row is not None:
                return attachment_out(row)
        release_blobs(request.app.state.sessions, blobs, files)
        raise _error("session_not_found", f"no session {session_id!r}", 404) from None
    except BaseException:  # no row refers to these files
        release_blobs(request.app.state.sessions, blobs, files)
        raise


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _owned(request: Request, user_id: str, attachment_id: str) -> Attachment:
    with request.app.state.sessions() as db:
        row = get_attachment(db, attachment_id=attachment_id, user_id=user_id)
        if row is None:
            raise _not_found(attachment_id)
        db.expunge(row)
        return row


def _blob(request: Request, sha: str, attachment_id: str) -> bytes:
    try:
        return request.app.state.blobs.read(sha)
    except FileNotFoundError:
        raise _error("attachment_not_found", f"the bytes of attachment {attachment_id!r} are missing", 404) from None


@router.get("/attachments/{attachment_id}", responses={200: {"content": {"image/*": {}}}})
def read_attachment(request: Request, user: User, attachment_id: str) -> Response:
    """The file; for images, EXIF orientation already applied."""
    row = _owned(request, user.id, attachment_id)
    sha = row.meta.get("display_sha256", row.sha256)
    mime = row.meta.get("display_mime_type", row.mime_type)
    return Response(_blob(request, sha, attachment_id), media_type=mime, headers=_CACHE)


@router.get("/attachments/{attachment_id}/thumbnail", responses={200: {"content": {"image/jpeg": {}}}})
def read_thumbnail(request: Request, user: User, attachment_id: str) -> Response:
    """A small JPEG of the image (longest side ``ASSISTANT_IMAGE_THUMBNAIL_PX``)."""
    row = _owned(request, user.id, attachment_id)
    thumb = row.meta.get("thumbnail_sha256")
    if row.kind != "image" or not thumb:
        raise _error("attachment_not_found", f"attachment {attachment_id!r} has no thumbnail", 404)
    return Response(_blob(request, thumb, attachment_id), media_type="image/jpeg", headers=_CACHE)


@router.delete("/attachments/{attachment_id}", status_code=204)
async def delete_attachment(request: Request, user: User, attachment_id: str) -> Response:
    """Take back a file uploaded for a turn not sent yet (the web client's tray): its row, and its
    bytes unless another attachment has the same. One that a turn refers to stays with the chat
    (409 ``attachment_in_use``; deleting the chat removes it). Runs on the event loop, as turns
    are created, so a turn cannot pick the attachment up halfway through."""
    with request.app.state.sessions.begin() as db:
        row = get_attachment(db, attachment_id=attachment_id, user_id=user.id)
        if row is None:
            raise _not_found(attachment_id)
        if attachment_in_use(db, row):
            raise _error("attachment_in_use", f"attachment {attachment_id!r} was sent in a turn; delete the chat to remove it", 409)
        blobs = blob_refs(row)
        db.delete(row)
    await asyncio.to_thread(release_blobs, request.app.state.sessions, request.app.state.blobs, blobs)
    return Response(status_code=204)
