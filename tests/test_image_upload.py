"""Uploading images over HTTP: real photos in, refusals with the right code, nothing half-stored."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from PIL import Image

from state import db as state_db
from state.attachments import BlobStore, blob_refs, session_attachments
from tests.conftest import LiveServer, make_settings, start_server, ws_client
from tests.photos import auth, new_session, photo, upload

MAX_BYTES = 1_000_000
MAX_PIXELS = 300_000  # the sample photos are 135k-274k pixels


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("uploads"), tiny_chat_model, image_max_bytes=MAX_BYTES, image_max_pixels=MAX_PIXELS
    )
    srv = start_server(settings)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def alice(live: LiveServer) -> str:
    return live.token("alice")


def stored(live: LiveServer, session_id: str) -> tuple[int, int]:
    """(attachment rows in the session, files in the blob store)."""
    with state_db.make_session_factory(live.app.state.engine)() as db:  # type: ignore[attr-defined]
        rows = len(session_attachments(db, session_id=session_id))
    blobs = live.settings.data_dir / "blobs"
    files = sum(len(f) for _, _, f in os.walk(blobs)) if blobs.exists() else 0
    return rows, files


def opened(data: bytes) -> Image.Image:
    img = Image.open(io.BytesIO(data))
    img.load()
    return img


def test_a_photo_uploads_and_is_served_with_a_thumbnail(live: LiveServer, alice: str) -> None:
    sid = new_session(live.http, alice)
    data = photo("astronaut")
    # The name and declared type lie; the bytes decide.
    r = upload(live.http, alice, sid, data, filename="notes.txt", content_type="text/plain")
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["kind"] == "image" and body["mime_type"] == "image/jpeg"
    assert (body["width"], body["height"], body["size_bytes"]) == (512, 512, len(data))
    assert body["sha256"] == hashlib.sha256(data).hexdigest()
    assert body["url"] == f"/v1/attachments/{body['id']}"
    assert body["thumbnail_url"] == f"/v1/attachments/{body['id']}/thumbnail"

    full = httpx.get(live.http + body["url"], headers=auth(alice))
    assert full.status_code == 200 and full.headers["content-type"] == "image/jpeg" and full.content == data
    thumb = httpx.get(live.http + body["thumbnail_url"], headers=auth(alice))
    assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/jpeg"
    img = opened(thumb.content)
    assert img.format == "JPEG" and max(img.size) == 256 and len(thumb.content) < len(data)

    # The same bytes again: the same attachment, stored once.
    before = stored(live, sid)
    again = upload(live.http, alice, sid, data)
    assert again.status_code == 201 and again.json()["id"] == body["id"]
    assert stored(live, sid) == before == (1, 2)  # one row; the photo and its thumbnail


@pytest.mark.parametrize(
    ("fmt", "mime", "size"),
    [("PNG", "image/png", (600, 400)), ("WEBP", "image/webp", (600, 400)), ("BMP", "image/bmp", (600, 400))],
)
def test_png_webp_and_bmp_are_accepted(live: LiveServer, alice: str, fmt: str, mime: str, size: tuple) -> None:
    sid = new_session(live.http, alice)
    r = upload(live.http, alice, sid, photo("coffee", fmt), filename="x.jpg")
    assert r.status_code == 201, r.text
    assert r.json()["mime_type"] == mime and (r.json()["width"], r.json()["height"]) == size


def test_an_animated_gif_is_read_by_its_first_frame(live: LiveServer, alice: str) -> None:
    first = Image.fromarray(__import__("skimage.data").data.chelsea())
    second = first.rotate(90, expand=True)
    buf = io.BytesIO()
    first.save(buf, "GIF", save_all=True, append_images=[second], duration=100)
    sid = new_session(live.http, alice)
    r = upload(live.http, alice, sid, buf.getvalue(), filename="cat.gif", content_type="image/gif")
    assert r.status_code == 201, r.text
    assert r.json()["mime_type"] == "image/gif" and (r.json()["width"], r.json()["height"]) == (451, 300)


def test_exif_orientation_is_applied(live: LiveServer, alice: str) -> None:
    img = Image.fromarray(__import__("skimage.data").data.chelsea())  # 451 wide, 300 high
    exif = Image.Exif()
    exif[0x0112] = 6  # the camera was turned: show it rotated 90 degrees clockwise
    buf = io.BytesIO()
    img.save(buf, "JPEG", exif=exif.tobytes())
    sid = new_session(live.http, alice)
    r = upload(live.http, alice, sid, buf.getvalue())
    assert r.status_code == 201, r.text
    assert (r.json()["width"], r.json()["height"]) == (300, 451)
    served = opened(httpx.get(live.http + r.json()["url"], headers=auth(alice)).content)
    assert served.size == (300, 451) and served.getexif().get(0x0112, 1) == 1
    thumb = opened(httpx.get(live.http + r.json()["thumbnail_url"], headers=auth(alice)).content)
    assert thumb.height > thumb.width


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_bomb(side: int = 30_000) -> bytes:
    """A 2 kB PNG that declares side x side pixels."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\0" * (side + 1) * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def noise_png(side: int) -> bytes:
    buf = io.BytesIO()
    Image.frombytes("RGB", (side, side), os.urandom(side * side * 3)).save(buf, "PNG")
    return buf.getvalue()


