"""Opening a long conversation in the browser: every turn is there, in order, drawn when its replay
has arrived (not once per event: 300 turns took 5-6 s on the 2-core CPU, each event forcing a layout
of the whole thread), the newest turns first and the older ones above them, with the ended replies
shown from their ``response.done``, and the thread left at its end."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.baseline import FloodSkill
from tests.browser.conftest import history, open_app, rendered
from tests.conftest import LiveServer, make_settings, start_server, ws_client

TURNS = 150


FLOOD = FloodSkill(60)  # its pace is set by the streaming test


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("browser-long-conversation")
    srv = start_server(make_settings(tmp, tmp, load_models=False), skills={"chat": FLOOD})
    yield srv
    srv.stop()


def build(live: LiveServer, token: str) -> str:
    """A session of ``TURNS`` turns, made over the websocket."""

    async def turns() -> str:
        async with ws_client(live, token) as c:
            sid = await c.new_session()
            for k in range(TURNS):
                await c.turn(sid, f"question {k}")
            return sid

    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API runs an event loop in this thread
        return pool.submit(asyncio.run, turns()).result()


def px_above_end(page) -> float:  # noqa: ANN001
    """How far the thread is scrolled above its end."""
    return page.evaluate(
        "() => { const t = document.querySelector('[data-testid=thread]'); return t.scrollHeight - t.scrollTop - t.clientHeight; }"
    )


def test_a_long_conversation_opens_whole_in_order_newest_first_and_scrolled_to_its_end(browser, live: LiveServer) -> None:  # noqa: ANN001
    token = live.token("lena")
    sid = build(live, token)
    page = open_app(browser, live, token)
    try:
        page.wait_for_selector(f"[data-testid=sessions] li[data-id='{sid}']")
        paints, frames = page.evaluate("() => [window.__assistant.state.paints, window.__assistant.state.frames]")
        page.locator(f"[data-testid=sessions] li[data-id='{sid}'] .session-title").click()
        page.wait_for_function(
            "(n) => document.querySelectorAll('[data-testid=assistant-message][data-status=completed]').length >= n",
            arg=TURNS, timeout=60_000,
        )  # fmt: skip
        users = page.locator("[data-testid=user-message] .text").all_inner_texts()
        assert users == [f"question {k}" for k in range(TURNS)]
        stored = history(live, token, sid)["messages"]
        bodies = page.locator("[data-testid=assistant-body]")
        assert bodies.count() == TURNS
        last = [m for m in stored if m["role"] == "assistant"][-1]["text"]
        assert bodies.nth(TURNS - 1).text_content() == rendered(page, last) and last.strip()
        assert bodies.nth(0).text_content() == rendered(page, [m for m in stored if m["role"] == "assistant"][0]["text"])
        # 450 replayed events, drawn in a few paints: the opening, the replay's end (its newest 40
        # turns), then the older turns above them, 40 a frame
        assert page.evaluate("() => window.__assistant.state.paints") - paints <= 2 + -(-(TURNS - 40) // 40)
        # which came batched (session.resume with batch): a session.replay frame and session.resumed
        assert page.evaluate("() => window.__assistant.state.frames") - frames == 2
        at_end = px_above_end(page)
        assert at_end < 5, f"{at_end} px above the end of the thread"
        assert page.errors == [], page.errors
    finally:
        page.context.close()


def test_a_reply_streaming_into_a_long_conversation_is_laid_out_once_a_paint_and_followed(
    browser, live: LiveServer  # noqa: ANN001
) -> None:
    """Each paint of a streaming reply lays the page out once: the controls and the status line are
    not rewritten with the text they already show (which laid the whole thread out a second time each
    paint, 3-4 ms of 8.5 in a 300-turn thread: bench/web_open.py --stream-pace). Counted by Chromium
    (the DevTools protocol's Performance.getMetrics), not timed."""
    token = live.token("mira")
    sid = build(live, token)
    page = open_app(browser, live, token)
    try:
        page.locator(f"[data-testid=sessions] li[data-id='{sid}'] .session-title").click()
        done = "(n) => document.querySelectorAll('[data-testid=assistant-message][data-status=completed]').length >= n"
        page.wait_for_function(done, arg=TURNS, timeout=60_000)
        page.locator("[data-testid=composer]").fill("one more question")
        cdp = page.context.new_cdp_session(page)
        cdp.send("Performance.enable")

        def counts() -> tuple[float, int]:
            metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
            return metrics["LayoutCount"], page.evaluate("() => window.__assistant.state.paints")

        FLOOD.pace_s = 0.015  # 60 words over about a second: dozens of paints
        try:
            layouts, paints = counts()
            page.keyboard.press("Enter")
            page.wait_for_function(done, arg=TURNS + 1, timeout=60_000)
        finally:
            FLOOD.pace_s = 0.0
        after_layouts, after_paints = counts()
        assert after_paints - paints >= 20, "the reply was not drawn as it streamed"
        assert after_layouts - layouts <= after_paints - paints + 5, (after_layouts - layouts, after_paints - paints)
        stored = [m for m in history(live, token, sid)["messages"] if m["role"] == "assistant"][-1]["text"]
        assert page.locator("[data-testid=assistant-body]").nth(TURNS).text_content() == rendered(page, stored)
        at_end = px_above_end(page)
        assert at_end < 5, f"{at_end} px above the end of the thread: it did not follow the reply"
        assert page.errors == [], page.errors
    finally:
        page.context.close()
