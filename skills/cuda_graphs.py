"""Capturing a step as a CUDA graph: the warm-up and capture order torch's documentation gives."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


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