def plain_png(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (200, 30, 30)).save(buf, "PNG")
    return buf.getvalue()


def tiff() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (64, 64)).save(buf, "TIFF")
    return buf.getvalue()


REFUSALS = {
    "pdf_named_jpg": (b"%PDF-1.4\n1 0 obj\n<< /Type /Catalog >>\nendobj\ntrailer\n%%EOF\n", 415, "image_unsupported_type"),
    "text_named_jpg": (b"just some notes, not a photo\n" * 20, 415, "image_unsupported_type"),
    "tiff": (None, 415, "image_unsupported_type"),
    "empty": (b"", 400, "image_corrupt"),
    "jpeg_header_then_garbage": (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 8, 400, "image_corrupt"),
    "truncated_jpeg": (None, 400, "image_corrupt"),
    "truncated_png": (None, 400, "image_corrupt"),
    "too_many_bytes": (None, 413, "image_too_large"),
    "too_many_pixels": (None, 413, "image_too_many_pixels"),
    "decompression_bomb": (None, 413, "image_decompression_bomb"),
    "bomb_under_pillows_hard_limit": (None, 413, "image_decompression_bomb"),
}


def refusal_bytes(case: str) -> bytes:
    data = REFUSALS[case][0]
    if data is not None:
        return data
    return {
        "tiff": tiff,
        "truncated_jpeg": lambda: photo("rocket")[: len(photo("rocket")) * 2 // 3],
        "truncated_png": lambda: photo("coffee", "PNG")[: len(photo("coffee", "PNG")) // 2],
        "too_many_bytes": lambda: noise_png(640),
        "too_many_pixels": lambda: plain_png(1000, 800),
        "decompression_bomb": png_bomb,  # 900 Mpx: Pillow itself raises
        "bomb_under_pillows_hard_limit": lambda: png_bomb(10_000),  # 100 Mpx: Pillow only warns
    }[case]()


@pytest.mark.parametrize("case", list(REFUSALS))
def test_bad_images_are_refused_and_nothing_is_stored(live: LiveServer, alice: str, case: str) -> None:
    sid = new_session(live.http, alice)
    before = stored(live, sid)
    data = refusal_bytes(case)
    r = upload(live.http, alice, sid, data, filename="photo.jpg", content_type="image/jpeg")
    _, status, code = REFUSALS[case]
    assert r.status_code == status, r.text
    assert r.json()["detail"]["code"] == code and r.json()["detail"]["message"]
    assert stored(live, sid) == before
    # The server keeps serving: a good photo goes through right after.
    assert upload(live.http, alice, sid, photo("chelsea")).status_code == 201


def test_another_users_image_is_not_found(live: LiveServer, alice: str) -> None:
    bob = live.token("bob")
    sid = new_session(live.http, alice)
    att = upload(live.http, alice, sid, photo("rocket")).json()
    for path in (att["url"], att["thumbnail_url"], "/v1/attachments/nope", "/v1/attachments/nope/thumbnail"):
        r = httpx.get(live.http + path, headers=auth(bob))
        assert r.status_code == 404 and r.json()["detail"]["code"] == "attachment_not_found", path
    # Nor can bob upload into alice's session, or anyone without a token.
    r = upload(live.http, bob, sid, photo("rocket"))
    assert r.status_code == 404 and r.json()["detail"]["code"] == "session_not_found"
    assert httpx.get(live.http + att["url"]).status_code == 401


def test_deleting_a_session_deletes_its_images_unless_another_session_has_the_same_bytes(
    live: LiveServer, alice: str
) -> None:
    """The photo, its oriented copy and its thumbnail leave the disk with the last session that
    holds them: deleting one of two sessions with the same photo keeps it for the other."""
    bob = live.token("bob")
    turned = Image.Exif()
    turned[0x0112] = 6  # so the served copy is a file of its own
    shared = photo("rocket", "JPEG", quality=71, exif=turned.tobytes())  # bytes no other test sends
    alone = photo("coffee", "JPEG", quality=71)
    mine, kept = new_session(live.http, alice), new_session(live.http, bob)
    mine_shared, mine_alone = (upload(live.http, alice, mine, data).json() for data in (shared, alone))
    theirs = upload(live.http, bob, kept, shared).json()

    def files(session_id: str, sha: str) -> list[Path]:
        with state_db.make_session_factory(live.app.state.engine)() as db:  # type: ignore[attr-defined]
            row = next(a for a in session_attachments(db, session_id=session_id) if a.sha256 == sha)
            return [live.app.state.blobs.path(s) for s in blob_refs(row)]  # type: ignore[attr-defined]

    shared_files, alone_files = files(mine, mine_shared["sha256"]), files(mine, mine_alone["sha256"])
    assert len(shared_files) == 3 and len(alone_files) == 2 and all(p.is_file() for p in shared_files + alone_files)

    assert httpx.delete(f"{live.http}/v1/sessions/{mine}", headers=auth(alice)).status_code == 204
    assert not any(p.exists() for p in alone_files)
    assert all(p.is_file() for p in shared_files)
    for att in (mine_shared, mine_alone):
        assert httpx.get(live.http + att["url"], headers=auth(alice)).status_code == 404
    for path in (theirs["url"], theirs["thumbnail_url"]):  # bob's copy is whole
        assert httpx.get(live.http + path, headers=auth(bob)).status_code == 200, path

    assert httpx.delete(f"{live.http}/v1/sessions/{kept}", headers=auth(bob)).status_code == 204
    assert not any(p.exists() for p in shared_files)


def test_the_server_sweeps_files_no_attachment_refers_to_at_start(tmp_path: Path, tiny_chat_model: Path) -> None:
    """Files left by sessions deleted before deletes removed them go when the server starts."""
    settings = make_settings(tmp_path, tiny_chat_model)
    orphan = BlobStore(settings.data_dir / "blobs").write(hashlib.sha256(b"left").hexdigest(), b"left")
    srv = start_server(settings, skills={})
    try:
        deadline = time.monotonic() + 10
        while orphan.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not orphan.exists()
        token = srv.token("alice")
        att = upload(srv.http, token, new_session(srv.http, token), photo("chelsea")).json()
        assert httpx.get(srv.http + att["thumbnail_url"], headers=auth(token)).status_code == 200
    finally:
        srv.stop()


def test_an_unsent_image_can_be_taken_back_but_a_sent_one_stays_with_its_chat(live: LiveServer, alice: str) -> None:
    """The web client's tray: an image removed before sending is deleted, its files too; one a turn
    refers to is refused with 409 attachment_in_use and still served; another user gets 404."""
    sid = new_session(live.http, alice)
    unsent = upload(live.http, alice, sid, photo("astronaut", "JPEG", quality=73)).json()
    sent = upload(live.http, alice, sid, photo("chelsea", "JPEG", quality=73)).json()
    with state_db.make_session_factory(live.app.state.engine)() as db:  # type: ignore[attr-defined]
        rows = {a.id: a for a in session_attachments(db, session_id=sid)}
        files = [live.app.state.blobs.path(s) for s in blob_refs(rows[unsent["id"]])]  # type: ignore[attr-defined]

    async def send_turn() -> dict:
        async with ws_client(live, alice) as c:
            return (await c.turn(sid, "", attachment_ids=[sent["id"]]))[1]

    asyncio.run(send_turn())  # whatever the reply (this server has no vision models), the turn holds it

    def delete(token: str, att: dict) -> httpx.Response:
        return httpx.delete(f"{live.http}/v1/attachments/{att['id']}", headers=auth(token))

    assert delete(live.token("bob"), unsent).json()["detail"]["code"] == "attachment_not_found"
    r = delete(alice, sent)
    assert r.status_code == 409 and r.json()["detail"]["code"] == "attachment_in_use", r.text
    assert httpx.get(live.http + sent["url"], headers=auth(alice)).status_code == 200
    assert all(p.is_file() for p in files)
    assert delete(alice, unsent).status_code == 204
    assert not any(p.exists() for p in files)
    assert httpx.get(live.http + unsent["url"], headers=auth(alice)).status_code == 404
    assert delete(alice, unsent).status_code == 404
