"""The chat inference worker: owns the model and the engine that batches every session's requests.

Two engines, one interface (``add_request``, ``cancel_request``, ``register_result_handler``,
``get_result``), each batching on its own generation thread:

- ``slots`` (``skills.slot_engine``/``skills.slot_scheduler``): a static KV-cache slot per request
  and CUDA-graph steps on a GPU. ``auto`` picks it when it agrees with the model's own forward on
  a probe prompt at load.
- ``library``: transformers' ``ContinuousBatchingManager`` (paged cache), for any other model.

Outputs come back to the event loop through ``register_result_handler`` (``call_soon_threadsafe``),
so generation never blocks the loop. This is the in-process transport; torch is imported only here.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skills.loading import MODEL_LOAD_LOCK

from skills.lifecycle import ModelLoadError

log = logging.getLogger(__name__)

CPU_KV_BLOCKS = 64
CPU_MAX_BATCH_TOKENS = 1024
CPU_SLOTS = 16
GPU_MAX_SLOTS = 256
GPU_SLOT_MEMORY_SHARE = 0.3  # of the memory free after loading, at most, for the slots' KV cache
GPU_MAX_PREFILL_TOKENS = 8192
# Slot engine: a prompt with more to compute than this is computed in pieces of this many tokens, a
# decode step for the running replies between two (bench/long_prompt.py). On the CPU a 2,048-token
# prompt took SmolLM2-135M 5.2 s in one step, every other reply frozen meanwhile; a 256-token piece,
# 0.5-0.8 s. On a GPU, 1,024 keeps the pieces of the longest prompts few, and every extend step
# short enough to be captured at load.
CPU_PREFILL_CHUNK = 256
GPU_PREFILL_CHUNK = 1024
PROBE_TEXT = "The quick brown fox jumps over the lazy dog, then naps in the warm afternoon sun."


@dataclass(frozen=True)
class ChatWorkerOptions:
    model: str  # hub name or local folder (transformers model + tokenizer with a chat template)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    max_new_tokens: int = 512
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    kv_blocks: int | None = None  # KV-cache pages (None: library picks from free memory)
    kv_page_size: int = 256
    max_batch_tokens: int | None = None
    cuda_graphs: bool | None = None  # CUDA graphs for the forward passes (None: the library decides)
    compile_level: int = 0  # torch.compile level for the forward passes, 0-3 (0: eager)
    local_files_only: bool = False  # never ask a model hub (set when none is reachable)
    engine: str = "auto"  # auto | slots | library (see the module docstring)
    slots: int | None = None  # slot engine: requests decoded at once (None: 16 on CPU, up to 256 on GPU)
    context_tokens: int = 2048  # slot engine: prompt budget; a slot holds this plus max_new_tokens
    fused_forward: bool = True  # slot engine: Llama/Qwen2 layers in fewer kernels (skills/fused_decoder.py)
    prefix_reuse: bool = True  # slot engine: a conversation's next turn computes only its new tokens (skills/prefix_cache.py)
    prefill_chunk: int | None = None  # slot engine: longer prompts are computed in pieces of this many tokens (None: by device; 0: whole)
    # Chat first on a shared GPU (skills/chat_first.py); handed to the model's process when spawned.
    chat_first: Any = field(default=None, compare=False, repr=False)


def _resolve_device(torch: Any, device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def _resolve_dtype(torch: Any, dtype: str, device: str) -> Any:
    if dtype == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    try:
        return getattr(torch, dtype)
    except AttributeError:
        raise ModelLoadError(f"unknown dtype {dtype!r}; set ASSISTANT_CHAT_DTYPE to auto, float32, bfloat16 or float16")


class ChatWorker:
    """Loads a causal LM and serves streaming generation requests from many sessions at once."""

    def __init__(self, options: ChatWorkerOptions) -> None:
        self.options = options
        self.tokenizer: Any = None
        self.model: Any = None
        self._manager: Any = None
        self._lock = threading.Lock()
        self.eos_token_ids: list[int] = []
        self.max_positions: int | None = None
        # Observability: prompts submitted (newest last) and the largest batch seen.
        self.recent_prompts = RecentPrompts(self)
        self.max_concurrent_requests = 0
        self.steps = 0
        self.engine = ""  # "slots" or "library" once loaded

    # ------------------------------------------------------------------ loading (blocking; run in a thread)

    def load(self) -> None:
        try:
            with MODEL_LOAD_LOCK:  # transformers' lazy imports race when two loaders start together
                import torch
                from transformers import AutoModelForCausalLM, AutoTokenizer
        except ImportError as exc:  # pragma: no cover - the project's install pulls these in
            raise ModelLoadError(f"torch/transformers are not installed ({exc}); run: pip install -e .") from exc

        opts = self.options
        device = _resolve_device(torch, opts.device)
        dtype = _resolve_dtype(torch, opts.dtype, device)
        looks_local = opts.model.startswith((".", "/", "~")) or Path(opts.model).expanduser().exists()
        if looks_local and not Path(opts.model).expanduser().is_dir():
            raise ModelLoadError(
                f"chat model folder {opts.model!r} does not exist; set ASSISTANT_CHAT_MODEL to a folder holding a "
                "transformers model and tokenizer, or to a hub name this machine can reach"
            )
        try:
            local = {"local_files_only": True} if opts.local_files_only else {}
            tokenizer = AutoTokenizer.from_pretrained(opts.model, **local)
            with MODEL_LOAD_LOCK:  # other skills load models in other threads; see skills/loading.py
                model = AutoModelForCausalLM.from_pretrained(opts.model, dtype=dtype, **local)
        except Exception as exc:  # noqa: BLE001 - every loading failure gets the same advice
            raise ModelLoadError(
                f"could not load chat model {opts.model!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}. "
                "Set ASSISTANT_CHAT_MODEL to a local folder holding a transformers model and tokenizer, "
                "or to a hub name this machine can reach, or run `assistant models prepare --profile offline`"
            ) from exc
        if not getattr(tokenizer, "chat_template", None):
            raise ModelLoadError(
                f"chat model {opts.model!r} has no chat template; set ASSISTANT_CHAT_MODEL to an instruct/chat model"
            )
        model = model.to(device).eval()

        eos = model.generation_config.eos_token_id if model.generation_config is not None else None
        eos_ids = eos if isinstance(eos, list) else ([eos] if eos is not None else [])
        if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos_ids:
            eos_ids.append(tokenizer.eos_token_id)
        self.eos_token_ids = eos_ids
        self.max_positions = getattr(model.config.get_text_config(), "max_position_embeddings", None)

        manager = self._start_slots(torch, model, tokenizer, device) if opts.engine in ("auto", "slots") else None
        if manager is None:
            manager = self._start_library(model, tokenizer, device)
        self.tokenizer, self.model, self._manager = tokenizer, model, manager
        log.info("chat model %s loaded on %s (%s), %s engine", opts.model, device, dtype, self.engine)

    def _start_slots(self, torch: Any, model: Any, tokenizer: Any, device: str) -> Any:
        """The slot engine, or None (auto) when it does not agree with the model."""
        from skills.slot_engine import Sampling, SlotEngine, slot_bytes
        from skills.slot_scheduler import SlotScheduler

        opts = self.options
        max_len = opts.context_tokens + opts.max_new_tokens
        if self.max_positions:
            max_len = min(max_len, self.max_positions)
        on_gpu = device.startswith("cuda")
        slots = opts.slots
        if slots is None and on_gpu:
            free, _ = torch.cuda.mem_get_info(torch.device(device))
            slots = max(1, min(GPU_MAX_SLOTS, int(free * GPU_SLOT_MEMORY_SHARE) // slot_bytes(model, max_len)))
        engine = None
        prefill_budget = GPU_MAX_PREFILL_TOKENS if on_gpu else CPU_MAX_BATCH_TOKENS
        chunk = opts.prefill_chunk if opts.prefill_chunk is not None else GPU_PREFILL_CHUNK if on_gpu else CPU_PREFILL_CHUNK
        try:
            engine = SlotEngine(
                model, slots=slots or CPU_SLOTS, max_len=max_len,
                sampling=Sampling(opts.temperature, opts.top_p), cuda_graphs=on_gpu and opts.cuda_graphs is not False,
                fused=opts.fused_forward,
            )
            why = engine.check(tokenizer(PROBE_TEXT)["input_ids"][:32])
            if why is None:
                engine.warm(prefill_budget, chunk)
        except Exception as exc:  # noqa: BLE001 - a model the engine cannot drive at all
            log.warning("the slot engine failed on chat model %s", opts.model, exc_info=True)
            why = f"{type(exc).__name__}: {exc}"
        if why:
            if opts.engine == "slots":
                raise ModelLoadError(
                    f"the slot engine does not fit chat model {opts.model!r} ({why}); set ASSISTANT_CHAT_ENGINE=library"
                )
            log.warning("chat model %s: the slot engine does not fit (%s); using the library's engine", opts.model, why)
            del engine
            if on_gpu:
                torch.cuda.empty_cache()  # the library sizes its cache from the memory left free
            return None
        first = opts.chat_first
        scheduler = SlotScheduler(
            engine, max_prefill_tokens=prefill_budget, on_step=self._count_step, on_waiting=first.set if first else None,
            prefix_reuse=opts.prefix_reuse, chunk_tokens=chunk,
        )  # fmt: skip
        scheduler.start()
        self.engine = "slots"
        return scheduler

    def _start_library(self, model: Any, tokenizer: Any, device: str) -> Any:
        from transformers import ContinuousBatchingConfig, GenerationConfig

        opts = self.options
        eos_ids = self.eos_token_ids
        sampling = opts.temperature > 0
        gen_config = GenerationConfig(
            max_new_tokens=opts.max_new_tokens,
            do_sample=sampling,
            temperature=opts.temperature if sampling else None,
            top_p=opts.top_p if sampling else None,
            eos_token_id=eos_ids or -1,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos_ids or [0])[0],
        )
        on_cpu = device == "cpu"
        cb_config = ContinuousBatchingConfig(
            # The library sizes the cache from free accelerator memory; on the CPU that means most of
            # the RAM, allocated up front, so CPU runs get a modest cache unless told otherwise.
            num_blocks=opts.kv_blocks or (CPU_KV_BLOCKS if on_cpu else None),
            page_size=opts.kv_page_size,
            max_batch_tokens=opts.max_batch_tokens or (CPU_MAX_BATCH_TOKENS if on_cpu else None),
            auto_switch_to_flash=device.startswith("cuda"),
            use_cuda_graph=opts.cuda_graphs if device.startswith("cuda") else False,
            default_compile_level=opts.compile_level,
        )
        manager = model.init_continuous_batching(generation_config=gen_config, continuous_batching_config=cb_config)
        model.register_forward_pre_hook(self._on_step)
        manager.start()
        self.engine = "library"
        return LibraryManager(manager)

    def _on_step(self, _module: Any, _args: Any) -> None:
        """The library engine: runs on the generation thread before each forward."""
        manager = self._manager
        processor = manager.batch_processor if manager is not None else None
        self._count_step(len(processor.scheduler.active_requests) if processor is not None else 0)

    def _count_step(self, n: int) -> None:
        """Record a forward pass shared by ``n`` requests."""
        self.steps += 1
        if n > self.max_concurrent_requests:
            self.max_concurrent_requests = n

    def close(self) -> None:
        manager, self._manager = self._manager, None
        if manager is not None:
            try:
                manager.stop(block=True, timeout=10)
            except Exception:  # noqa: BLE001
                log.exception("stopping the chat generation loop failed")

    # ------------------------------------------------------------------ serving (call on the event loop)

    def is_running(self) -> bool:
        return self._manager is not None and self._manager.is_running()

    def submit(self, *, request_id: str, prompt_ids: list[int], max_new_tokens: int, on_output: Callable) -> None:
        """Queue a request; ``on_output(GenerationOutput)`` is called on this event loop for every new token."""
        manager = self._manager
        if manager is None or not manager.is_running():
            raise RuntimeError("the chat generation loop is not running")
        self.recent_prompts.add(request_id, prompt_ids)
        manager.register_result_handler(request_id, on_output)
        accepted = manager.add_request(
            input_ids=prompt_ids,
            request_id=request_id,
            max_new_tokens=max_new_tokens,
            streaming=True,
            eos_token_id=self.eos_token_ids or None,
        )
        if accepted is None:
            manager.drop_handler(request_id)
            raise RuntimeError("the chat generation loop refused the request (it is stopping)")

    def cancel(self, request_id: str) -> None:
        """Stop generating for ``request_id`` and free its KV-cache pages."""
        manager = self._manager
        if manager is not None:
            manager.drop_handler(request_id)
            manager.cancel_request(request_id)

    def kv_free_fraction(self) -> float:
        """Share of the KV cache that is free (1.0 when no request holds it)."""
        return 1.0 if self._manager is None else self._manager.kv_free_fraction()

    def active_request_ids(self) -> set[str]:
        """Requests the scheduler still holds (running or waiting)."""
        return set() if self._manager is None else self._manager.active_request_ids()

    def prompt_tokens(self) -> tuple[int, int]:
        """Prompt tokens the slot engine computed, and those it read from a slot's earlier turn
        instead (skills/prefix_cache.py); (0, 0) with the library's engine."""
        engine = getattr(self._manager, "engine", None) if self.engine == "slots" else None
        return (0, 0) if engine is None else (engine.prompt_tokens[0], engine.prompt_tokens[1])


