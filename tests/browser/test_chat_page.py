"""The chat page against a real server with the tiny chat model: sending, streaming, history,
session management, the route chip, keyboard use, phone width and the dark theme."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.browser.conftest import history, open_app, open_session_id, rendered, shot, wait_until
from tests.conftest import LiveServer, make_settings, start_server

BODY = "[data-testid=assistant-body]"


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path) -> Iterator[LiveServer]:
    # Sampling (temperature 1) makes the random model babble visible characters; greedy decoding
    # of this checkpoint repeats "\n", which renders as nothing.
    srv = start_server(make_settings(tmp_path_factory.mktemp("browser-chat"), tiny_chat_model, chat_temperature=1.0))
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def long_replies(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path) -> Iterator[LiveServer]:
    """Replies of 256 tokens, for watching one stream in: the page renders once per animation frame,
    and the tiny model's 24 tokens can all arrive within one."""
    srv = start_server(
        make_settings(tmp_path_factory.mktemp("browser-long"), tiny_chat_model, chat_temperature=1.0, chat_max_new_tokens=256)
    )
    yield srv
    srv.stop()


def open_page(browser, live: LiveServer) -> Iterator[object]:  # noqa: ANN001
    p = open_app(browser, live, live.token("alice"))
    yield p
    assert p.errors == [], p.errors  # no uncaught exception in the page
    p.context.close()


@pytest.fixture
def page(browser, live: LiveServer):  # noqa: ANN001, ANN201
    yield from open_page(browser, live)


@pytest.fixture
def long_page(browser, long_replies: LiveServer):  # noqa: ANN001, ANN201
    yield from open_page(browser, long_replies)


def send(page, text: str) -> None:  # noqa: ANN001
    page.locator("[data-testid=composer]").fill(text)
    page.locator("[data-testid=composer]").press("Enter")


def done(page, n: int = 1) -> None:  # noqa: ANN001
    page.wait_for_function(
        "(n) => document.querySelectorAll('[data-testid=assistant-message][aria-busy=false]').length >= n", arg=n
    )


def test_send_streams_progressively_and_matches_the_stored_reply(long_page, long_replies: LiveServer) -> None:  # noqa: ANN001
    page, live = long_page, long_replies
    shot(page, "01-empty")
    # Record every length the reply's text goes through, as the user would see it grow.
    page.evaluate(
        """() => { window.__lengths = []; new MutationObserver(() => {
             const b = document.querySelector('[data-testid=assistant-body]');
             if (b) window.__lengths.push(b.textContent.length);
           }).observe(document.querySelector('[data-testid=thread]'), {subtree: true, childList: true, characterData: true}); }"""
    )
    composer = page.locator("[data-testid=composer]")
    composer.fill("first line")
    composer.press("Shift+Enter")  # a new line, not a send
    composer.type("second line")
    assert composer.input_value() == "first line\nsecond line"
    assert page.locator("[data-testid=user-message]").count() == 0
    composer.press("Enter")
    assert composer.input_value() == ""
    page.wait_for_selector("[data-testid=user-message]")
    assert page.locator("[data-testid=user-message]").inner_text().strip() == "first line\nsecond line"
    done(page)
    sid = open_session_id(page)
    msgs = history(live, live.token("alice"), sid)["messages"]
    assert [m["role"] for m in msgs] == ["user", "assistant"]
    assert msgs[0]["text"] == "first line\nsecond line"
    reply = msgs[1]
    assert reply["status"] == "completed" and reply["text"]
    # The page shows exactly the stored reply (rendered), and showed it in several steps first.
    assert page.locator(BODY).text_content() == rendered(page, reply["text"])
    lengths = [n for n in page.evaluate("() => window.__lengths") if n]
    assert len(set(lengths)) >= 2, lengths
    assert lengths == sorted(lengths), "the reply never shrinks while it streams"
    # The chip names the skill, the router's confidence and reason.
    chip = page.locator("[data-testid=route-chip] summary")
    assert chip.inner_text().startswith("chat · 90%")
    assert "chat generation answers it" in chip.inner_text()
    # The first message titles the session in the sidebar.
    wait_until(lambda: "first line" in page.locator("[data-testid=sessions]").inner_text(), what="sidebar title")


