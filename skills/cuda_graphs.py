"""Steps captured as CUDA graphs: the warm-up and capture order torch's documentation gives, and the
cache of captured steps the chat and speech engines replay."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)


def capture(torch: Any, fn: Callable[[], Any], pool: Any, *, after_warmup: Callable[[], None] | None = None) -> tuple[Any, Any]:
    """Run ``fn`` twice on a side stream (cuBLAS handles, lazy kernels), then capture it into a graph
    sharing the memory ``pool``. ``after_warmup`` runs after each warm-up run (to undo what a step
    changes in its own inputs). Returns (graph, fn's output as captured); ``graph.replay()`` refills it."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            fn()
            if after_warmup is not None:
                after_warmup()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        out = fn()
    return graph, out


class _CpuReplay:
    """A stand-in for a captured graph off a GPU: a replay runs the step again and leaves its output
    in the captured output tensor."""

    def __init__(self, fn: Callable[[], Any], out: Any) -> None:
        self._fn, self._out = fn, out

    def replay(self) -> None:
        self._out.copy_(self._fn())


class StepGraphs:
    """One captured graph per step shape (``key``), all sharing one memory pool.

    While ``on``, ``run`` replays the key's graph, capturing it the first time; a capture that fails
    is logged, turns ``on`` off, and the step runs eagerly from then on. ``restore`` is a tensor the
    step advances in place (a decode state): each warm-up run starts again from its value before the
    capture. Off a GPU (tests turn ``on`` on for a CPU model) a capture runs the same warm-ups and a
    replay runs the step again into the captured output, so the replay order is exercised too."""

    def __init__(self, torch: Any, device: str, what: str, *, on: bool, restore: Any = None) -> None:
        self.torch, self.device, self.what, self.on, self.restore = torch, device, what, on, restore
        self._graphs: dict[tuple, tuple[Any, Any]] = {}
        self._pool: Any = None

    def run(self, key: tuple, fn: Callable[[], Any]) -> Any:
        if not self.on:
            return fn()
        entry = self._graphs.get(key)
        if entry is None:
            try:
                entry = self._graphs[key] = self._capture(fn)
            except Exception:  # noqa: BLE001 - a model whose step cannot be captured still runs eagerly
                log.exception("could not capture the %s step %s as a CUDA graph; running without graphs", self.what, key)
                self.on = False
                return fn()
        graph, out = entry
        graph.replay()
        return out

    def _capture(self, fn: Callable[[], Any]) -> tuple[Any, Any]:
        torch = self.torch
        saved = self.restore.clone() if self.restore is not None else None

        def undo() -> None:
            if saved is not None:
                self.restore.copy_(saved)

        if not self.device.startswith("cuda"):
            for _ in range(3):  # two warm-ups and the capture, none of which may advance the state
                out = fn()
                undo()
            return _CpuReplay(fn, out), out
        self._pool = self._pool or torch.cuda.graph_pool_handle()
        return capture(torch, fn, self._pool, after_warmup=undo)

    def keys(self) -> list[tuple]:
        return list(self._graphs)

    def clear(self) -> None:
        """Drop the captured graphs and their memory pool. Torch frees a pool once no graph uses it, and
        refuses a capture into a released pool's handle, so later captures take a fresh pool."""
        self._graphs.clear()
        self._pool = None
