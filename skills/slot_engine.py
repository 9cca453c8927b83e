"""A static-shape decode engine for chat: one KV-cache slot per running request, CUDA-graph steps.

transformers' continuous batching pages its KV cache, so every step's attention runs over shapes
that change, which SDPA needs a mask for; on the H200 run in bench/README.md a step cost about
55 ms at 64 sequences, while the same model's forward replayed from one CUDA graph cost 2.9 ms.
This engine gives each request a fixed row of a static cache (``[slots, kv_heads, max_len + 1,
head_dim]`` per layer) and runs the model on shapes drawn from a few buckets, so each (batch,
context-length) bucket is one captured graph. Llama- and Qwen2-style models run through a fused
forward over their own weights (``skills/fused_decoder.py``, a third of the kernels); others
through the model's own decoder (``model.get_decoder()``, unchanged):

- decode: rows ``0..B-1`` of the cache (B = the batch bucket covering the highest busy slot), one
  token each at its own position; attention reads rows ``[:B, :, :L]`` (L = the context bucket)
  under a mask ``column <= position``. Idle rows in the bucket write to the spare column
  ``max_len``, which no mask ever opens.
- prefill: up to 64 prompts (a batch bucket, within the scheduler's padded-token budget) padded to
  a length bucket; their keys and values are written into their slots and attention runs over the
  prompt alone (causal). Padding writes to the spare column. A burst of 64 turns of ~120 tokens is
  one prefill step, not eight groups each followed by a decode step.
- extend: the same for prompts whose first tokens' keys and values their slots already hold (the
  conversation's previous turn, ``skills/prefix_cache.py``): only the rest is computed, at its own
  positions, and attention reads the slot's rows ``[:, :L]`` (L = a context bucket) under the
  decode step's mask, gathered for the group's slots.

Sampling (greedy, or temperature with top-p through the Gumbel-max trick) runs inside the graph,
so a step moves a few integers each way. ``check`` compares the engine with the model's own forward
on a probe prompt at load; a model this does not fit (sliding windows, other cache layouts) fails
that check and the caller keeps the library's engine. Torch is imported only by the worker.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from skills.cuda_graphs import StepGraphs
from skills.fused_decoder import FusedDecoder, fusable

log = logging.getLogger(__name__)

BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
PREFILL_BATCH = (1, 2, 4, 8, 16, 32, 64)  # prompts prefilled together (within the token budget)
EXTEND_BATCH = (1, 4, 16)  # prompts extended together, then PREFILL_BATCH's largest (fewer graphs: a context each)
# Without pieces (the scheduler's chunk_tokens), extend steps of up to this many new tokens are
# captured at load and longer ones when first run; with pieces, every one up to the piece size.
EXTEND_WARM_LENGTH = 256
MIN_CONTEXT_BUCKET = 256
MIN_PROMPT_BUCKET = 16
CHECK_AGREEMENT = 0.75  # share of the probe's tokens graph replay must predict as eager steps did
CHECK_TOLERANCE_FP32 = 1e-3  # largest logit difference from the model's own forward, of the logits' scale
CHECK_TOLERANCE_16BIT = 0.15  # bf16 SmolLM2 on the CPU: 2.9e-2


def bucket(n: int, sizes: tuple[int, ...] | list[int]) -> int:
    """The smallest size that holds ``n`` (sizes ascending; the last one when none does)."""
    for size in sizes:
        if size >= n:
            return size
    return sizes[-1]


def doubling_buckets(first: int, max_len: int) -> list[int]:
    """Powers of two from ``first`` below ``max_len``, then ``max_len`` itself."""
    sizes, size = [], first
    while size < max_len:
        sizes.append(size)
        size *= 2
    return [*sizes, max_len]


def _kv_shape(model: Any) -> tuple[int, int, int]:
    """(layers, key/value heads, head width) of a decoder's attention."""
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return cfg.num_hidden_layers, getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads, head_dim


def slot_bytes(model: Any, max_len: int) -> int:
    """Bytes of KV cache one slot of ``max_len`` tokens takes."""
    layers, kv_heads, head_dim = _kv_shape(model)
    return 2 * layers * kv_heads * (max_len + 1) * head_dim * next(model.parameters()).element_size()


