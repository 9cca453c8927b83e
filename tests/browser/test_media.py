"""Images and speech in the browser: upload + thumbnail + caption, and a fake microphone (Chromium's
fake capture device fed from a WAV of real speech) through audio.start / binary PCM16 / audio.commit."""

from __future__ import annotations

import importlib.util
import io
from collections.abc import Iterator
from pathlib import Path

import pytest

from state import db as state_db
from state.attachments import session_attachments
from state.store import title_from
from tests.browser.conftest import close_browser, history, launch, open_app, open_session_id, shot, wait_until
from tests.conftest import LiveServer, make_settings, start_server


def _paths(module: str) -> set[str]:
    """The REST paths a server module registers ('' when the module is not in this tree yet)."""
    import importlib

    try:
        router = importlib.import_module(module).router
    except (ImportError, AttributeError):
        return set()
    return {getattr(r, "path", "") for r in router.routes}


HAS_UPLOADS = "/v1/sessions/{session_id}/attachments" in _paths("assistant.uploads")
HAS_SPEECH = importlib.util.find_spec("assistant.speech_input") is not None  # audio.start handling
try:
    from tests.tiny_vision_models import build_tiny_blip
except ImportError:  # the vision work is not in this tree
    build_tiny_blip = None  # type: ignore[assignment]


@pytest.fixture(scope="module")
def wav(speech_files: dict[str, Path]) -> Path:
    return speech_files["wav"]


@pytest.fixture(scope="module")
def browser(wav: Path) -> Iterator[object]:
    # Chromium's fake microphone plays this file (looped); the permission prompt is auto-accepted.
    pw, b = launch([
        "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", f"--use-file-for-fake-audio-capture={wav}",
    ])  # fmt: skip
    yield b
    close_browser(pw, b)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path, tiny_whisper: Path) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("browser-media")
    extra: dict[str, object] = dict(speech_model=str(tiny_whisper), speech_device="cpu", speech_max_tokens=6)
    if build_tiny_blip is not None:
        extra.update(
            caption_model=str(build_tiny_blip(tmp / "caption", task="caption")),
            vqa_model=str(build_tiny_blip(tmp / "vqa", task="vqa")),
            vision_device="cpu",
            vision_max_new_tokens=8,
        )
    srv = start_server(make_settings(tmp, tiny_chat_model, **extra))
    yield srv
    srv.stop()


@pytest.fixture
def page(browser, live: LiveServer):  # noqa: ANN001, ANN201
    p = open_app(browser, live, live.token("erin"))
    yield p
    assert p.errors == [], p.errors
    p.context.close()


def png_bytes() -> bytes:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (96, 64), (30, 120, 200))
    ImageDraw.Draw(img).ellipse((20, 10, 70, 55), fill=(250, 200, 40))
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def attach_png(page):  # noqa: ANN001, ANN201
    """Pick a PNG with the image button; returns the tray item once it has uploaded."""
    attach = page.locator("[data-testid=attach]")
    wait_until(lambda: attach.is_enabled(), what="the image button to be enabled")
    page.locator("[data-testid=file-input]").set_input_files(
        files=[{"name": "dot.png", "mimeType": "image/png", "buffer": png_bytes()}]
    )
    tray = page.locator("[data-testid=tray-item]")
    tray.wait_for()
    wait_until(lambda: "uploading" not in (tray.get_attribute("class") or ""), what="upload")
    return tray


