"""Browser fixtures: Debian's Chromium driven by Playwright (sync API), one browser per module.

Never downloads a browser: it launches /usr/bin/chromium (scripts/install.sh installs it). Tests
are skipped, with the reason, where that binary or the playwright package is missing.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from skills.base import ModelFreeSkill, SkillUsage

CHROMIUM = os.environ.get("ASSISTANT_TEST_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"

sync_api = pytest.importorskip("playwright.sync_api", reason="pip install -e '.[test]' (playwright) for browser tests")
if not (Path(CHROMIUM).exists() or shutil.which(CHROMIUM)):
    pytest.skip(f"{CHROMIUM} not found; scripts/install.sh --test installs Debian's chromium", allow_module_level=True)


def launch(extra_args: list[str] | None = None):  # noqa: ANN201
    """Start Playwright and Chromium; returns (playwright, browser). Call ``close_browser`` after."""
    pw = sync_api.sync_playwright().start()
    browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS + (extra_args or []), timeout=60_000)
    return pw, browser


def close_browser(pw, browser) -> None:  # noqa: ANN001
    try:
        browser.close()
    finally:
        pw.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    pw, b = launch()
    yield b
    close_browser(pw, b)


def open_app(browser, live, token: str, **context_args: object):  # noqa: ANN001, ANN201
    """A fresh context (own localStorage) on the served page, signed in with ``token``."""
    context = browser.new_context(**{"viewport": {"width": 1200, "height": 800}, **context_args})
    context.set_default_timeout(20_000)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("dialog", lambda d: d.accept())
    page.errors = errors  # type: ignore[attr-defined]
    page.goto(f"{live.http}/#token={token}")
    page.wait_for_function("() => window.__assistant && window.__assistant.state.connected")
    return page


def shot(page, name: str) -> None:  # noqa: ANN001
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"))


def history(live, token: str, session_id: str) -> dict:  # noqa: ANN001
    r = httpx.get(f"{live.http}/v1/sessions/{session_id}/messages", headers={"Authorization": f"Bearer {token}"})
    r.raise_for_status()
    return r.json()


def open_session_id(page) -> str:  # noqa: ANN001
    return page.evaluate("() => window.__assistant.state.openId")


def rendered(page, text: str) -> str:  # noqa: ANN001
    """What the page's Markdown renderer shows for ``text`` (to compare the DOM with stored text)."""
    return page.evaluate(
        "async (t) => { const m = await import('/web/markdown.js'); const d = document.createElement('div');"
        " d.append(m.renderMarkdown(t)); return d.textContent; }",
        text,
    )


def wait_until(pred: Callable[[], object], timeout: float = 20, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


class ScriptedRun:
    """A skill run that yields fixed chunks with a pause between them."""

    def __init__(self, chunks: list[str], pause: float) -> None:
        self.chunks, self.pause = chunks, pause
        self.usage = SkillUsage()
        self._cancelled = False

    def cancel(self) -> None:
        self._cancelled = True

    async def __aiter__(self):  # noqa: ANN204
        for c in self.chunks:
            if self._cancelled:
                return
            await asyncio.sleep(self.pause)
            self.usage.completion_tokens += 1
            yield c


class ScriptedSkill(ModelFreeSkill):
    """A fake skill (the browser's renderer is under test, not the model): replies with queued texts."""

    def __init__(self, name: str, replies: list[str], pause: float = 0.02) -> None:
        self.name = name
        self.replies = list(replies)
        self.pause = pause

    async def run(self, request):  # noqa: ANN001, ANN201
        text = self.replies.pop(0) if self.replies else f"echo: {request.text}"
        # stream in small pieces so the page renders partial Markdown
        chunks = [text[i : i + 6] for i in range(0, len(text), 6)]
        return ScriptedRun(chunks, self.pause)
