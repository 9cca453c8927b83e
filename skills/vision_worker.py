"""The vision inference worker: owns one image-to-text model (captioning or VQA) and batches requests.

Requests from every session go into one queue on the event loop. A batcher task takes the first
request, collects more for ``batch_wait_ms`` (and everything that arrived while the previous batch
ran), then runs ONE ``generate`` call for the whole batch on the worker's own thread, so the event
loop never blocks. A failing batch fails its requests and the worker keeps serving.
With ``in_process=False`` the model lives in a child process (``skills.model_process``) and that
thread only sends it each batch and waits; torch is imported only where the model is.
"""

from __future__ import annotations

import asyncio
import io
import logging
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from skills.base import SkillError
from skills.loading import MODEL_LOAD_LOCK

from skills.lifecycle import ModelLoadError
from skills.model_process import ModelProcess, free_cuda_memory

log = logging.getLogger(__name__)

Task = Literal["caption", "vqa"]


@dataclass(frozen=True)
class VisionWorkerOptions:
    model: str  # hub name or local folder (transformers model + processor)
    task: Task  # caption: image -> text; vqa: (image, question) -> answer
    setting: str = "ASSISTANT_CAPTION_MODEL"  # the setting named in load errors
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float16 on cuda, float32 on cpu) | float32 | bfloat16 | float16
    max_new_tokens: int = 40
    max_batch: int = 16  # most images in one generate call
    batch_wait_ms: float = 5.0  # how long the first request of a batch waits for company
    local_files_only: bool = False  # never ask a model hub (set when none is reachable)
    in_process: bool = True  # False: the model runs in a child process (skills/model_process.py)
    # Chat first on a shared GPU (skills/chat_first.py); handed to the model's process when spawned.
    chat_first: Any = field(default=None, compare=False, repr=False)


@dataclass
class _Request:
    image: bytes
    question: str | None
    future: asyncio.Future = field(repr=False)