@pytest.mark.skipif(not HAS_UPLOADS or build_tiny_blip is None, reason="the server has no image upload route yet")
def test_pick_an_image_see_its_thumbnail_and_get_a_caption(page, live: LiveServer) -> None:  # noqa: ANN001
    tray = attach_png(page)
    page.locator("[data-testid=send]").click()  # no text: the image alone asks for a caption
    page.wait_for_selector("[data-testid=assistant-message][aria-busy=false]", timeout=60_000)
    assert tray.count() == 0, "sending took the image out of the tray"
    thumb = page.locator("[data-testid=user-message] [data-testid=thumbnail] img")
    wait_until(lambda: thumb.evaluate("(i) => i.complete && i.naturalWidth > 0"), what="thumbnail shown")
    assert thumb.get_attribute("src").startswith("blob:")
    assert page.locator("[data-testid=route-chip] summary").inner_text().startswith("caption · ")
    msgs = history(live, live.token("erin"), open_session_id(page))["messages"]
    assert msgs[0]["attachment_ids"] and msgs[1]["skill"] == "caption" and msgs[1]["status"] == "completed"
    assert page.locator("[data-testid=assistant-body]").text_content().strip() == msgs[1]["text"].strip()
    # A chat opened with an image alone is named after its caption, in the sidebar and the header.
    title = title_from(msgs[1]["text"], capitalise=True)
    wait_until(lambda: page.locator("#title").inner_text() == title, what="the chat named by its caption")
    assert page.locator(".session-title[aria-current]").inner_text() == title
    shot(page, "05-image-caption")
    # Re-run the same image as a question about it: the chip offers the vision skills.
    page.locator("[data-testid=route-chip] summary").click()
    options = page.locator("[data-testid=route-chip] .chip-menu button").all_inner_texts()
    assert "Answer as caption" in options and "Answer as question" in options
    # After a reload the thumbnail is fetched again with the token (no <img> can send the header).
    page.reload()
    page.wait_for_function("() => window.__assistant.state.connected")
    page.locator(".session-title").first.click()
    thumb = page.locator("[data-testid=user-message] [data-testid=thumbnail] img")
    thumb.wait_for()
    wait_until(lambda: thumb.evaluate("(i) => i.complete && i.naturalWidth > 0"), what="thumbnail after reload")


def test_an_image_removed_from_the_tray_is_deleted_on_the_server(page, live: LiveServer) -> None:  # noqa: ANN001
    tray = attach_png(page)

    def stored() -> list[str]:
        with state_db.make_session_factory(live.app.state.engine)() as db:  # type: ignore[attr-defined]
            return [a.id for a in session_attachments(db, session_id=open_session_id(page))]

    assert len(stored()) == 1
    tray.locator("button.remove").click()
    assert tray.count() == 0
    wait_until(lambda: stored() == [], what="the attachment deleted on the server")


@pytest.mark.skipif(not HAS_SPEECH, reason="the server does not handle audio.start yet")
def test_hold_to_talk_with_review_puts_the_transcript_in_the_composer(page, live: LiveServer) -> None:  # noqa: ANN001
    mic = page.locator("[data-testid=mic]")
    wait_until(lambda: mic.is_enabled(), what="the microphone button to be enabled")
    page.locator("[data-testid=review]").check()
    mic.hover()
    page.mouse.down()
    level = wait_until(
        lambda: float(page.evaluate("() => getComputedStyle(document.getElementById('level')).getPropertyValue('--level') || 0")) > 0.01 and True,
        what="the level meter to move",
    )
    assert level
    assert "recording" in mic.get_attribute("class")
    page.wait_for_timeout(1500)
    page.mouse.up()
    composer = page.locator("[data-testid=composer]")
    wait_until(lambda: composer.input_value().strip(), timeout=60, what="the transcript in the composer")
    shot(page, "08-transcript-review")
    transcript = composer.input_value()
    sid = open_session_id(page)
    assert history(live, live.token("erin"), sid)["messages"] == []  # review: nothing was sent yet
    composer.press("Enter")
    page.wait_for_selector("[data-testid=assistant-message][aria-busy=false]", timeout=60_000)
    msgs = history(live, live.token("erin"), sid)["messages"]
    assert msgs[0]["text"] == transcript


@pytest.mark.skipif(not HAS_SPEECH, reason="the server does not handle audio.start yet")
def test_speaking_without_review_runs_the_turn(page, live: LiveServer) -> None:  # noqa: ANN001
    mic = page.locator("[data-testid=mic]")
    wait_until(lambda: mic.is_enabled(), what="the microphone button to be enabled")
    page.keyboard.press("Control+m")  # the keyboard way: press to start, press again to send
    wait_until(lambda: "recording" in (mic.get_attribute("class") or ""), what="recording")
    page.wait_for_timeout(1500)
    page.keyboard.press("Control+m")
    user = page.locator("[data-testid=user-message]")
    user.wait_for(timeout=60_000)
    assert user.get_attribute("data-input") == "speech"
    page.wait_for_selector("[data-testid=assistant-message][aria-busy=false]", timeout=60_000)
    msgs = history(live, live.token("erin"), open_session_id(page))["messages"]
    assert msgs[0]["text"] == user.locator(".text").inner_text()