class SlotCache:
    """The static KV cache, in the ``update`` shape transformers' attention layers call.

    ``set_decode``/``set_prefill`` say, before a forward, where the new keys go and what the
    attention should read; both are plain tensor ops, so they are captured with the step."""

    def __init__(self, torch: Any, *, layers: int, slots: int, kv_heads: int, head_dim: int, max_len: int, dtype: Any, device: str) -> None:
        shape = (slots, kv_heads, max_len + 1, head_dim)  # column max_len: the spare one
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(layers)]
        self._rows: Any = None
        self._cols: Any = None
        self._read: int | None = None  # decode: attend over [:B, :, :L]; prefill (None): the new keys only
        self._batch = 0
        self._gather: Any = None  # extend: the slots whose [:L] columns attention reads

    def set_decode(self, rows: Any, cols: Any, context: int) -> None:
        self._rows, self._cols, self._read, self._batch, self._gather = rows, cols, context, rows.shape[0], None

    def set_prefill(self, rows: Any, cols: Any) -> None:
        self._rows, self._cols, self._read, self._gather = rows, cols, None, None

    def set_extend(self, rows: Any, cols: Any, context: int) -> None:
        self._rows, self._cols, self._read, self._gather = rows, cols, context, rows[:, 0]

    def update(self, key: Any, value: Any, layer_idx: int, *args: Any, **kwargs: Any) -> tuple[Any, Any]:
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        # key: [B, heads, T, dim]; rows: [B, 1]; cols: [B, T] -> cache[rows, :, cols] is [B, T, heads, dim]
        k_cache[self._rows, :, self._cols] = key.transpose(1, 2)
        v_cache[self._rows, :, self._cols] = value.transpose(1, 2)
        if self._read is None:
            return key, value
        if self._gather is not None:
            rows, read = self._gather, self._read
            return k_cache[:, :, :read].index_select(0, rows), v_cache[:, :, :read].index_select(0, rows)
        return k_cache[: self._batch, :, : self._read], v_cache[: self._batch, :, : self._read]

    def get_seq_length(self, *args: Any, **kwargs: Any) -> int:  # only asked when positions are not given
        return 0


@dataclass
class Sampling:
    temperature: float = 0.0
    top_p: float = 1.0


class Step:
    """A launched decode step: its tokens, once the device has them."""

    def __init__(self, tokens: Any, done: Any) -> None:
        self._tokens, self._done = tokens, done

    def tokens(self) -> list[int]:
        if self._done is not None:
            self._done.synchronize()
        return self._tokens.tolist()