class VisionWorker:
    def __init__(self, options: VisionWorkerOptions) -> None:
        self.options = options
        self.model: Any = None
        self.processor: Any = None
        self.device = "cpu"
        self._queue: asyncio.Queue[_Request] | None = None
        self._batcher: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"vision-{options.task}")
        self.host: ModelProcess | None = None  # the model's process, when not in this one
        self._generate_options: dict[str, Any] = {}  # extra ``generate`` arguments, set at load
        # Observability: sizes of the most recent batches, newest last.
        self.batch_sizes: deque[int] = deque(maxlen=256)

    # ------------------------------------------------------------------ loading (blocking; run in a thread)

    def load(self) -> None:
        """Load the model, here or in a process of its own (blocking)."""
        if self.options.in_process:
            self.load_model()
            return
        self.host = ModelProcess(
            f"{self.options.task}-model", load_vision_model, (type(self), replace(self.options, in_process=True))
        )
        self.device = self.host.start()["device"]
        log.info("%s model %s loaded on %s in process %s", self.options.task, self.options.model, self.device, self.host.pid)

    def host_info(self) -> dict[str, Any]:
        return {"device": self.device}

    def load_model(self) -> None:
        try:
            with MODEL_LOAD_LOCK:  # transformers' lazy imports race when two loaders start together
                import torch
                from transformers import AutoModelForImageTextToText, AutoModelForVisualQuestionAnswering, AutoProcessor
        except ImportError as exc:  # pragma: no cover - the project's install pulls these in
            raise ModelLoadError(f"torch/transformers are not installed ({exc}); run: pip install -e .") from exc
        opts = self.options
        if not opts.model:
            raise ModelLoadError(f"no {opts.task} model configured; set {opts.setting}")
        device = ("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device
        if opts.dtype == "auto":
            dtype = torch.float16 if device.startswith("cuda") else torch.float32
        elif isinstance(getattr(torch, opts.dtype, None), torch.dtype):
            dtype = getattr(torch, opts.dtype)
        else:
            raise ModelLoadError(f"unknown dtype {opts.dtype!r}; set ASSISTANT_VISION_DTYPE to auto, float32, bfloat16 or float16")
        looks_local = opts.model.startswith((".", "/", "~")) or Path(opts.model).expanduser().exists()
        if looks_local and not Path(opts.model).expanduser().is_dir():
            raise ModelLoadError(
                f"{opts.task} model folder {opts.model!r} does not exist; set {opts.setting} to a folder holding a "
                "transformers model and processor, or to a hub name this machine can reach"
            )
        auto = AutoModelForImageTextToText if opts.task == "caption" else AutoModelForVisualQuestionAnswering
        try:
            # The processor first, outside the lock: an unreachable hub fails here without holding
            # up the other skills' loads.
            local = {"local_files_only": True} if opts.local_files_only else {}
            processor = AutoProcessor.from_pretrained(opts.model, **local)
            with MODEL_LOAD_LOCK:  # see skills/loading.py
                model = auto.from_pretrained(opts.model, dtype=dtype, **local).to(device).eval()
        except Exception as exc:  # noqa: BLE001 - every loading failure gets the same advice
            raise ModelLoadError(
                f"could not load {opts.task} model {opts.model!r}: {type(exc).__name__}: "
                f"{str(exc).splitlines()[0][:300] if str(exc) else ''}. Set {opts.setting} to a local folder holding "
                "a transformers model and processor (e.g. a saved Salesforce/blip-* model), or to a hub name this "
                f"machine can reach; set it empty to turn {opts.task} off"
            ) from exc
        self.model, self.processor, self.device = model, processor, device
        first = opts.chat_first  # chat prefill first (skills/chat_first.py): a hold after each step
        self._generate_options = {"stopping_criteria": holding_steps(first.hold)} if first is not None else {}
        log.info("%s model %s loaded on %s (%s)", opts.task, opts.model, device, dtype)

    async def aclose(self) -> None:
        """Stop batching (failing what is queued) and release the model."""
        batcher, self._batcher = self._batcher, None
        if batcher is not None:
            batcher.cancel()
            await asyncio.gather(batcher, return_exceptions=True)
        while self._queue is not None and not self._queue.empty():
            self._queue.get_nowait().future.cancel()
        await asyncio.to_thread(self._executor.shutdown, wait=True, cancel_futures=True)
        if self.host is not None:
            await asyncio.to_thread(self.host.close)
        self.model = None

    # ------------------------------------------------------------------ inference (blocking; worker thread)

    def _generate(self, items: list[tuple[bytes, str | None]]) -> list[tuple[str, int] | SkillError]:
        return self.generate_batch(items) if self.host is None else self.host.call("generate_batch", items)

    def generate_batch(self, items: list[tuple[bytes, str | None]]) -> list[tuple[str, int] | SkillError]:
        """Run one ``generate`` call for every decodable image in ``items``; returns, per item,
        (text, generated tokens) or the error for that item."""
        import torch
        from PIL import Image

        results: list[tuple[str, int] | SkillError] = [SkillError("image_corrupt", "")] * len(items)
        images, questions, index = [], [], []
        for i, (data, question) in enumerate(items):
            try:
                with Image.open(io.BytesIO(data)) as img:
                    images.append(img.convert("RGB"))
            except Exception as exc:  # noqa: BLE001 - one bad image fails only its own request
                results[i] = SkillError("image_corrupt", f"the image could not be decoded: {exc}")
                continue
            questions.append(question or "what is in the picture?")
            index.append(i)
        if not images:
            return results
        proc = self.processor
        if self.options.task == "caption":
            inputs = proc(images=images, return_tensors="pt")
        else:
            inputs = proc(images=images, text=questions, return_tensors="pt", padding=True)
        dtype = self.model.dtype
        inputs = {k: (v.to(self.device, dtype) if v.is_floating_point() else v.to(self.device)) for k, v in inputs.items()}
        if self.options.chat_first is not None:  # chat prefill first: a hold before the encoder, too
            self.options.chat_first.hold()
        with torch.inference_mode():
            out = self.model.generate(**inputs, max_new_tokens=self.options.max_new_tokens, **self._generate_options)
        texts = proc.batch_decode(out, skip_special_tokens=True)
        special = set(getattr(proc.tokenizer, "all_special_ids", []))
        for row, i in enumerate(index):
            n = sum(1 for t in out[row].tolist() if t not in special)
            results[i] = (texts[row].strip(), n)
        return results

    # ------------------------------------------------------------------ serving (call on the event loop)

    def submit(self, image: bytes, question: str | None) -> asyncio.Future:
        """Queue one image; the future resolves to (text, generated tokens) or raises ``SkillError``."""
        if self.model is None and self.host is None:
            raise SkillError("skill_unavailable", f"the {self.options.task} model is not loaded")
        loop = asyncio.get_running_loop()
        if self._batcher is None or self._batcher.done():
            self._queue = asyncio.Queue()
            self._batcher = loop.create_task(self._run_batches())
        future = loop.create_future()
        self._queue.put_nowait(_Request(image, question, future))  # type: ignore[union-attr]
        return future

    async def _collect(self) -> list[_Request]:
        queue = self._queue
        assert queue is not None
        batch = [await queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.options.batch_wait_ms / 1000
        while len(batch) < self.options.max_batch:
            if not queue.empty():  # arrived while the previous batch ran: no need to wait for them
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break
        return [r for r in batch if not r.future.done()]  # drop the cancelled ones

    async def _run_batches(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = await self._collect()
            if not batch:
                continue
            self.batch_sizes.append(len(batch))
            try:
                results = await loop.run_in_executor(self._executor, self._generate, [(r.image, r.question) for r in batch])
            except asyncio.CancelledError:
                for r in batch:
                    r.future.cancel()
                raise
            except Exception as exc:  # noqa: BLE001 - one boundary per batch: log, fail it, keep serving
                log.exception("%s batch of %d failed", self.options.task, len(batch))
                if self.host is None:  # the model's process frees its own
                    free_cuda_memory()
                results = [SkillError("generation_failed", f"{self.options.task} failed: {type(exc).__name__}: {exc}")] * len(batch)
            for r, res in zip(batch, results):
                if r.future.done():
                    continue
                if isinstance(res, SkillError):
                    r.future.set_exception(res)
                else:
                    r.future.set_result(res)


def holding_steps(hold: Callable[[], float]) -> Any:
    """A ``generate`` stopping criterion that stops nothing: it calls ``hold`` after each step."""
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList

    class Hold(StoppingCriteria):
        def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
            hold()
            return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    return StoppingCriteriaList([Hold()])


def load_vision_model(args: tuple[type[VisionWorker], VisionWorkerOptions]) -> VisionWorker:
    """The model's process builds its model with this (``skills.model_process``)."""
    cls, options = args
    worker = cls(options)
    worker.load_model()
    return worker
