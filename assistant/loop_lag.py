"""Event-loop lag probe: how late a timer fires tells how long something blocked the loop.

Every frame the server sends and every request it accepts waits behind whatever holds the loop, so
this histogram is the evidence that model work (on other threads) does not stall the web process.
"""

from __future__ import annotations

import asyncio

from prometheus_client import Histogram

PROBE_INTERVAL = 0.05


async def watch_loop_lag(histogram: Histogram, interval: float = PROBE_INTERVAL) -> None:
    loop = asyncio.get_running_loop()
    while True:
        start = loop.time()
        await asyncio.sleep(interval)
        histogram.observe(max(0.0, loop.time() - start - interval))