class LibraryManager:
    """transformers' ``ContinuousBatchingManager`` (every call passes through), plus the three
    calls the slot scheduler has and the library spells through its internals."""

    def __init__(self, manager: Any) -> None:
        self._manager = manager

    def __getattr__(self, name: str) -> Any:
        return getattr(self._manager, name)

    def drop_handler(self, request_id: str) -> None:
        router = self._manager.output_router
        with router._lock:
            router.result_handlers.pop(request_id, None)

    def kv_free_fraction(self) -> float:
        processor = self._manager.batch_processor
        return 1.0 if processor is None else float(processor.cache.compute_free_capacity(relative=True))

    def active_request_ids(self) -> set[str]:
        processor = self._manager.batch_processor
        if processor is None:
            return set()
        sched = processor.scheduler
        for _ in range(5):
            try:
                return set(sched.active_requests) | set(sched.waiting_requests)
            except RuntimeError:  # dict changed size while the generation thread ran
                continue
        return set()


class RecentPrompts:
    """The last prompts a worker submitted, as (request id, text), newest last. They are kept as
    token ids and decoded when read: decoding each prompt as it was submitted was about a fifth of
    a chat turn's start on the event loop (``bench/chat_start.py``)."""

    def __init__(self, worker: Any, maxlen: int = 32) -> None:
        self._worker = worker  # its tokenizer decodes
        self._items: deque[tuple[str, list[int]]] = deque(maxlen=maxlen)

    def add(self, request_id: str, prompt_ids: list[int]) -> None:
        self._items.append((request_id, prompt_ids))

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> tuple[str, str]:
        request_id, ids = self._items[index]
        return request_id, self._worker.tokenizer.decode(ids)

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return (self[i] for i in range(len(self._items)))


def run_in_thread(fn: Callable[[], Any]) -> asyncio.Future:
    return asyncio.get_running_loop().run_in_executor(None, fn)
