"""Opening a long conversation in the browser: the time from the click to the first replies shown
(the newest turns, drawn first) and to every turn drawn.

A server with the model-free flood skill (``--words`` a reply) gets one session of ``--turns`` turns
over the websocket; then headless Chromium (Debian's, through Playwright, as the browser tests run
it) opens the page, clicks the session, and waits until every reply is drawn as completed. Each of
``--runs`` opens uses a fresh browser context (nothing cached: it resumes from seq 0).

With ``--stream-pace``, the server then restarts on the same database with replies paced that many
seconds a word, and each of ``--runs`` opens is followed by one more question typed into the page:
while its reply streams in at the end of the long thread, Chromium's own counters (the DevTools
protocol's ``Performance.getMetrics``) give the time spent in layout and style per paint.

    .venv/bin/python bench/web_open.py --turns 300 --out bench/results/web_open_cpu.json
    .venv/bin/python bench/web_open.py --turns 300 --runs 2 --stream-pace 0.01
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from websockets.asyncio.client import connect  # noqa: E402

from bench.report import emit, stamp  # noqa: E402
from bench.load import _session  # noqa: E402
from bench.run import ServerProcess  # noqa: E402


async def build(server: ServerProcess, turns: int) -> str:
    async with connect(server.ws, additional_headers={"Authorization": f"Bearer {server.token}"}, max_size=None) as ws:
        sid = await _session(ws)
        for k in range(turns):
            await ws.send(json.dumps({"type": "turn.create", "session_id": sid, "text": f"question {k}", "event_id": "t"}))
            while '"response.done"' not in (await ws.recv())[:64]:
                pass
        return sid


def open_once(browser, server: ServerProcess, sid: str, turns: int) -> dict:  # noqa: ANN001
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    try:
        page = context.new_page()
        page.goto(f"{server.http}/#token={server.token}")
        page.wait_for_function("() => window.__assistant && window.__assistant.state.connected")
        page.wait_for_selector(f"[data-testid=sessions] li[data-id='{sid}']")
        t0 = time.perf_counter()
        page.locator(f"[data-testid=sessions] li[data-id='{sid}'] .session-title").click()
        drawn = "(n) => document.querySelectorAll('[data-testid=assistant-message][data-status=completed]').length >= n"
        page.wait_for_function(drawn, arg=1, timeout=120_000)
        shown = time.perf_counter() - t0
        page.wait_for_function(drawn, arg=turns, timeout=120_000)
        done = time.perf_counter() - t0
        newest = page.evaluate(
            "() => [...document.querySelectorAll('[data-testid=user-message] .text')].at(-1)?.textContent"
        )  # fmt: skip
        assert newest == f"question {turns - 1}", newest
        return {"first_shown_ms": round(shown * 1e3), "open_ms": round(done * 1e3)}
    finally:
        context.close()


def stream_once(browser, server: ServerProcess, sid: str, turns: int) -> dict:  # noqa: ANN001
    """Open the conversation, then ask one more question and time the browser's work while the reply
    streams in at the end of the thread."""
    context = browser.new_context(viewport={"width": 1200, "height": 800})
    try:
        page = context.new_page()
        page.goto(f"{server.http}/#token={server.token}")
        page.wait_for_function("() => window.__assistant && window.__assistant.state.connected")
        page.locator(f"[data-testid=sessions] li[data-id='{sid}'] .session-title").click()
        done = "(n) => document.querySelectorAll('[data-testid=assistant-message][data-status=completed]').length >= n"
        page.wait_for_function(done, arg=turns, timeout=120_000)
        page.wait_for_timeout(500)  # the last backlog paints
        cdp = context.new_cdp_session(page)
        cdp.send("Performance.enable")

        def counters() -> dict[str, float]:
            metrics = {m["name"]: m["value"] for m in cdp.send("Performance.getMetrics")["metrics"]}
            paints = page.evaluate("() => window.__assistant.state.paints")
            return {"layout_s": metrics["LayoutDuration"], "style_s": metrics["RecalcStyleDuration"],
                    "layouts": metrics["LayoutCount"], "paints": paints}  # fmt: skip

        before, t0 = counters(), time.perf_counter()
        page.locator("[data-testid=composer]").fill("one more question")
        page.keyboard.press("Enter")
        page.wait_for_function(done, arg=turns + 1, timeout=120_000)
        wall, after = time.perf_counter() - t0, counters()
        d = {k: after[k] - before[k] for k in after}
        above = page.evaluate("() => { const t = document.querySelector('[data-testid=thread]');"
                              " return t.scrollHeight - t.scrollTop - t.clientHeight; }")  # fmt: skip
        assert above < 2, f"{above} px above the end of the thread: it did not follow the reply"
        return {
            "stream_s": round(wall, 2),
            "paints": d["paints"],
            "layouts": int(d["layouts"]),
            "layout_ms_per_paint": round(d["layout_s"] * 1e3 / max(1, d["paints"]), 2),
            "style_ms_per_paint": round(d["style_s"] * 1e3 / max(1, d["paints"]), 2),
        }
    finally:
        context.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--turns", type=int, default=300)
    ap.add_argument("--words", type=int, default=300)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--port", type=int, default=8939)
    ap.add_argument("--stream-pace", type=float, default=0.0, help="then time a reply streamed at this many seconds a word")
    ap.add_argument("--out", type=Path, help="also write the result here as JSON")
    args = ap.parse_args()
    from tests.browser.conftest import close_browser, launch  # needs playwright and /usr/bin/chromium

    workdir = Path(tempfile.mkdtemp(prefix="web-open-"))
    server = ServerProcess("flood", ["--mode", "flood", "--flood-words", str(args.words), "--device", "cpu"], workdir, args.port)
    try:
        sid = asyncio.run(build(server, args.turns))
        pw, browser = launch()
        try:
            runs = [open_once(browser, server, sid, args.turns) for _ in range(args.runs)]
            streams = []
            if args.stream_pace:
                server.stop()
                paced = ["--flood-pace", str(args.stream_pace)]
                server = ServerProcess("flood", ["--mode", "flood", "--flood-words", str(args.words), *paced, "--device", "cpu"],
                                       workdir, args.port)  # fmt: skip
                streams = [stream_once(browser, server, sid, args.turns + k) for k in range(args.runs)]
        finally:
            close_browser(pw, browser)
    finally:
        server.stop()
    result = {
        **stamp(),
        "turns": args.turns,
        "reply_words": args.words,
        "runs": runs,
        **({"stream_pace_s": args.stream_pace, "streams": streams} if streams else {}),
    }
    emit(result, args.out)


if __name__ == "__main__":
    main()