class SlotEngine:
    """Owns the static cache and the step functions (eager, or replayed from CUDA graphs)."""

    def __init__(
        self, model: Any, *, slots: int, max_len: int, sampling: Sampling, cuda_graphs: bool, fused: bool = True
    ) -> None:
        import torch

        self.torch = torch
        self.model = model
        self.decoder = model.get_decoder()
        self.head = model.get_output_embeddings()
        self.device = str(next(model.parameters()).device)
        self.dtype = next(model.parameters()).dtype
        self.slots = slots
        self.max_len = max_len
        self.spare = max_len  # the column idle rows and padding write to
        self.sampling = sampling
        layers, kv_heads, head_dim = _kv_shape(model)
        self.cache = SlotCache(
            torch, layers=layers, slots=slots, kv_heads=kv_heads, head_dim=head_dim,
            max_len=max_len, dtype=self.dtype, device=self.device,
        )
        # Llama/Qwen2-style models run through the fused forward (skills/fused_decoder.py); others,
        # and any whose fused forward fails the load check, through the model's own decoder.
        self.fused = FusedDecoder(model, self.cache, max_len) if fused and fusable(model) is None else None
        self.batch_sizes = [b for b in BATCH_BUCKETS if b < slots] + [slots]
        self.contexts = doubling_buckets(MIN_CONTEXT_BUCKET, max_len)
        self.prompt_lengths = doubling_buckets(MIN_PROMPT_BUCKET, max_len)
        self.prefill_sizes = [p for p in PREFILL_BATCH if p <= slots]
        dev, i64 = self.device, torch.long
        # The decode state of every slot, kept on the device: input token, position, cache column,
        # busy (0/1). A step advances it itself (its token becomes the next input, busy rows move
        # one position on), so consecutive steps need nothing from the host; the host patches only
        # the rows that join or leave. Graphs read views of these, whose addresses never change.
        self._d_in = torch.zeros(4, slots, dtype=i64, device=dev)
        self._d_ids, self._d_pos, self._d_cols, self._d_busy = self._d_in
        self._d_rows = torch.arange(slots, dtype=i64, device=dev)[:, None]
        self._d_idle = self._idle_state(1).to(dev)  # one idle slot's state column
        pmax, tmax = self.prefill_sizes[-1], self.prompt_lengths[-1]
        self.extend_sizes = [b for b in EXTEND_BATCH if b < pmax] + [pmax]
        # Prefill: [batch, 3 + 2 * length]: slot, last new token's index, first new token's
        # position (extend), tokens, cache columns.
        self._p_in = torch.zeros(pmax, 3 + 2 * tmax, dtype=i64, device=dev)
        self._p_pos = torch.arange(tmax, dtype=i64, device=dev)[None, :].expand(pmax, tmax)
        self.reset()
        # One graph per (kind, batch, length) bucket; a decode step advances the state it reads.
        on_gpu = self.device.startswith("cuda")
        self.graphs = StepGraphs(torch, self.device, "chat", on=cuda_graphs and on_gpu, restore=self._d_in)
        self._probe_logits: list[Any] | None = None
        self.steps = 0
        self.moves = 0  # requests moved to a lower slot (observability)
        self.prompt_tokens = [0, 0]  # prompt tokens computed, and read from a slot's earlier turn (observability)
        self.widths: deque[int] = deque(maxlen=4096)  # rows of the recent decode steps (observability)

    # ------------------------------------------------------------------ the forward passes

    def _sample(self, logits: Any) -> Any:
        torch, s = self.torch, self.sampling
        if self._probe_logits is not None:  # the load-time check, eager only
            self._probe_logits.append(logits.float())
        if s.temperature <= 0:
            return logits.argmax(dim=-1)
        scores = logits.float() / s.temperature
        if s.top_p < 1.0:
            sorted_scores, order = scores.sort(dim=-1, descending=True)
            probs = sorted_scores.softmax(dim=-1)
            drop = probs.cumsum(dim=-1) - probs > s.top_p  # keep the smallest set reaching top_p
            scores = scores.scatter(-1, order, sorted_scores.masked_fill(drop, float("-inf")))
        gumbel = -torch.log(-torch.log(torch.rand_like(scores).clamp_(1e-10, 1.0)))
        return (scores + gumbel).argmax(dim=-1)

    def _decode_fn(self, batch: int, context: int) -> Any:
        torch = self.torch
        ids, pos = self._d_ids[:batch, None], self._d_pos[:batch, None]
        self.cache.set_decode(self._d_rows[:batch], self._d_cols[:batch, None], context)
        mask = torch.arange(context, device=self.device)[None, None, None, :] <= pos[:, None, :, None]
        tokens = self._sample(self.head(self._forward(ids, pos, mask)[:, -1]))
        # Advance the state for the next step: this token in, busy rows one position on.
        self._d_ids[:batch].copy_(tokens)
        self._d_pos[:batch].add_(self._d_busy[:batch])
        self._d_cols[:batch].copy_(self._d_pos[:batch])
        return tokens

    def _prefill_fn(self, batch: int, length: int, context: int | None = None) -> Any:
        """Prefill (``context`` None: attention over the new tokens alone), or extend: the new
        tokens sit at positions from each row's start, and attention reads the slot's first
        ``context`` columns, as a decode step does."""
        torch = self.torch
        packed = self._p_in[:batch, : 3 + 2 * length]
        rows, last, ids, cols = packed[:, :1], packed[:, 1], packed[:, 3 : 3 + length], packed[:, 3 + length :]
        pos = self._p_pos[:batch, :length]
        if context is None:
            self.cache.set_prefill(rows, cols)
            t = torch.arange(length, device=self.device)
            mask = (t[None, :] <= t[:, None])[None, None].expand(batch, 1, length, length)
        else:
            pos = (pos + packed[:, 2:3]).clamp(max=self.spare)  # padding past the end: a position the table has
            self.cache.set_extend(rows, cols, context)
            mask = torch.arange(context, device=self.device)[None, None, None, :] <= pos[:, None, :, None]
        last = self._forward(ids, pos, mask)[torch.arange(batch, device=self.device), last]
        return self._sample(self.head(last))

    def _forward(self, ids: Any, pos: Any, mask: Any) -> Any:
        """The last hidden states; keys and values go into the slots set on the cache."""
        if self.fused is not None:
            return self.fused(ids, pos, mask)
        out = self.decoder(input_ids=ids, position_ids=pos, attention_mask=mask, cache=self.cache, use_cache=False)
        return out.last_hidden_state

    def _run(self, key: tuple, fn: Callable[[], Any]) -> Any:
        with self.torch.inference_mode():
            return self.graphs.run(key, fn)

    # ------------------------------------------------------------------ the scheduler's calls

    def prefill(self, rows: list[int], prompts: list[list[int]]) -> list[int]:
        """Fill slots ``rows`` with ``prompts``' keys and values; return each prompt's first new token."""
        batch = bucket(len(prompts), self.prefill_sizes)
        length = bucket(max(len(p) for p in prompts), self.prompt_lengths)
        self._pack(batch, length, rows, prompts, [0] * len(prompts))
        return self._run(("prefill", batch, length), lambda: self._prefill_fn(batch, length))[: len(prompts)].tolist()

    def extend(
        self, rows: list[int], prompts: list[list[int]], starts: list[int], *, reused: list[int] | None = None
    ) -> list[int]:
        """``prefill`` for prompts whose first ``starts[i]`` tokens' keys and values slot
        ``rows[i]`` already holds (0 < start < len(prompt)): only the rest is computed. Returns
        each prompt's first new token. ``reused``: of the starts, the tokens read from an earlier
        turn (all of them, if None; a later piece of a prompt computed in pieces reuses none)."""
        batch = bucket(len(prompts), self.extend_sizes)
        length = bucket(max(len(p) - s for p, s in zip(prompts, starts)), self.prompt_lengths)
        context = bucket(max(map(len, prompts)), self.contexts)
        self._pack(batch, length, rows, prompts, starts)
        self.prompt_tokens[1] += sum(starts if reused is None else reused)
        tokens = self._run(("extend", batch, length, context), lambda: self._prefill_fn(batch, length, context))
        return tokens[: len(prompts)].tolist()

    def _pack(self, batch: int, length: int, rows: list[int], prompts: list[list[int]], starts: list[int]) -> None:
        """The prefill input of ``batch`` rows of ``length`` new tokens; idle rows and padding
        write to the spare column."""
        host = [[0, 0, 0] + [0] * length + [self.spare] * length for _ in range(batch)]
        for i, (row, prompt, start) in enumerate(zip(rows, prompts, starts)):
            size = len(prompt) - start
            host[i][:3] = row, size - 1, start
            host[i][3 : 3 + size] = prompt[start:]
            host[i][3 + length : 3 + length + size] = range(start, len(prompt))
        self._p_in[:batch, : 3 + 2 * length].copy_(self.torch.tensor(host, dtype=self.torch.long))
        self.steps += 1
        self.prompt_tokens[0] += sum(len(p) - s for p, s in zip(prompts, starts))

    def reset(self) -> None:
        """Every slot idle."""
        self._d_in.copy_(self._idle_state(self.slots))

    def _idle_state(self, n: int) -> Any:
        return self.torch.tensor([[0] * n, [self.spare] * n, [self.spare] * n, [0] * n], dtype=self.torch.long)

    def patch(self, rows: dict[int, tuple[int, int] | None]) -> None:
        """Set the decode state of some slots: (input token, its position) for a busy one, None for
        one that becomes idle (its position and writes go to the spare column). One copy."""
        if not rows:
            return
        torch = self.torch
        # Columns: slot, then its four state values. Pinned and non-blocking on a GPU, so the copy
        # queues behind the step in flight instead of waiting for it.
        host = torch.tensor(
            [[s, 0, self.spare, self.spare, 0] if v is None else [s, v[0], v[1], v[1], 1] for s, v in rows.items()],
            dtype=torch.long,
        ).T
        packed = self._queued_copy(host)
        self._d_in[:, packed[0]] = packed[1:]

    def move(self, moves: dict[int, int], columns: int | None = None) -> None:
        """Move running requests to other slots (source -> idle destination): their keys, values and
        decode state. Queued behind the step in flight, so the move carries what that step wrote;
        the sources become idle. The rows are swapped, so what a destination held (an earlier
        turn, ``skills/prefix_cache.py``) is kept in its source; only the first ``columns`` of
        each (all: None)."""
        if not moves:
            return
        torch = self.torch
        src, dst = self._queued_copy(torch.tensor([list(moves), list(moves.values())], dtype=torch.long))
        self._copy_rows(torch.cat([dst, src]), torch.cat([src, dst]), columns)
        self._d_in[:, dst] = self._d_in[:, src]
        self._d_in[:, src] = self._d_idle.expand(4, len(moves))
        self.moves += len(moves)

    def copy(self, sources: dict[int, int], columns: int) -> None:
        """Copy the first ``columns`` of each source slot's keys and values into its destination
        (destination -> source, both idle): a prefix another conversation shares (a long system
        prompt), extended from there. Queued in order with the steps."""
        if not sources:
            return
        torch = self.torch
        dst, src = self._queued_copy(torch.tensor([list(sources), list(sources.values())], dtype=torch.long))
        self._copy_rows(dst, src, columns)

    def _copy_rows(self, to: Any, of: Any, columns: int | None) -> None:
        """Each cache's rows ``of`` into rows ``to``, the first ``columns`` of them (all: None); the
        rows read are copied out first, so ``to`` and ``of`` may swap."""
        for cache in (*self.cache.keys, *self.cache.values):
            rows = cache[:, :, :columns]
            rows.index_copy_(0, to, rows.index_select(0, of))

    def _queued_copy(self, host: Any) -> Any:
        """``host`` on the device; on a GPU pinned and non-blocking, so it queues behind the step in
        flight instead of waiting for it."""
        if not self.device.startswith("cuda"):
            return host
        return host.contiguous().pin_memory().to(self.device, non_blocking=True)

    def launch(self, batch: int, context: int) -> Step:
        """Queue one decode step over slots ``[:batch]`` from the state on the device; attention
        reads ``context`` columns (at least every busy row's position + 1). Returns at once on a
        GPU; ``Step.tokens()`` waits for the result."""
        tokens = self._run(("decode", batch, context), lambda: self._decode_fn(batch, context))
        self.steps += 1
        self.widths.append(batch)
        if not self.device.startswith("cuda"):
            return Step(tokens.clone(), None)  # a replayed step's output is overwritten by the next
        host = self.torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
        host.copy_(tokens, non_blocking=True)  # ordered before the next replay overwrites ``tokens``
        done = self.torch.cuda.Event()
        done.record()
        return Step(host, done)

    def decode(self, rows: dict[int, tuple[int, int]]) -> dict[int, int]:
        """One step for exactly the slots in ``rows`` (slot -> (last token, its position)), waited for."""
        self.reset()
        self.patch(rows)
        batch = bucket(max(rows) + 1, self.batch_sizes)
        context = bucket(max(pos for _, pos in rows.values()) + 1, self.contexts)
        tokens = self.launch(batch, context).tokens()
        return {slot: tokens[slot] for slot in rows}

    def warm(self, max_prefill_tokens: int | None = None, chunk_tokens: int = 0) -> int:
        """Capture, ahead of the first request, every step the scheduler can ask for: a decode step
        for each (batch, context) bucket and a prefill for each (batch, prompt length) bucket it
        admits (one prompt of any length; groups within ``max_prefill_tokens`` padded). A capture
        while serving stalls every running reply for a few eager steps; at load it costs start-up
        time instead. Extend steps are captured for each context and batch bucket up to
        ``EXTEND_WARM_LENGTH`` new tokens (a new message and the reply's last tokens). With
        ``chunk_tokens`` (the scheduler computes longer prompts in pieces of that many), no step
        is longer than its bucket, so prefills stop there and extends go up to it: none is left to
        capture while serving. Without, a longer extend is captured when first run. Returns how
        many graphs were captured."""
        if not self.graphs.on:
            return 0
        started, before = time.perf_counter(), len(self.graphs.keys())
        piece = bucket(chunk_tokens, self.prompt_lengths) if chunk_tokens else self.prompt_lengths[-1]
        extend_max = piece if chunk_tokens else EXTEND_WARM_LENGTH
        for context in self.contexts:
            for batch in self.batch_sizes:
                self.decode({batch - 1: (0, context - 1)})

        def admitted(batch: int, length: int) -> bool:
            return batch == 1 or max_prefill_tokens is None or batch * length <= max_prefill_tokens

        for batch in self.prefill_sizes:
            for length in self.prompt_lengths:
                if admitted(batch, length) and length <= piece:
                    self.prefill(list(range(batch)), [[0] * length] * batch)
        for context in self.contexts:
            for batch in self.extend_sizes:
                for length in self.prompt_lengths:
                    if admitted(batch, length) and length <= min(extend_max, context):
                        self.extend(list(range(batch)), [[0] * context] * batch, [context - length] * batch)
        self.reset()
        self.prompt_tokens = [0, 0]
        captured = len(self.graphs.keys()) - before
        log.info("captured %d chat step graphs in %.1f s", captured, time.perf_counter() - started)
        return captured

    # ------------------------------------------------------------------ the load-time check

    def check(self, probe: list[int]) -> str | None:
        """Return why this engine cannot serve the model, or None. Slot 0 must be free. A fused
        forward that fails the check is dropped, and the model's own decoder is checked instead."""
        if self.fused is not None:
            graphs = self.graphs.on
            try:
                why = self._check(probe)
            except Exception as exc:  # noqa: BLE001 - a layout the fused forward misreads
                why = f"{type(exc).__name__}: {exc}"
            if why is None and graphs and not self.graphs.on:  # the model's decoder may still capture
                why, self.graphs.on = "its steps did not replay from CUDA graphs as they ran eagerly", True
            if why is None:
                return None
            log.warning("the fused chat forward failed its check (%s); running the model's own decoder", why)
            self.fused = None
        return self._check(probe)

    def _check(self, probe: list[int]) -> str | None:
        """One check of the forward in use.

        ``probe`` goes through the engine eagerly (a quarter prefilled, extended to half, the rest
        decoded token by token) and through the model's own forward: each next-token logit the
        engine computes (the last of the prefill and of the extend, then every decode step's) must agree within the dtype's
        rounding (compared as numbers, not argmaxes: a random-weight model's near-ties flip with
        the kernels). On a GPU the probe then runs through the captured graphs, which must predict
        what the eager steps predicted, else graphs are turned off; they are dropped either way and
        captured again with the configured sampling."""
        torch = self.torch
        why = self._unsupported()
        if why:
            return why
        split = max(1, len(probe) // 2)
        first = max(1, split // 2)  # prefilled; then extended to split, when that is further
        computed = ([first - 1] if first < split else []) + list(range(split - 1, len(probe)))
        with torch.inference_mode():
            want = self.model(input_ids=torch.tensor([probe], device=self.device)).logits[0, computed].float()
        saved, self.sampling = self.sampling, Sampling()
        graphs = self.graphs.on

        def run() -> list[int]:
            got = [self.prefill([0], [probe[:first]])[0]]
            if first < split:
                got.append(self.extend([0], [probe[:split]], [first])[0])
            return got + [self.decode({0: (probe[pos], pos)})[0] for pos in range(split, len(probe))]

        try:
            self.graphs.on, self._probe_logits = False, []
            eager = run()
            got = torch.stack([rows[0] for rows in self._probe_logits])
            self._probe_logits = None
            error = ((got - want).abs().max() / want.abs().max().clamp(min=1e-6)).item()
            if error > (CHECK_TOLERANCE_FP32 if self.dtype == torch.float32 else CHECK_TOLERANCE_16BIT):
                return f"its next-token logits differ from the model's own forward by {error:.1e} of their scale"
            if graphs:
                self.graphs.on = True
                replayed = run()
                same = sum(a == b for a, b in zip(replayed, eager))
                if not self.graphs.on:  # a capture failed (logged)
                    graphs = False
                elif same < CHECK_AGREEMENT * len(eager):
                    log.warning(
                        "chat steps replayed from CUDA graphs predicted %d of %d tokens as the eager steps did; "
                        "running without graphs", same, len(eager),
                    )  # fmt: skip
                    graphs = False
        finally:
            self.graphs.on, self._probe_logits = graphs, None
            self.sampling = saved
            self.graphs.clear()
            self.reset()
            self.prompt_tokens = [0, 0]
        return None

    def _unsupported(self) -> str | None:
        """What in the model's config this engine does not do, within its slots' length."""
        cfg = self.model.config.get_text_config()
        window = getattr(cfg, "sliding_window", None)
        sliding = getattr(cfg, "use_sliding_window", None) or "sliding_attention" in (getattr(cfg, "layer_types", None) or ())
        if sliding and window is not None and window < self.max_len:
            return f"sliding-window attention ({window} tokens) is shorter than a slot ({self.max_len} tokens)"
        return None
