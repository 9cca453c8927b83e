"""The browser's side of untrusted output and of resuming: a scripted skill stands in for the model
(the page's renderer and reconnect logic are under test), behind the real server and protocol."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.browser.conftest import ScriptedSkill, history, open_app, open_session_id, rendered, shot, wait_until
from tests.conftest import LiveServer, make_settings, start_server

HOSTILE = (
    "Look: <img src=x onerror=window.__pwned=1> and <script>window.__pwned=2</script>\n\n"
    "[click me](javascript:alert(1)) [also](JaVaScRiPt:window.__pwned=3) [data](data:text/html,<b>x</b>) "
    "[fine](https://example.com/a_b) <a href=\"javascript:window.__pwned=4\">raw</a>\n\n"
    '![pic](javascript:window.__pwned=5) **bold** <b onmouseover="window.__pwned=6">hover</b>'
)
CODE = (
    "Here is a function:\n\n```python\ndef greet(name):\n    # say hello\n    return f\"hi {name}\" * 2\n```\n\n"
    "| a | b |\n|---|--:|\n| `x` | 1 |\n\n- one\n- **two**\n  1. nested\n"
)
NUMBERED = " ".join(f"w{i:03d}" for i in range(400))


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_chat_model: Path) -> Iterator[LiveServer]:
    skill = ScriptedSkill("chat", [HOSTILE, CODE, NUMBERED], pause=0.02)
    srv = start_server(make_settings(tmp_path_factory.mktemp("browser-scripted"), tiny_chat_model), skills={"chat": skill})
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def page(browser, live: LiveServer):  # noqa: ANN001, ANN201
    p = open_app(browser, live, live.token("dave"))
    yield p
    assert p.errors == [], p.errors
    p.context.close()


def ask(page, text: str, n: int) -> None:  # noqa: ANN001
    page.locator("[data-testid=composer]").fill(text)
    page.locator("[data-testid=composer]").press("Enter")
    page.wait_for_function(
        "(n) => document.querySelectorAll('[data-testid=assistant-message][aria-busy=false]').length >= n", arg=n
    )


def test_hostile_reply_is_shown_as_text_and_runs_nothing(page) -> None:  # noqa: ANN001
    ask(page, "say something nasty", 1)
    body = page.locator("[data-testid=assistant-body]").first
    page.wait_for_timeout(300)  # give an onerror handler every chance to fire
    assert page.evaluate("() => window.__pwned") is None
    text = body.text_content()
    assert "<img src=x onerror=window.__pwned=1>" in text  # shown literally, as the model wrote it
    assert "<script>window.__pwned=2</script>" in text
    assert body.locator("img, script, b, [onerror], [onmouseover]").count() == 0
    hrefs = body.locator("a").evaluate_all("(as) => as.map((a) => a.getAttribute('href'))")
    assert hrefs == ["https://example.com/a_b"], hrefs  # only the safe link is a link
    assert all(body.locator("a").evaluate_all("(as) => as.map((a) => a.rel.includes('noopener'))"))
    assert "click me" in text and "also" in text  # unsafe links keep their label as text
    assert body.locator("strong").inner_text() == "bold"
    # Nothing anywhere in the page carries an inline handler or a javascript: URL.
    assert page.evaluate(
        """() => [...document.querySelectorAll('*')].filter((n) => [...n.attributes].some((a) =>
             a.name.startsWith('on') || /^\\s*javascript:/i.test(a.value))).length"""
    ) == 0


def test_markdown_code_block_is_highlighted_with_a_copy_button(page) -> None:  # noqa: ANN001
    ask(page, "show me code", 2)
    body = page.locator("[data-testid=assistant-body]").nth(1)
    code = body.locator("pre code.lang-python")
    assert code.text_content() == 'def greet(name):\n    # say hello\n    return f"hi {name}" * 2'
    assert code.locator(".hl-k").all_inner_texts()[:2] == ["def", "return"]
    assert code.locator(".hl-c").inner_text() == "# say hello"
    assert body.locator(".code-lang").inner_text() == "python"
    assert body.get_by_role("button", name="Copy python to the clipboard").is_visible()
    assert body.locator("table th").all_inner_texts() == ["a", "b"]
    assert body.locator("ul > li > ol > li").inner_text() == "nested"
    shot(page, "04-finished-code-block")


def test_dropped_connection_resumes_the_stream_without_gaps_or_duplicates(page, live: LiveServer) -> None:  # noqa: ANN001
    page.locator("[data-testid=composer]").fill("count for me")
    page.locator("[data-testid=composer]").press("Enter")
    body = page.locator("[data-testid=assistant-body]").nth(2)
    wait_until(lambda: "w040" in (body.text_content() or ""), what="the stream to start")
    shot(page, "02-streaming")
    page.evaluate("() => window.__assistant.dropConnection()")
    wait_until(lambda: "reconnecting" in page.locator("[data-testid=status]").inner_text() or
               page.evaluate("() => !window.__assistant.state.connected"), what="the drop to show")
    missed = body.text_content()
    page.wait_for_function("() => window.__assistant.state.connected")
    page.wait_for_function(
        "() => document.querySelectorAll('[data-testid=assistant-message][aria-busy=false]').length >= 3", timeout=60_000
    )
    stored = history(live, live.token("dave"), open_session_id(page))["messages"][-1]
    assert stored["status"] == "completed" and stored["text"] == NUMBERED
    shown = body.text_content()
    assert shown == rendered(page, NUMBERED) == NUMBERED  # every word once, in order
    assert len(missed) < len(shown)
    words = shown.split()
    assert words == [f"w{i:03d}" for i in range(400)]
