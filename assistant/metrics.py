"""Prometheus metrics, one registry per app (so several apps can live in one test process)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.connections = Gauge("assistant_ws_connections", "Open websocket connections", registry=r)
        self.turns = Counter("assistant_turns_total", "Finished turns", ["skill", "status"], registry=r)
        self.errors = Counter("assistant_errors_total", "Error events sent to clients", ["code"], registry=r)
        self.tokens = Counter("assistant_generated_tokens_total", "Tokens generated", ["skill"], registry=r)
        self.frames = Counter("assistant_frames_sent_total", "Websocket frames sent", registry=r)
        self.ttft = Histogram(
            "assistant_time_to_first_token_seconds",
            "Time from turn start to first streamed text",
            ["skill"],
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.ttft_stages = Histogram(
            "assistant_ttft_stage_seconds",
            "Where a turn's time to its first frame goes: admit (arrival to the skill's call: storing,"
            " routing, reading its image), start (the skill's call: a chat prompt built and queued),"
            " model (queued to the first text: the model's queue and prefill), send (first text to"
            " its frame stored and sent)",
            ["skill", "stage"],
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
            registry=r,
        )
        self.turn_seconds = Histogram(
            "assistant_turn_duration_seconds", "Turn duration", ["skill"], registry=r
        )
        self.loop_lag = Histogram(
            "assistant_event_loop_lag_seconds",
            "How late the event loop ran a 50 ms timer (time something blocked the loop)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1),
            registry=r,
        )
        self.running = Gauge("assistant_running_turns", "Turns running now", registry=r)
        self.queued = Gauge("assistant_queued_turns", "Turns waiting behind another in their session", registry=r)
        self.skill_ready = Gauge("assistant_skill_ready", "1 when the skill can serve", ["skill"], registry=r)

    def watch_gc_pauses(self, watch: Any) -> None:
        """Export a ``skills.gc_pauses.PauseWatch``'s timings, read at each scrape (a histogram kept
        by the watch itself: observing a metric inside a collection could deadlock on its lock)."""
        self.registry.register(_GcPauses(watch))

    def watch_chat_prompt_tokens(self, counts: Callable[[], tuple[int, int]]) -> None:
        """Export the chat model's prompt tokens (``ChatSkill.prompt_tokens``: computed, and read
        from a slot that held the conversation's earlier turn), read at each scrape."""
        self.registry.register(_PromptTokens(counts))

    def watch_media_holds(self, held: Callable[[], tuple[int, float]]) -> None:
        """Export what chat first cost speech and vision (``ChatFirst.held``: their steps that waited
        for chat prefill, and the seconds they waited), read at each scrape."""
        self.registry.register(_MediaHolds(held))


class _PromptTokens(Collector):
    def __init__(self, counts: Callable[[], tuple[int, int]]) -> None:
        self._counts = counts

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(
            "assistant_chat_prompt_tokens",
            "Chat prompt tokens, by source: computed, or reused (keys and values a slot already held: the"
            " conversation's previous turn, or a start it shares with another conversation, copied)",
            labels=["source"],
        )
        computed, reused = self._counts()
        family.add_metric(["computed"], computed)
        family.add_metric(["reused"], reused)
        yield family


class _MediaHolds(Collector):
    def __init__(self, held: Callable[[], tuple[int, float]]) -> None:
        self._held = held

    def collect(self) -> Iterator[CounterMetricFamily]:
        holds, seconds = self._held()
        yield CounterMetricFamily(
            "assistant_media_chat_first_holds", "Speech and vision steps that waited for chat prefill (chat first)", value=holds
        )
        yield CounterMetricFamily(
            "assistant_media_chat_first_held_seconds", "Seconds speech and vision steps waited for chat prefill", value=seconds
        )


class _GcPauses(Collector):
    def __init__(self, watch: Any) -> None:
        self._watch = watch

    def collect(self) -> Iterator[HistogramMetricFamily]:
        family = HistogramMetricFamily(
            "assistant_gc_pause_seconds",
            "How long each of the web process's garbage collections stopped it, by generation (2: a full collection)",
            labels=["generation"],
        )
        bounds = [*(str(b) for b in self._watch.bounds), "+Inf"]
        for generation, (cumulative, total) in enumerate(self._watch.snapshot()):
            family.add_metric([str(generation)], list(zip(bounds, cumulative)), total)
        yield family
