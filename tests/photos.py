"""Real photographs (scikit-image's sample images) as upload bytes, and an upload helper."""

from __future__ import annotations

import io
from functools import cache

import httpx


@cache
def photo(name: str, fmt: str = "JPEG", **save: object) -> bytes:
    """``name``: astronaut, chelsea, coffee or rocket; ``fmt``: a Pillow format name."""
    import skimage.data
    from PIL import Image

    img = Image.fromarray(getattr(skimage.data, name)())
    buf = io.BytesIO()
    img.save(buf, fmt, **save)
    return buf.getvalue()


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def new_session(http: str, token: str) -> str:
    r = httpx.post(f"{http}/v1/sessions", headers=auth(token), json={})
    assert r.status_code == 201, r.text
    return r.json()["id"]


def upload(http: str, token: str, session_id: str, data: bytes, filename: str = "photo.jpg",
           content_type: str = "image/jpeg") -> httpx.Response:  # fmt: skip
    return httpx.post(
        f"{http}/v1/sessions/{session_id}/attachments",
        headers=auth(token),
        files={"file": (filename, data, content_type)},
        timeout=30,
    )
