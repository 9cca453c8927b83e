"""A PNG of a harness result, drawn with Pillow (no plotting library needed): aggregate tokens/s and
time to first token (p95) per concurrency, one bar per server configuration, values written on
the bars."""

from __future__ import annotations

import math
from pathlib import Path

COLOURS = [(120, 120, 120), (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40)]


def _panel(draw, box, title, groups, series, values, fmt) -> None:  # noqa: ANN001
    x0, y0, x1, y1 = box
    draw.text((x0, y0), title, fill="black")
    top, bottom = y0 + 40, y1 - 30
    draw.line((x0, bottom, x1, bottom), fill="black")
    peak = max((v for v in values.values() if v), default=1.0)
    scale = math.log10(peak + 1)
    width = (x1 - x0) / max(1, len(groups))
    bar = width * 0.8 / max(1, len(series))
    for gi, g in enumerate(groups):
        gx = x0 + gi * width + width * 0.1
        draw.text((gx, bottom + 8), f"{g} sessions", fill="black")
        for si, s in enumerate(series):
            v = values.get((s, g))
            if not v:
                continue
            h = (bottom - top) * math.log10(v + 1) / scale  # log scale: baseline and ours both visible
            bx = gx + si * bar
            draw.rectangle((bx, bottom - h, bx + bar - 2, bottom), fill=COLOURS[si % len(COLOURS)])
            draw.text((bx, bottom - h - 12), fmt(v), fill="black")
    for si, s in enumerate(series):
        draw.rectangle((x1 - 170, y0 + 4 + si * 14, x1 - 160, y0 + 14 + si * 14), fill=COLOURS[si % len(COLOURS)])
        draw.text((x1 - 155, y0 + 2 + si * 14), s, fill="black")


def plot(result: dict, path: Path) -> Path:
    from PIL import Image, ImageDraw

    img = Image.new("RGB", (1200, 520), "white")
    draw = ImageDraw.Draw(img)
    machine = result.get("machine", {})
    draw.text((20, 8), f"bench/run.py --profile {result.get('profile')}  {machine.get('gpu') or machine.get('platform')}  "
              f"{result.get('started')}  (log-scale bars)", fill="black")
    chat = {k: v for k, v in result.get("chat", {}).items() if "error" not in v}
    series = list(chat)
    groups = sorted({n for runs in chat.values() for n in runs if n.isdigit()}, key=int)
    tps = {(s, g): chat[s][g]["tokens_per_s"] for s in series for g in groups if g in chat[s]}
    ttft = {(s, g): chat[s][g]["ttft_ms"]["p95"] for s in series for g in groups if g in chat[s]}
    _panel(draw, (20, 40, 590, 500), "chat: aggregate tokens/s (higher is better)", groups, series, tps, lambda v: f"{v:.0f}")
    _panel(draw, (610, 40, 1180, 500), "chat: time to first token p95, ms (lower is better)", groups, series, ttft,
           lambda v: f"{v:.0f}")
    img.save(path)
    return path
