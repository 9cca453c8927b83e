"""Whisper's greedy 30-second-window decoding with a static KV cache, replayable from CUDA graphs.

``whisper.decode`` grows its key/value cache by concatenation, so every step has new shapes and runs
eagerly: on the H200 run in bench/README.md its decode loop was launch-bound like the chat model's.
Here each batch bucket (1, 2, 4, ... up to the worker's batch size) has fixed buffers: the log-mel
input, the cross-attention keys and values (computed once per window, with the encoder), and a
self-attention cache of ``n_text_ctx`` columns. These passes run on them, each one CUDA graph per
batch bucket on a GPU:

- ``encode``: the model's own ``AudioEncoder`` on the mel batch, then every decoder block's
  cross-attention key and value projections;
- ``prompt``: the whole start-of-transcript prompt (``<|startoftranscript|><|en|><|transcribe|>
  <|notimestamps|>``) in one forward pass, every row's tokens at once under a causal mask, writing
  their keys and values into the cache and sampling the first token; with the language to be
  detected, ``language`` runs ``<|startoftranscript|>`` first and picks each row's language token
  from its logits (whisper's ``detect_language``, which runs the decoder eagerly and projects the
  audio into every block's cross-attention keys and values a second time); the prompt is put
  together on the device, the picked language token included, so nothing waits for the host;
- ``step``: one token per row at one shared position, through the model's own decoder modules
  (layer norms, projections, MLPs), attention over the static cache under a ``column <= position``
  mask, then whisper's logit filters (its suppressed tokens; blank and end-of-text at the first
  sampled step) and argmax. The sampled tokens are fed back on the device, and each step is queued
  before the previous one's tokens are read back (``Readback``), so the GPU does not wait for Python.

The result is what ``whisper.decode`` returns with ``temperature=0, without_timestamps=True`` (the
speech worker's options); ``check`` compares the two on a probe at load. Torch is imported only by
the worker.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from skills.cuda_graphs import StepGraphs
from skills.slot_engine import bucket

log = logging.getLogger(__name__)

PROBE_TOKENS = 12  # tokens compared with whisper.decode at load


@dataclass(frozen=True)
class WindowResult:
    tokens: list[int]
    language: str | None


class Readback:
    """Sampled tokens copied to the host without waiting for the GPU: ``push`` queues the copy (into
    pinned memory, behind the step that made them), ``pop`` waits for that copy alone and returns the
    tokens. Two may be outstanding, the step being read and the one queued after it. Off a GPU a
    push reads at once."""

    def __init__(self, torch: Any, device: str, rows: int) -> None:
        self.torch, self.device, self.cuda = torch, device, device.startswith("cuda")
        if self.cuda:
            self._host = torch.empty(2, rows, dtype=torch.long, pin_memory=True)
            self._events = [torch.cuda.Event(), torch.cuda.Event()]
        self._next = 0

    def push(self, tokens: Any) -> Any:
        if not self.cuda:
            return tokens.tolist()
        slot, self._next = self._next, 1 - self._next
        self._host[slot, : tokens.shape[0]].copy_(tokens, non_blocking=True)
        self._events[slot].record(self.torch.cuda.current_stream(self.device))  # the copy's stream
        return slot, tokens.shape[0]

    def pop(self, pushed: Any) -> list[int]:
        if not self.cuda:
            return pushed
        slot, n = pushed
        self._events[slot].synchronize()
        return self._host[slot, :n].tolist()


class StaticWhisperDecoder:
    def __init__(
        self,
        model: Any,
        *,
        max_batch: int,
        sample_len: int,
        language: str | None,
        cuda_graphs: bool,
        hold: Callable[[], float] | None = None,
    ) -> None:
        import torch
        import whisper

        self.torch, self.whisper, self.model = torch, whisper, model
        self.hold = hold or (lambda: 0.0)  # called before each GPU step (skills/chat_first.py)
        dims = model.dims
        self.device = str(model.device)
        self.fp16 = self.device.startswith("cuda")
        self.dtype = torch.float16 if self.fp16 else torch.float32
        self.n_ctx = dims.n_text_ctx
        # An English-only checkpoint has no language tokens to detect from (the worker says "en" too).
        self.language = language if language or model.is_multilingual else "en"
        self.tokenizer = whisper.tokenizer.get_tokenizer(
            model.is_multilingual, num_languages=model.num_languages, language=language or "en", task="transcribe"
        )
        options = whisper.DecodingOptions(language=self.language, without_timestamps=True, sample_len=sample_len, fp16=self.fp16)
        task = whisper.decoding.DecodingTask(model, options)  # the library's own token rules, read once
        self.initial = list(task.initial_tokens)
        self.sot_index = task.sot_index
        self.sample_len = min(task.sample_len, self.n_ctx - len(self.initial))
        vocab = dims.n_vocab
        self._suppress = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self._suppress[list(task._get_suppress_tokens())] = True
        self._blank = torch.zeros(vocab, dtype=torch.bool, device=self.device)
        self._blank[self.tokenizer.encode(" ") + [self.tokenizer.eot]] = True
        codes = dict(zip(self.tokenizer.all_language_tokens, self.tokenizer.all_language_codes))
        self._codes = codes if model.is_multilingual else {}
        self._not_language = torch.ones(vocab, dtype=torch.bool, device=self.device)
        self._not_language[list(self._codes)] = False
        self.batch_sizes = [b for b in (1, 2, 4, 8, 16, 32, 64) if b < max_batch] + [max_batch]
        layers, state, dev = dims.n_text_layer, dims.n_text_state, self.device
        self._mel = torch.zeros(max_batch, dims.n_mels, 3000, dtype=self.dtype, device=dev)
        self._audio = torch.zeros(max_batch, dims.n_audio_ctx, dims.n_audio_state, dtype=self.dtype, device=dev)

        def pair(length: int) -> tuple[Any, Any]:
            return tuple(torch.zeros(max_batch, length, state, dtype=self.dtype, device=dev) for _ in range(2))

        self._cross = [pair(dims.n_audio_ctx) for _ in range(layers)]  # keys, values of the audio
        self._self = [pair(self.n_ctx) for _ in range(layers)]  # keys, values of the tokens so far
        self._tokens = torch.zeros(max_batch, len(self.initial), dtype=torch.long, device=dev)  # the prompt, then a column
        self._initial = torch.tensor(self.initial, dtype=torch.long, device=dev)  # copied in on the device, without a wait
        self._pos = torch.zeros(1, dtype=torch.long, device=dev)  # the position of the first token fed
        self._offsets = torch.arange(len(self.initial), device=dev)
        self._first = torch.zeros(1, dtype=torch.bool, device=dev)
        self._columns = torch.arange(self.n_ctx, device=dev)
        # The output projection in the step's dtype, cast once (whisper's decoder casts the float32
        # embedding at every step: on Whisper-base a read of 106 MB and a write of 53 MB a step).
        self._unembed = model.decoder.token_embedding.weight.detach().to(self.dtype)
        self.graphs = StepGraphs(torch, self.device, "speech", on=cuda_graphs and self.fp16)
        self._reads = Readback(torch, self.device, max_batch)
        self._language_reads = Readback(torch, self.device, max_batch)  # the detected languages, read at the end

    # ------------------------------------------------------------------ the captured functions

    def _encode_fn(self, batch: int) -> Any:
        audio = self.model.encoder(self._mel[:batch])
        self._audio[:batch].copy_(audio)
        for block, (k, v) in zip(self.model.decoder.blocks, self._cross):
            k[:batch].copy_(block.cross_attn.key(audio))
            v[:batch].copy_(block.cross_attn.value(audio))
        return self._audio

    def _attend(self, attn: Any, q: Any, k: Any, v: Any, mask: Any) -> Any:
        b, t, state = q.shape
        heads = attn.n_head
        q, k, v = (x.view(x.shape[0], x.shape[1], heads, -1).transpose(1, 2) for x in (q, k, v))
        out = self.torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.out(out.transpose(1, 2).reshape(b, t, state))

    def _step_fn(self, batch: int, width: int = 1) -> Any:
        return self._logits_fn(batch, width).argmax(dim=-1)

    def _language_fn(self, batch: int, width: int) -> Any:
        """Each row's most likely language token after ``width`` prompt tokens (whisper's
        ``detect_language``: its logits at ``<|startoftranscript|>``, every other token masked)."""
        logits = self._forward(batch, width)
        return logits.masked_fill(self._not_language, float("-inf")).argmax(dim=-1)

    def _logits_fn(self, batch: int, width: int = 1) -> Any:
        """The filtered next-token logits of every row after its ``width`` fed tokens, [batch, vocab]."""
        logits = self._forward(batch, width)
        return logits.masked_fill(self._suppress | (self._first & self._blank), float("-inf"))

    def _forward(self, batch: int, width: int) -> Any:
        """Feed ``self._tokens[:batch, :width]`` at positions ``_pos, _pos + 1, ...``: their keys and
        values go into the cache; returns the float32 logits after the last of them, [batch, vocab]."""
        decoder = self.model.decoder
        tokens, pos = self._tokens[:batch, :width], self._pos + self._offsets[:width]
        x = decoder.token_embedding(tokens) + decoder.positional_embedding.index_select(0, pos)
        x = x.to(self.dtype)
        mask = (self._columns[None, :] <= pos[:, None])[None, None]  # [1, 1, width, n_ctx]: causal
        for block, (ck, cv), (sk, sv) in zip(decoder.blocks, self._cross, self._self):
            h = block.attn_ln(x)
            sk[:batch].index_copy_(1, pos, block.attn.key(h))
            sv[:batch].index_copy_(1, pos, block.attn.value(h))
            x = x + self._attend(block.attn, block.attn.query(h), sk[:batch], sv[:batch], mask)
            h = block.cross_attn_ln(x)
            x = x + self._attend(block.cross_attn, block.cross_attn.query(h), ck[:batch], cv[:batch], None)
            x = x + block.mlp(block.mlp_ln(x))
        x = decoder.ln(x)
        return (x[:, -1] @ self._unembed.T).float()

    # ------------------------------------------------------------------ decoding

    def decode(self, mels: Any) -> list[WindowResult]:
        """Greedy transcripts of ``mels`` ([n, n_mels, 3000], n up to the largest batch bucket)."""
        torch = self.torch
        n = mels.shape[0]
        batch = bucket(n, self.batch_sizes)
        with torch.inference_mode():
            self._mel[:n].copy_(mels)
            self.hold()
            self.graphs.run(("encode", batch), lambda: self._encode_fn(batch))
            start, detected = self._prompt(batch, n)
            prompt = len(self.initial)
            self._pos.fill_(start)
            self._first.fill_(True)
            self.hold()
            sampled = self.graphs.run(("prompt", batch, prompt - start), lambda: self._step_fn(batch, prompt - start))
            self._first.fill_(False)
            out: list[list[int]] = [[] for _ in range(n)]
            done = [False] * n
            eot = self.tokenizer.eot
            pending = self._reads.push(sampled[:n])
            for k in range(1, self.sample_len + 1):
                # The next step is queued before this one's tokens are read: the GPU runs it while
                # they come back and are looked at (after the last token, one step runs for nothing).
                ahead = None
                if k < self.sample_len:
                    self._tokens[:batch, 0].copy_(sampled)  # fed back on the device
                    self._pos.fill_(prompt + k - 1)
                    self.hold()
                    sampled = self.graphs.run(("step", batch), lambda: self._step_fn(batch))
                    ahead = self._reads.push(sampled[:n])
                for i, token in enumerate(self._reads.pop(pending)):
                    if done[i]:
                        continue
                    if token == eot:
                        done[i] = True
                    else:
                        out[i].append(token)
                if all(done) or ahead is None:
                    break
                pending = ahead
            if detected is None:
                languages: list[str | None] = [self.language] * n
            else:  # copied long ago, behind the language pass
                languages = [self._codes.get(token) for token in self._language_reads.pop(detected)]
        return [WindowResult(tokens, language) for tokens, language in zip(out, languages)]

    def _prompt(self, batch: int, n: int) -> tuple[int, Any]:
        """Fill the token buffer with every row's prompt on the device, detecting each row's language
        first when none is set. Returns the position the prompt is fed from (past
        ``<|startoftranscript|>`` once it has been run for the language) and, when detecting, the
        rows' language tokens as pushed to ``_language_reads`` (else None)."""
        if self.language is not None:
            self._tokens[:batch].copy_(self._initial.expand(batch, -1))
            return 0, None
        head = self.sot_index + 1
        self._tokens[:batch, :head].copy_(self._initial[:head].expand(batch, -1))
        self._pos.fill_(0)
        self.hold()
        found = self.graphs.run(("language", batch, head), lambda: self._language_fn(batch, head))
        rest = len(self.initial) - head  # the language token, then the task's tokens
        self._tokens[:batch, 0].copy_(found)
        self._tokens[:batch, 1:rest].copy_(self._initial[head + 1 :].expand(batch, -1))
        return head, self._language_reads.push(found[:n])

    def warm(self) -> None:
        """Capture every batch bucket's graphs ahead of the first utterance."""
        if not self.graphs.on:
            return
        for batch in self.batch_sizes:
            self.decode(self.torch.zeros(batch, self._mel.shape[1], 3000, device=self.device))

    def check(self, mel: Any) -> str | None:
        """Compare this decoder with whisper's own on ``mel`` ([1, n_mels, 3000]); return why they
        differ, or None. Teacher-forced on ``whisper.decode``'s tokens, the logits of every pass (the
        language, the prompt, each step) must match the library decoder's (a near-tie may flip a
        token of a random-weight model; a wrong cache changes the logits); then graph replay must
        give what eager steps give."""
        torch, whisper = self.torch, self.whisper
        probe = min(self.sample_len, PROBE_TOKENS)
        options = whisper.DecodingOptions(language=self.language, without_timestamps=True, sample_len=probe, fp16=self.fp16)
        graphs, self.graphs.on = self.graphs.on, False
        try:
            with torch.inference_mode():
                result = whisper.decode(self.model, mel, options)[0]
                tokens = self.initial[:]
                if self.language is None:
                    tokens[self.sot_index + 1] = self.tokenizer.to_language_token(result.language)
                tokens += result.tokens
                self._mel[:1].copy_(mel)
                audio = self._encode_fn(1)[:1]
                want = self.model.decoder(torch.tensor([tokens], device=self.device), audio)[0]
                prompt, start, got, rows = len(self.initial), 0, [], []
                if self.language is None:  # the language logits at <|startoftranscript|>
                    start = self.sot_index + 1
                    self._tokens[0, :start] = torch.tensor(tokens[:start])
                    self._pos.fill_(0)
                    got.append(self._forward(1, start)[0].masked_fill(self._not_language, float("-inf")))
                    rows.append(start - 1)
                self._tokens[0, : prompt - start] = torch.tensor(tokens[start:prompt])  # the prompt in one pass
                self._pos.fill_(start)
                self._first.fill_(True)
                got.append(self._logits_fn(1, prompt - start)[0])
                self._first.fill_(False)
                for pos, token in enumerate(result.tokens[:-1], start=prompt):  # then one step per token
                    self._tokens[0, 0] = token
                    self._pos.fill_(pos)
                    got.append(self._logits_fn(1)[0])
                rows += range(prompt - 1, prompt - 1 + len(got) - len(rows))
                got, want = torch.stack(got), want[rows]
                theirs, mine = int(torch.isfinite(want).sum()), int(torch.isfinite(got).sum())
                want = want.masked_fill(torch.isinf(got), float("-inf"))
                finite = torch.isfinite(want)
                if not bool(finite.any()):  # e.g. a float16 overflow: nothing to compare
                    return f"no finite logits to compare on the probe (whisper's decoder {theirs}, this one {mine} of {got.numel()})"
                scale = want[finite].abs().max().clamp(min=1.0)
                err = ((got - want).abs()[finite].max() / scale).item()
                if not bool(torch.equal(torch.isfinite(got), finite)) or err > (2e-2 if self.fp16 else 1e-3):
                    return f"its logits differ from whisper's own decoder by {err:.2e} of their scale"
        finally:
            self.graphs.on = graphs
        if graphs:
            self.graphs.on = False
            eager = self.decode(mel)[0].tokens
            self.graphs.on = True
            replayed = self.decode(mel)[0].tokens
            if self.graphs.on and replayed != eager:
                log.warning("speech steps replayed from CUDA graphs disagree with eager steps; running without graphs")
                self.graphs.on = False
        return None
