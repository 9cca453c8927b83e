"""The scheduler around ``SlotEngine``: admits requests into free slots, steps every busy slot
together, streams the new tokens out.

One generation thread owns the engine. Each turn of its loop: apply the queued adds and cancels,
prefill the oldest waiting prompts into free slots (as many as fit ``max_prefill_tokens`` padded;
a prompt that continues the conversation a free slot still holds goes into that slot, and only
its new tokens are computed; a new one that starts as another slot does gets those rows copied:
``skills/prefix_cache.py``; a prompt with more than ``chunk_tokens`` to compute is computed that
many tokens a turn, so the replies already running get a token between its pieces and prompts
that arrive meanwhile are admitted beside them instead of waiting for all of it),
queue one decode step for every busy slot, then read the tokens of the step queued the turn before
(one step in flight: on a GPU the host's work overlaps the next step; a request that finished or
was cancelled meanwhile has one token computed for nothing, which is dropped). Outputs go to a handler registered from an event
loop (one ``call_soon_threadsafe`` per loop per step, for every request that advanced) or else to a
queue read by ``get_result``, the calls the chat worker's two transports already make of
transformers' ``ContinuousBatchingManager``.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from skills.prefix_cache import BLOCK, PrefixIndex, chain
from skills.slot_engine import bucket

log = logging.getLogger(__name__)

# A new conversation whose first tokens another free slot holds (a long system prompt, shared) gets
# them copied from there when they are at least this many; shorter ones are computed.
SHARE_MIN_TOKENS = 4 * BLOCK


class StreamOutput:
    """A request's tokens so far (what the chat run reads of transformers' ``GenerationOutput``).

    It reads the first ``len`` tokens of a list its producer keeps appending to (the request's own),
    so making one per step costs the same for the 500th token as for the first; ``generated_tokens``
    copies them when read, ``tokens_since`` only the new ones."""

    __slots__ = ("request_id", "_tokens", "_n", "finished", "error", "reused")

    def __init__(self, request_id: str, tokens: list[int], finished: bool, error: str | None = None, reused: int = 0) -> None:
        self.request_id, self._tokens, self._n = request_id, tokens, len(tokens)
        self.finished, self.error = finished, error
        self.reused = reused  # prompt tokens read from what the slot held instead of computed (prefix_cache)

    @property
    def generated_tokens(self) -> list[int]:
        return self._tokens[: self._n]

    def tokens_since(self, start: int) -> list[int]:
        return self._tokens[start : self._n]

    def is_finished(self) -> bool:
        return self.finished


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    max_new: int
    eos: frozenset[int]
    tokens: list[int] = field(default_factory=list)
    slot: int = -1
    pending: int = 0  # decode steps launched for it whose tokens are not read yet
    hashes: list[int] | None = None  # its prompt's block hashes (skills/prefix_cache.py), once looked up
    reused: int = 0  # prompt tokens its slot held already, not computed
    held: int = 0  # prompt tokens its slot holds so far: the reused ones, then each piece computed


_Piece = tuple[_Request, int]  # a request and where this step's piece of its prompt ends


class SlotScheduler:
    def __init__(
        self,
        engine: Any,
        *,
        max_prefill_tokens: int,
        on_step: Callable[[int], None] | None = None,
        on_waiting: Callable[[bool], None] | None = None,
        prefix_reuse: bool = True,
        chunk_tokens: int = 0,
    ) -> None:
        self.engine = engine
        self.max_prefill_tokens = max_prefill_tokens
        # A prompt with more than this many tokens to compute is computed in pieces of this many, a
        # piece a turn of the loop (0: whole, in one step however long).
        self.chunk_tokens = chunk_tokens
        # What free slots still hold of the requests that left them; None: every prompt is computed whole.
        self._kept: PrefixIndex | None = PrefixIndex() if prefix_reuse else None
        self._on_step = on_step or (lambda n: None)
        # Told when prompts start and stop waiting for prefill (skills/chat_first.py).
        self._on_waiting = on_waiting or (lambda waiting: None)
        self._told_waiting = False
        self._commands: deque[tuple] = deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._waiting: deque[_Request] = deque()
        self._running: dict[int, _Request] = {}  # slot -> request
        self._partial: dict[int, _Request] = {}  # slot -> a request whose prompt is computed in pieces, not all yet
        self._patches: dict[int, tuple[int, int] | None] = {}  # slot -> its new decode input, or None: idle
        self._inflight: tuple[Any, dict[int, _Request]] | None = None  # a launched step not read yet
        self._known: set[str] = set()  # waiting or running, as the event loop sees it
        self._lock = threading.Lock()
        self._handlers: dict[str, tuple[asyncio.AbstractEventLoop, Callable]] = {}
        self._dropped: set[str] = set()  # handlers dropped ahead of a cancel: their outputs go nowhere
        self._results: queue.Queue[list[StreamOutput]] = queue.Queue()  # one list per step, for get_result
        self._ready: deque[StreamOutput] = deque()  # taken from _results, not returned yet (one reader)

    # ------------------------------------------------------------------ the manager's calls

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="chat-slots", daemon=True)
        self._thread.start()

    def stop(self, block: bool = True, timeout: float | None = None) -> None:
        self._stop.set()
        self._wake.set()
        if block and self._thread is not None:
            self._thread.join(timeout)

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stop.is_set()

    def add_request(
        self, input_ids: list[int], request_id: str, max_new_tokens: int, streaming: bool = True, eos_token_id: Any = None
    ) -> str | None:
        if not self.is_running():
            return None
        eos = eos_token_id if isinstance(eos_token_id, (list, tuple, set)) else ([] if eos_token_id is None else [eos_token_id])
        request = _Request(request_id, list(input_ids), max(1, max_new_tokens), frozenset(eos))
        with self._lock:
            self._known.add(request_id)
        self._commands.append(("add", request))
        self._wake.set()
        return request_id

    def cancel_request(self, request_id: str) -> None:
        self._commands.append(("cancel", request_id))
        self._wake.set()

    def register_result_handler(self, request_id: str, handler: Callable) -> None:
        self._handlers[request_id] = (asyncio.get_running_loop(), handler)

    def drop_handler(self, request_id: str) -> None:
        """Stop delivering ``request_id``'s outputs (a cancel follows)."""
        self._dropped.add(request_id)
        self._handlers.pop(request_id, None)

    def get_result(self, timeout: float | None = None) -> StreamOutput | None:
        if not self._ready:
            try:
                self._ready.extend(self._results.get(timeout=timeout) if timeout else self._results.get_nowait())
            except queue.Empty:
                return None
        return self._ready.popleft()

    def kv_free_fraction(self) -> float:
        return 1.0 - (len(self._running) + len(self._partial)) / self.engine.slots

    def active_request_ids(self) -> set[str]:
        with self._lock:
            return set(self._known)

    # ------------------------------------------------------------------ the generation thread

    def _loop(self) -> None:
        while not self._stop.is_set():
            self._apply_commands()
            self._tell_waiting()
            if not self._waiting and not self._running and not self._partial and self._inflight is None:
                self._wake.wait()
                self._wake.clear()
                continue
            outputs: list[StreamOutput] = []
            self._prefill(outputs)
            self._tell_waiting()
            self._emit(outputs)  # first tokens go out before the decode step
            outputs = []
            try:
                # Queue the next step first, then read the one before it: on a GPU the host's work
                # on step k's tokens overlaps step k+1.
                launched = self._launch()
                inflight, self._inflight = self._inflight, launched
                if inflight is not None:
                    self._collect(inflight, outputs)
            except Exception as exc:  # noqa: BLE001 - fail these requests, keep serving the next ones
                log.exception("chat generation step failed")
                self._fail_running(f"{type(exc).__name__}: {exc}", outputs)
            self._emit(outputs)
        if self._told_waiting:  # stopped: nothing of this scheduler's waits any more
            self._told_waiting = False
            self._on_waiting(False)

    def _tell_waiting(self) -> None:
        waiting = bool(self._partial) or (bool(self._waiting) and len(self._running) < self.engine.slots)
        if waiting != self._told_waiting:
            self._told_waiting = waiting
            self._on_waiting(waiting)

    def _apply_commands(self) -> None:
        while self._commands:
            kind, arg = self._commands.popleft()
            if kind == "add":
                if 0 < len(arg.prompt) < self.engine.max_len:
                    self._waiting.append(arg)
                    continue
                self._forget(arg.request_id)  # fails alone, with a reason; the others go on
                why = f"a prompt must hold 1 to {self.engine.max_len - 1} tokens, not {len(arg.prompt)}"
                self._emit([StreamOutput(arg.request_id, [], True, why)])
                continue
            self._waiting = deque(r for r in self._waiting if r.request_id != arg)
            for slot, request in list(self._running.items()):
                if request.request_id == arg:
                    del self._running[slot]
                    self._patches[slot] = None
                    self._keep(request)
            for slot, request in list(self._partial.items()):
                if request.request_id == arg:  # stopped between pieces: its slot keeps what they computed
                    del self._partial[slot]
                    self._keep(request)
            self._forget(arg)
            self._dropped.discard(arg)

    def _prefill(self, outputs: list[StreamOutput]) -> None:
        engine = self.engine
        if not self._partial and (not self._waiting or len(self._running) == engine.slots):
            return
        free = self._free_below(engine.slots)
        fresh: list[_Piece] = []  # computed from the prompt's first token
        extended: list[_Piece] = []  # from the ``held`` tokens their slots hold already
        copies: dict[int, int] = {}  # slot -> the slot whose first tokens it gets first
        limit = engine.prefill_sizes[-1]
        # Prompts computed in pieces go on first: they were admitted before any still waiting.
        for request in self._partial.values():
            piece = (request, self._piece_end(request))
            if extended and (len(extended) == limit or self._padded(fresh, [*extended, piece]) > self.max_prefill_tokens):
                break
            extended.append(piece)
        while self._waiting and free and len(fresh) + len(extended) < limit:
            request = self._waiting[0]
            slot, request.reused, source = self._place(request, free)
            request.held = request.reused
            piece = (request, self._piece_end(request))
            if request.held:
                padded = self._padded(fresh, [*extended, piece])
            else:
                padded = self._padded([*fresh, piece], extended)
            if (fresh or extended) and padded > self.max_prefill_tokens:
                break
            self._waiting.popleft()
            request.slot = slot
            free.remove(slot)
            if self._kept is not None:
                self._kept.drop(slot)
            if source is not None:
                copies[slot] = source
            (extended if request.held else fresh).append(piece)

        def extend(pieces: list[_Piece]) -> list[int]:
            engine.copy(copies, max((r.reused for r, _ in pieces if r.slot in copies), default=0))
            return engine.extend(
                [r.slot for r, _ in pieces], [r.prompt[:end] for r, end in pieces], [r.held for r, _ in pieces],
                reused=[r.reused if r.held == r.reused else 0 for r, _ in pieces],  # counted with a request's first piece
            )

        def prefill(pieces: list[_Piece]) -> list[int]:
            return engine.prefill([r.slot for r, _ in pieces], [r.prompt[:end] for r, end in pieces])

        # The extended first, and their first tokens out before a prefill of whole prompts runs: a
        # conversation's next turn does not wait for the new ones admitted with it.
        groups = [(pieces, run) for pieces, run in ((extended, extend), (fresh, prefill)) if pieces]
        for i, (pieces, run) in enumerate(groups):
            if i:
                self._emit(outputs)
                outputs.clear()
            try:
                firsts = run(pieces)
                if len(firsts) != len(pieces):
                    raise RuntimeError(f"prefill returned {len(firsts)} first tokens for {len(pieces)} prompts")
            except Exception as exc:  # noqa: BLE001 - these prompts fail; the running requests go on
                log.exception("chat prefill failed")
                for request, _ in pieces:
                    self._partial.pop(request.slot, None)
                    self._forget(request.request_id)
                    outputs.append(StreamOutput(request.request_id, [], True, f"{type(exc).__name__}: {exc}"))
                continue
            self._on_step(len(pieces))
            for (request, end), token in zip(pieces, firsts):
                request.held = end
                if end < len(request.prompt):  # a piece: the token after it is the prompt's own, not the reply's
                    self._partial[request.slot] = request
                    continue
                self._partial.pop(request.slot, None)
                self._running[request.slot] = request
                self._patches[request.slot] = (token, len(request.prompt))  # decode from the first token on
                self._advance(request, token, outputs)

    def _free_below(self, n: int) -> list[int]:
        """The slots under ``n`` that neither a running request nor a prompt computed in pieces holds."""
        return [s for s in range(n) if s not in self._running and s not in self._partial]

    def _piece_end(self, request: _Request) -> int:
        """Where this step's piece of ``request``'s prompt ends: the prompt's end, or ``chunk_tokens``
        on from what its slot holds when more than that is left to compute."""
        if self.chunk_tokens and len(request.prompt) - request.held > self.chunk_tokens:
            return request.held + self.chunk_tokens
        return len(request.prompt)

    def _place(self, request: _Request, free: list[int]) -> tuple[int, int, int | None]:
        """The free slot ``request`` goes to, how many of its prompt's tokens that slot will hold
        before it is computed (0: all are computed), and the slot to copy them from first, if
        any. A slot whose conversation the prompt carries on (``PrefixIndex.continues``: the
        previous turn) is taken; else an empty slot, or the one left longest ago, so a new
        conversation does not push out one that is still going on; it gets the tokens it shares
        with the best match copied when they are ``SHARE_MIN_TOKENS`` or more."""
        if self._kept is None:
            return free[0], 0, None
        if request.hashes is None:
            request.hashes = chain(request.prompt)
        slot, common = self._kept.match(request.prompt, request.hashes)
        start = min(common, len(request.prompt) - 1)  # at least one token computed: its logits
        if slot is not None and self._kept.continues(slot, common):
            return slot, start, None
        victim = self._kept.victim(free)
        if slot is None or start < SHARE_MIN_TOKENS:
            return victim, start if victim == slot else 0, None
        return victim, start, None if victim == slot else slot

    def _padded(self, fresh: list[_Piece], extended: list[_Piece]) -> int:
        """Tokens a prefill of ``fresh`` and an extend of ``extended`` compute, padding included."""
        engine, padded = self.engine, 0
        if fresh:
            padded += bucket(len(fresh), engine.prefill_sizes) * bucket(max(end for _, end in fresh), engine.prompt_lengths)
        if extended:
            longest = max(end - r.held for r, end in extended)
            padded += bucket(len(extended), engine.extend_sizes) * bucket(longest, engine.prompt_lengths)
        return padded

    def _keep(self, request: _Request) -> None:
        """``request`` left its slot: record what the slot's rows hold of it (its prompt and the
        tokens fed back before its last, a step still in flight writes only beyond them; or, when
        it stopped between the pieces of its prompt, the part they computed)."""
        if self._kept is None or request.hashes is None:
            return
        if request.tokens:
            tokens, prompt = request.prompt + request.tokens[:-1], len(request.prompt)
        else:
            tokens = request.prompt[: request.held]
            prompt = len(tokens)
        self._kept.keep(request.slot, tokens, chain(tokens, request.hashes[: len(tokens) // BLOCK]), prompt)

    def _launch(self) -> tuple[Any, dict[int, _Request]] | None:
        """Queue a decode step for every busy slot (the device already holds each one's next input;
        only joined and left slots are patched). Returns the step and who was in it."""
        if not self._running:
            return None
        engine = self.engine
        engine.patch(self._patches)
        self._patches = {}
        self._compact()
        # A request's input position counts the step still in flight, whose token the host has not read.
        last = max(len(r.prompt) + len(r.tokens) - 1 + r.pending for r in self._running.values())
        step = engine.launch(bucket(max(self._running) + 1, engine.batch_sizes), bucket(last + 1, engine.contexts))
        for request in self._running.values():
            request.pending += 1
        self._on_step(len(self._running))
        return step, dict(self._running)

    def _compact(self) -> None:
        """Move the requests in the highest slots down into free ones when that narrows the batch
        bucket every step runs: a long reply left alone at slot 200 would otherwise keep each step
        256 rows wide. Only when the bucket shrinks, so moves are rare."""
        width = bucket(len(self._running), self.engine.batch_sizes)
        if max(self._running) < width:
            return
        free = self._free_below(width)
        moves = dict(zip((s for s in sorted(self._running) if s >= width), free))
        if not moves:  # the free slots below are taken by prompts computed in pieces
            return
        # The columns that hold anything: each moved request's (a step in flight included) and what
        # the free slots it swaps with hold of their last requests.
        columns = max(len(self._running[s].prompt) + len(self._running[s].tokens) + self._running[s].pending + 1 for s in moves)
        if self._kept is not None:
            columns = max([columns, *(self._kept.length(d) for d in moves.values() if d in self._kept)])
        self.engine.move(moves, columns)
        for src, dst in moves.items():
            request = self._running.pop(src)
            request.slot = dst
            self._running[dst] = request
            if self._kept is not None:
                self._kept.swap(src, dst)

    def _collect(self, inflight: tuple[Any, dict[int, _Request]], outputs: list[StreamOutput]) -> None:
        step, members = inflight
        tokens = step.tokens()
        for slot, request in members.items():  # the slot each had when the step was launched
            request.pending -= 1
            if self._running.get(request.slot) is request:  # not finished, cancelled or failed meanwhile
                self._advance(request, tokens[slot], outputs)

    def _advance(self, request: _Request, token: int, outputs: list[StreamOutput]) -> None:
        request.tokens.append(token)
        done = (
            token in request.eos
            or len(request.tokens) >= request.max_new
            or len(request.prompt) + len(request.tokens) >= self.engine.max_len
        )
        if done:
            del self._running[request.slot]
            self._patches[request.slot] = None
            self._forget(request.request_id)
            self._keep(request)
        outputs.append(StreamOutput(request.request_id, request.tokens, done, reused=request.reused))

    def _fail_running(self, error: str, outputs: list[StreamOutput]) -> None:
        # A prompt computed in pieces fails too: what its slot holds is not known after a reset.
        running, self._running = {**self._running, **self._partial}, {}
        self._partial = {}
        self._inflight, self._patches = None, {}
        if self._kept is not None:  # what the device holds is not known now
            self._kept.clear()
        try:
            self.engine.reset()
        except Exception:  # noqa: BLE001 - the device may be gone; the next step reports it
            log.exception("could not reset the chat engine's decode state")
        for request in running.values():
            self._forget(request.request_id)
            outputs.append(StreamOutput(request.request_id, request.tokens, True, error))

    def _forget(self, request_id: str) -> None:
        with self._lock:
            self._known.discard(request_id)

    def _emit(self, outputs: list[StreamOutput]) -> None:
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Callable, StreamOutput]]] = {}
        unhandled = []  # for get_result: one queue item per step, not one per request
        for out in outputs:
            entry = self._handlers.get(out.request_id)
            if entry is None:
                if out.request_id not in self._dropped:
                    unhandled.append(out)
                continue
            if out.finished:
                self._handlers.pop(out.request_id, None)
            by_loop.setdefault(entry[0], []).append((entry[1], out))
        if unhandled:
            self._results.put(unhandled)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_deliver, items)
            except RuntimeError:  # that loop has closed
                pass


def _deliver(items: list[tuple[Callable, StreamOutput]]) -> None:
    for handler, out in items:
        handler(out)
