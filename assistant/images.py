"""Image validation for uploads: sniff the real type, enforce limits, refuse bombs, fix orientation,
make a thumbnail. Pure Pillow, no I/O: bytes in, a ``CheckedImage`` (or an ``ImageRejected``) out."""

from __future__ import annotations

import io
from dataclasses import dataclass

from assistant.protocol import ErrorCode

_ORIENTATION = 0x0112  # the EXIF tag

# Formats we accept, by their magic bytes (never by file name or declared content type).
MIME_TYPES = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp", "GIF": "image/gif", "BMP": "image/bmp"}


def sniff_format(data: bytes) -> str | None:
    """The Pillow format name for the leading bytes, or None when they are not an accepted image."""
    if data[:3] == b"\xff\xd8\xff":
        return "JPEG"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "PNG"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "GIF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM":
        return "BMP"
    return None


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int  # refuse larger uploads (413 image_too_large)
    max_pixels: int  # refuse width*height above this (413 image_too_many_pixels)
    thumbnail_px: int = 256  # longest side of the thumbnail


class ImageRejected(Exception):
    """An upload that is not a usable image; ``status`` is the HTTP status to answer with."""

    def __init__(self, code: ErrorCode, message: str, status: int) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass(frozen=True)
class CheckedImage:
    format: str  # JPEG | PNG | WEBP | GIF | BMP (of the uploaded bytes)
    mime_type: str
    width: int  # after EXIF orientation
    height: int
    # The image as shown and as the models see it: the upload itself, or a re-encoding of it when
    # its EXIF orientation had to be applied.
    display: bytes
    display_mime_type: str
    thumbnail: bytes  # JPEG


def check_image(data: bytes, limits: ImageLimits) -> CheckedImage:
    """Validate ``data`` fully (decoding every pixel of the first frame) or raise ``ImageRejected``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    if len(data) > limits.max_bytes:
        raise ImageRejected(
            ErrorCode.image_too_large, f"the image is {len(data)} bytes; the limit is {limits.max_bytes}", 413
        )
    if not data:
        raise ImageRejected(ErrorCode.image_corrupt, "the file is empty", 400)
    fmt = sniff_format(data)
    if fmt is None:
        raise ImageRejected(
            ErrorCode.image_unsupported_type,
            "the file is not an image this server reads; send JPEG, PNG, WebP, GIF or BMP",
            415,
        )
    # Pillow refuses (DecompressionBombError) past twice its pixel limit and only warns past the
    # limit itself; both are refused here, without touching the process-wide warning filters.
    try:
        img = Image.open(io.BytesIO(data), formats=[fmt])
        width, height = img.size
        bomb_limit = Image.MAX_IMAGE_PIXELS
        if bomb_limit and width * height > bomb_limit:
            raise Image.DecompressionBombError(f"{width}x{height} pixels is over Pillow's limit of {bomb_limit}")
        if width * height > limits.max_pixels:
            raise ImageRejected(
                ErrorCode.image_too_many_pixels,
                f"the image is {width}x{height} = {width * height} pixels; the limit is {limits.max_pixels}",
                413,
            )
        img.seek(0)  # GIF/WebP: the first frame
        img.load()
        rotated = img.getexif().get(_ORIENTATION, 1) not in (0, 1)
        upright = ImageOps.exif_transpose(img) if rotated else img
    except Image.DecompressionBombError as exc:
        raise ImageRejected(ErrorCode.image_decompression_bomb, f"refused as a decompression bomb: {exc}", 413) from None
    except ImageRejected:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, IndexError) as exc:
        raise ImageRejected(
            ErrorCode.image_corrupt, f"the {fmt} file could not be decoded ({exc}); it may be truncated", 400
        ) from None
    display, display_mime = data, MIME_TYPES[fmt]
    if rotated:  # the orientation tag was applied: store what the user sees
        out_fmt = "JPEG" if fmt == "JPEG" else "PNG"
        display = _encode(upright, out_fmt)
        display_mime = MIME_TYPES[out_fmt]
    thumb = _flatten(upright.copy())
    thumb.thumbnail((limits.thumbnail_px, limits.thumbnail_px))
    return CheckedImage(
        format=fmt,
        mime_type=MIME_TYPES[fmt],
        width=upright.width,
        height=upright.height,
        display=display,
        display_mime_type=display_mime,
        thumbnail=_encode(thumb, "JPEG"),
    )


def _flatten(img):  # noqa: ANN001, ANN202 - PIL.Image in, RGB PIL.Image out
    """RGB, with transparency composited onto white."""
    from PIL import Image

    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return img.convert("RGB")


def _encode(img, fmt: str) -> bytes:  # noqa: ANN001
    buf = io.BytesIO()
    if fmt == "JPEG":
        _flatten(img).save(buf, "JPEG", quality=88)
    else:
        img.save(buf, fmt)
    return buf.getvalue()
