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


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    tmp = tmp_path_factory.mktemp("browser-long-conversation")
    srv = start_server(make_settings(tmp, tmp, load_models=False), skills={"chat": FloodSkill(60)})
    yield srv
    srv.stop()


def test_a_long_conversation_opens_whole_in_order_newest_first_and_scrolled_to_its_end(browser, live: LiveServer) -> None:  # noqa: ANN001
    token = live.token("lena")

    async def build() -> str:
        async with ws_client(live, token) as c:
            sid = await c.new_session()
            for k in range(TURNS):
                await c.turn(sid, f"question {k}")
            return sid

    with ThreadPoolExecutor(1) as pool:  # Playwright's sync API runs an event loop in this thread
        sid = pool.submit(asyncio.run, build()).result()
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
        at_end = page.evaluate(
            "() => { const t = document.querySelector('[data-testid=thread]'); return t.scrollHeight - t.scrollTop - t.clientHeight; }"
        )
        assert at_end < 5, f"{at_end} px above the end of the thread"
        assert page.errors == [], page.errors
    finally:
        page.context.close()
