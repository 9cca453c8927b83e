"""Long replies from the tiny chat model (3000 tokens): Stop, the busy queue, and Esc."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.conftest import history, open_app, open_session_id, shot, wait_until
from tests.conftest import LiveServer, make_settings, start_server


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path) -> Iterator[LiveServer]:
    settings = make_settings(
        tmp_path_factory.mktemp("browser-long"), tiny_chat_model, chat_max_new_tokens=3000, chat_temperature=0.0
    )  # greedy: this checkpoint never reaches EOS, so the reply really is 3000 tokens (all "\n")
    srv = start_server(settings)
    yield srv
    srv.stop()


@pytest.fixture
def page(browser, live: LiveServer):  # noqa: ANN001, ANN201
    p = open_app(browser, live, live.token("carol"))
    yield p
    assert p.errors == [], p.errors
    p.context.close()


def streamed(page, i: int = 0) -> int:  # noqa: ANN001
    """Characters of turn ``i``'s reply the page has received (the greedy babble is whitespace)."""
    return page.evaluate(
        "(i) => [...[...window.__assistant.state.models.values()][0].turns.values()][i].reply.length", i
    )


def test_stop_button_cancels_and_the_server_confirms(page, live: LiveServer) -> None:  # noqa: ANN001
    composer = page.locator("[data-testid=composer]")
    composer.fill("tell me a very long story")
    composer.press("Enter")
    stop = page.locator("[data-testid=stop]")
    stop.wait_for()
    seen = wait_until(lambda: streamed(page) > 20 and streamed(page), what="streamed text")
    wait_until(lambda: streamed(page) > seen, what="more streamed text")  # it keeps growing
    stop.click()
    page.wait_for_selector("[data-testid=assistant-message][data-status=cancelled]")
    assert page.locator("[data-testid=turn-note]").inner_text() == "Stopped (cancelled)"
    assert page.locator("[data-testid=send]").is_visible()  # the button is back to Send
    frozen = streamed(page)
    page.wait_for_timeout(500)
    assert streamed(page) == frozen  # nothing more arrives
    reply = history(live, live.token("carol"), open_session_id(page))["messages"][1]
    assert reply["status"] == "cancelled"
    assert 20 < len(reply["text"]) < 3000
    assert len(reply["text"]) == frozen  # the page keeps exactly what the server stored


def test_busy_server_shows_queue_position_and_esc_stops_everything(page, live: LiveServer) -> None:  # noqa: ANN001
    composer = page.locator("[data-testid=composer]")
    composer.fill("first long one")
    composer.press("Enter")
    page.wait_for_selector("[data-testid=stop]")
    for text in ("second, while the first runs", "third"):
        composer.fill(text)
        composer.press("Enter")  # Enter with a draft queues the next turn
    page.wait_for_function("() => document.querySelectorAll('[data-testid=assistant-message]').length === 3")
    last = page.locator("[data-testid=turn-note]").nth(2)
    wait_until(lambda: "in the queue" in (last.text_content() or ""), what="queue note")
    assert "in the queue" in page.locator("[data-testid=status]").inner_text()
    shot(page, "03-queued")
    composer.press("Escape")  # stops the queued turns and the running one
    page.wait_for_function(
        "() => document.querySelectorAll('[data-testid=assistant-message][aria-busy=false]').length === 3"
    )
    assert "queue" not in page.locator("[data-testid=status]").inner_text()
    msgs = history(live, live.token("carol"), open_session_id(page))["messages"]
    statuses = [m["status"] for m in msgs if m["role"] == "assistant"]
    assert statuses[1:] == ["cancelled", "cancelled"] and statuses[0] in ("cancelled", "completed"), statuses
    assert page.locator("[data-testid=assistant-message][data-status=cancelled]").count() == statuses.count("cancelled")