def test_reload_finds_history_and_sidebar_lists_newest_first(page, live: LiveServer) -> None:  # noqa: ANN001
    send(page, "older chat")
    done(page)
    older = open_session_id(page)
    older_reply = page.locator(BODY).text_content()
    page.locator("[data-testid=new-chat]").click()
    assert page.locator("[data-testid=user-message]").count() == 0
    send(page, "newer chat")
    done(page)
    newer = open_session_id(page)
    assert newer != older
    page.reload()
    page.wait_for_function("() => window.__assistant.state.connected")
    items = page.locator("[data-testid=sessions] li")
    wait_until(lambda: items.count() >= 2, what="two sessions")
    ids = [items.nth(i).get_attribute("data-id") for i in range(items.count())]
    assert ids.index(newer) < ids.index(older), "newest first"
    page.locator(f"[data-testid=sessions] li[data-id='{older}'] .session-title").click()
    page.wait_for_selector("[data-testid=assistant-message][data-status=completed]")
    assert page.locator("[data-testid=user-message]").inner_text().strip() == "older chat"
    assert page.locator(BODY).text_content() == older_reply
    assert page.locator("h1#title").inner_text() == "older chat"


def test_rename_export_and_delete_a_session(page, live: LiveServer, tmp_path: Path) -> None:  # noqa: ANN001
    send(page, "name me")
    done(page)
    sid = open_session_id(page)
    item = page.locator(f"[data-testid=sessions] li[data-id='{sid}']")
    item.wait_for()
    item.get_by_role("button", name="Rename").click()
    field = page.locator("[data-testid=rename-input]")
    field.fill("Renamed chat")
    field.press("Enter")
    wait_until(lambda: page.locator("h1#title").inner_text() == "Renamed chat", what="new title")
    token = live.token("alice")
    assert history(live, token, sid)["session"]["title"] == "Renamed chat"

    stored = history(live, token, sid)
    page.locator("[data-testid=export] summary").click()
    with page.expect_download() as dl:
        page.locator("[data-testid=export-json]").click()
    exported = json.loads(Path(dl.value.path()).read_text())
    assert dl.value.suggested_filename == "renamed-chat.json"
    assert exported["messages"] == stored["messages"]
    page.locator("[data-testid=export] summary").click()
    with page.expect_download() as dl:
        page.locator("[data-testid=export-md]").click()
    md = Path(dl.value.path()).read_text()
    assert md.startswith("# Renamed chat") and "## You\n\nname me" in md
    assert stored["messages"][1]["text"].strip() in md

    item.get_by_role("button", name="Delete").click()  # the confirm() dialog is accepted
    wait_until(lambda: page.locator(f"[data-testid=sessions] li[data-id='{sid}']").count() == 0, what="removed")
    r = httpx.get(f"{live.http}/v1/sessions/{sid}/messages", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 404
    assert page.locator("h1#title").inner_text() == "New chat"
    assert page.locator("[data-testid=user-message]").count() == 0


def test_a_rename_survives_the_sidebar_refresh_a_new_turn_brings(page, live: LiveServer) -> None:  # noqa: ANN001
    """A turn's turn.created refreshes the sidebar 300 ms later (the first turn names the session);
    a rename begun before that must still be there to finish."""
    send(page, "first words")
    sid = wait_until(lambda: open_session_id(page), what="the new session")
    item = page.locator(f"[data-testid=sessions] li[data-id='{sid}']")
    item.wait_for()
    item.get_by_role("button", name="Rename").click()
    field = page.locator("[data-testid=rename-input]")
    field.fill("Kept title")
    page.wait_for_timeout(800)  # the refresh has run meanwhile
    field.press("Enter", timeout=5000)
    wait_until(lambda: page.locator("h1#title").inner_text() == "Kept title", what="new title")
    assert history(live, live.token("alice"), sid)["session"]["title"] == "Kept title"


def test_route_chip_reruns_the_turn_with_another_skill(page, live: LiveServer) -> None:  # noqa: ANN001
    send(page, "route me")
    done(page)
    page.locator("[data-testid=route-chip] summary").click()
    menu = page.locator("[data-testid=route-chip] .chip-menu button")
    assert menu.all_inner_texts() == ["Answer as chat"]  # no image in this turn, no vision skill here
    menu.first.click()
    done(page, 2)
    assert page.locator("[data-testid=user-message]").nth(1).inner_text().strip() == "route me"
    second = page.locator("[data-testid=route-chip] summary").nth(1).inner_text()
    assert second.startswith("chat · 100% · chosen") and "the user asked for the chat skill" in second
    msgs = history(live, live.token("alice"), open_session_id(page))["messages"]
    assert [(m["role"], m["text"] if m["role"] == "user" else m["skill_override"]) for m in msgs] == [
        ("user", "route me"), ("assistant", None), ("user", "route me"), ("assistant", "chat"),
    ]


def test_media_buttons_say_why_they_are_disabled(page) -> None:  # noqa: ANN001
    attach, mic = page.locator("[data-testid=attach]"), page.locator("[data-testid=mic]")
    assert attach.is_disabled() and mic.is_disabled()
    assert "no caption skill" in attach.get_attribute("title")
    # this server runs without a speech model: its speech skill is there but off (or absent)
    assert mic.get_attribute("title").startswith("Speech input ")
    assert any(w in mic.get_attribute("title") for w in ("turned off", "no speech skill")), mic.get_attribute("title")


def test_keyboard_only_send_and_stop(page) -> None:  # noqa: ANN001
    page.keyboard.press("Tab")  # the skip link
    page.keyboard.press("Enter")
    assert page.evaluate("() => document.activeElement.dataset.testid") == "composer"
    page.keyboard.type("typed without a mouse")
    page.keyboard.press("Enter")
    done(page)
    assert page.locator("[data-testid=user-message]").inner_text().strip() == "typed without a mouse"
    # The route chip opens and re-runs with the keyboard: Tab back to it, Enter, Tab, Enter.
    page.locator("[data-testid=composer]").focus()
    for _ in range(12):
        page.keyboard.press("Shift+Tab")
        if page.evaluate("() => document.activeElement.tagName") == "SUMMARY":
            break
    assert page.evaluate("() => document.activeElement.closest('[data-testid=route-chip]') !== null")
    page.keyboard.press("Enter")
    page.keyboard.press("Tab")
    assert page.evaluate("() => document.activeElement.textContent") == "Answer as chat"
    page.keyboard.press("Enter")
    done(page, 2)
    assert page.locator("[data-testid=user-message]").count() == 2


def test_phone_width_and_dark_theme(browser, live: LiveServer) -> None:  # noqa: ANN001
    page = open_app(
        browser, live, live.token("alice"),
        viewport={"width": 390, "height": 844}, color_scheme="dark", is_mobile=True, has_touch=True,
    )  # fmt: skip
    try:
        bg = page.evaluate("() => getComputedStyle(document.body).backgroundColor")
        assert bg == "rgb(22, 22, 26)", bg  # the dark palette follows the system
        sidebar = page.locator("#sidebar")
        assert not sidebar.is_visible()  # out of the way on a phone
        send(page, "hello from a phone")
        done(page)
        # Nothing is wider than the screen.
        assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
        box = page.locator("[data-testid=send]").bounding_box()
        assert box and box["x"] + box["width"] <= 390
        shot(page, "06-phone-dark")
        page.locator("#menu").click()
        sidebar.wait_for(state="visible")
        assert page.locator("#menu").get_attribute("aria-expanded") == "true"
        shot(page, "07-phone-dark-sidebar")
        page.keyboard.press("Escape")
        wait_until(lambda: not sidebar.is_visible(), what="sidebar closed")
        assert page.errors == []
    finally:
        page.context.close()
