"""The speech inference worker: owns the Whisper model (openai-whisper) and one decoding thread.

Utterances from every session go into one queue. The thread takes what has arrived (waiting a few
milliseconds for more when it finds only one and the last batch had company), pads each utterance
of up to 30 s to a 30-second log-mel segment and decodes them together with one
``whisper.decode(model, mel[N, n_mels, 3000])``.
Requests that arrive while a batch runs wait in the queue and form the next batch. On a GPU the
windows go through ``skills.speech_decoder.StaticWhisperDecoder`` instead (the same greedy decoding
with a static cache, each step one CUDA graph), when it matches whisper's own decoder at load. Audio longer
than 30 s goes through ``model.transcribe`` on the float32 array (never a path: that would shell out
to ffmpeg again). With ``in_process=False`` the model lives in a child process
(``skills.model_process``) and this thread sends it each batch; torch and whisper are imported only
where the model is.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from skills.lifecycle import ModelLoadError
from skills.model_process import ModelProcess, free_cuda_memory

log = logging.getLogger(__name__)

SAMPLE_RATE = 16_000
WINDOW_SAMPLES = 30 * SAMPLE_RATE  # whisper's fixed 30-second input window


@dataclass(frozen=True)
class SpeechWorkerOptions:
    model: str  # whisper name (tiny, base, small, ...) or a checkpoint file path
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    language: str | None = None  # None: detect per utterance (multilingual models)
    batch_size: int = 16  # most utterances decoded together
    batch_wait_ms: float = 10.0  # how long a lone utterance waits for company (only while they come together)
    max_tokens: int = 224  # most tokens decoded per 30-second window
    engine: str = "auto"  # static | library | auto (static on a GPU): see skills/speech_decoder.py
    in_process: bool = True  # False: the model runs in a child process (skills/model_process.py)
    # Chat first on a shared GPU (skills/chat_first.py); handed to the model's process when spawned.
    chat_first: Any = field(default=None, compare=False, repr=False)


@dataclass(frozen=True)
class Transcription:
    text: str
    language: str | None
    tokens: int


@dataclass
class _Request:
    samples: np.ndarray
    future: Future


class SpeechWorker:
    def __init__(self, options: SpeechWorkerOptions) -> None:
        self.options = options
        self.model: Any = None
        self.decoder: Any = None  # the static-cache decoder, when it serves the 30-second windows
        self.device = "cpu"
        self.language: str | None = options.language
        self._queue: queue.Queue[_Request | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._together = False  # the last batch had more than one utterance (see _next_batch)
        self.host: ModelProcess | None = None  # the model's process, when not in this one
        # Observability: sizes of the recent batched decodes, and calls per path.
        self.batch_sizes: deque[int] = deque(maxlen=256)
        self.decode_calls = 0
        self.transcribe_calls = 0

    # ------------------------------------------------------------------ loading (blocking; run in a thread)

    def load(self) -> None:
        """Load the model (here, or in its own process) and start the batching thread."""
        if self.options.in_process:
            self.load_model()
        else:
            self.host = ModelProcess("speech-model", load_speech_model, replace(self.options, in_process=True))
            info = self.host.start()
            self.device, self.language = info["device"], info["language"]
        self._thread = threading.Thread(target=self._loop, name="speech-worker", daemon=True)
        self._thread.start()
        log.info("speech model %s loaded on %s%s", self.options.model, self.device, "" if self.host is None else f" in process {self.host.pid}")

    def load_model(self) -> None:
        try:
            import torch
            import whisper
        except ImportError as exc:  # pragma: no cover - the project's install pulls these in
            raise ModelLoadError(f"openai-whisper is not installed ({exc}); run: pip install -e .") from exc
        opts = self.options
        device = opts.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        looks_path = opts.model.startswith((".", "/", "~")) or opts.model.endswith((".pt", ".pth"))
        if looks_path and not Path(opts.model).expanduser().is_file():
            raise ModelLoadError(
                f"speech model file {opts.model!r} does not exist; set ASSISTANT_SPEECH_MODEL to a Whisper "
                f"checkpoint file or to one of: {', '.join(whisper.available_models())}"
            )
        try:
            model = whisper.load_model(str(Path(opts.model).expanduser()) if looks_path else opts.model, device=device)
        except Exception as exc:  # noqa: BLE001 - every loading failure gets the same advice
            raise ModelLoadError(
                f"could not load speech model {opts.model!r}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}. "
                "Set ASSISTANT_SPEECH_MODEL to a Whisper checkpoint file or a name this machine can fetch "
                f"({', '.join(whisper.available_models())})"
            ) from exc
        if device.startswith("cuda"):
            float16_layers(model)
        self.model, self.device = model.eval(), device
        # English-only checkpoints have no language tokens: they cannot detect a language.
        self.language = opts.language or (None if model.is_multilingual else "en")
        if opts.engine == "static" or (opts.engine == "auto" and device.startswith("cuda")):
            self.decoder = self._static_decoder(opts.engine == "static")

    def host_info(self) -> dict[str, Any]:
        """What the worker in the web process needs to know of a model loaded in a child."""
        return {"device": self.device, "language": self.language, "engine": self.engine}

    def _static_decoder(self, required: bool) -> Any:
        """The static-cache decoder, checked against whisper's own on a probe; None (auto) if it differs."""
        import numpy as np
        import torch
        import whisper

        from skills.speech_decoder import StaticWhisperDecoder

        t = np.arange(2 * SAMPLE_RATE, dtype=np.float32) / SAMPLE_RATE
        probe = (0.3 * np.sin(2 * np.pi * (200 + 400 * t) * t)).astype(np.float32)  # a 2-second chirp
        mel = whisper.log_mel_spectrogram(
            whisper.pad_or_trim(torch.from_numpy(probe)), n_mels=self.model.dims.n_mels, device=self.model.device
        )[None]
        try:
            decoder = StaticWhisperDecoder(
                self.model, max_batch=self.options.batch_size, sample_len=self.options.max_tokens,
                language=self.language, cuda_graphs=self.device.startswith("cuda"),
                hold=self.options.chat_first.hold if self.options.chat_first else None,
            )
            why = decoder.check(mel)
            if why is None:
                decoder.warm()
        except Exception as exc:  # noqa: BLE001 - a checkpoint this decoder cannot drive
            log.warning("the static speech decoder failed on this model", exc_info=True)
            why = f"{type(exc).__name__}: {exc}"
        if why:
            if required:
                raise ModelLoadError(f"the static speech decoder does not fit this model ({why}); set ASSISTANT_SPEECH_ENGINE=library")
            log.warning("the static speech decoder does not fit this model (%s); using whisper.decode", why)
            return None
        return decoder

    def close(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout=30)
        if self.host is not None:
            self.host.close()

    @property
    def engine(self) -> str:
        """How 30-second windows are decoded: "static" or "library" ("" before loading)."""
        if self.host is not None:
            return str(self.host.info.get("engine", ""))
        if self.model is None:
            return ""
        return "static" if self.decoder is not None else "library"

    # ------------------------------------------------------------------ serving (any thread)

    def is_running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, samples: np.ndarray) -> Future:
        """Queue 16 kHz mono float32 audio; the future resolves to a ``Transcription``."""
        if not self.is_running():
            raise RuntimeError("the speech worker is not running")
        fut: Future = Future()
        self._queue.put(_Request(np.ascontiguousarray(samples, dtype=np.float32), fut))
        return fut

    # ------------------------------------------------------------------ the decoding thread

    def _next_batch(self, first: _Request) -> tuple[list[_Request], bool]:
        """``first`` and what else is queued. The batch waits up to ``batch_wait_ms`` for company only
        while utterances come together (the last batch had more than one): a lone speaker's utterance
        starts at once, and under concurrent load what arrives during a decode forms the next batch."""
        batch, stop = [first], False
        deadline = time.monotonic() + (self.options.batch_wait_ms / 1000 if self._together else 0.0)
        while len(batch) < self.options.batch_size:
            try:
                # Take what is queued already; wait a little only while the batch is still small.
                item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            if item is None:
                stop = True
                break
            batch.append(item)
        self._together = len(batch) > 1
        return batch, stop

    def _loop(self) -> None:
        stop = False
        while not stop:
            first = self._queue.get()
            if first is None:
                break
            batch, stop = self._next_batch(first)
            live = [r for r in batch if r.future.set_running_or_notify_cancel()]
            short = [r for r in live if r.samples.size <= WINDOW_SAMPLES]
            long = [r for r in live if r.samples.size > WINDOW_SAMPLES]
            if short:
                self._guarded(short, self._decode_batch)
            for r in long:
                self._guarded([r], self._transcribe_long)
        # Fail whatever is still queued so no caller waits forever.
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None and item.future.set_running_or_notify_cancel():
                item.future.set_exception(RuntimeError("the speech worker stopped"))

    def _guarded(self, reqs: list[_Request], step: Any) -> None:
        """One boundary per batch: log, free GPU memory, fail these requests, keep serving."""
        try:
            results = step(reqs)
        except Exception as exc:  # noqa: BLE001
            log.exception("speech decoding failed for %d request(s)", len(reqs))
            if self.host is None:  # the model's process frees its own
                free_cuda_memory()
            for r in reqs:
                r.future.set_exception(exc)
            return
        for r, res in zip(reqs, results, strict=True):
            r.future.set_result(res)

    def _model(self, method: str, *args: Any) -> Any:
        """Run one of the model's methods below, here or in the model's process."""
        return getattr(self, method)(*args) if self.host is None else self.host.call(method, *args)

    def _decode_batch(self, reqs: list[_Request]) -> list[Transcription]:
        self.decode_calls += 1
        self.batch_sizes.append(len(reqs))
        return self._model("decode_windows", [r.samples for r in reqs])

    def _transcribe_long(self, reqs: list[_Request]) -> list[Transcription]:
        (req,) = reqs
        self.transcribe_calls += 1
        return [self._model("transcribe_audio", req.samples)]

    # ------------------------------------------------------------------ the model (here or in its process)

    def decode_windows(self, samples: list[np.ndarray]) -> list[Transcription]:
        """Decode utterances of up to 30 s together, each padded to one 30-second window."""
        import torch
        import whisper

        model = self.model
        # Each utterance goes to the device as it is and is padded to 30 s there: the same zeros, without
        # copying them (1.9 MB a window) from the host.
        mels = torch.stack(
            [
                whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(x).to(model.device)), n_mels=model.dims.n_mels)
                for x in samples
            ]
        )
        if self.decoder is not None:
            decode = self.decoder.tokenizer.decode
            return [Transcription(decode(r.tokens).strip(), r.language, len(r.tokens)) for r in self.decoder.decode(mels)]
        options = whisper.DecodingOptions(
            language=self.language,
            without_timestamps=True,
            sample_len=self.options.max_tokens,
            fp16=self.device.startswith("cuda"),
        )
        with torch.inference_mode():
            results = whisper.decode(model, mels, options)
        return [Transcription(res.text.strip(), res.language, len(res.tokens)) for res in results]

    def transcribe_audio(self, samples: np.ndarray) -> Transcription:
        """Audio longer than 30 s: whisper's own sliding-window ``transcribe``."""
        import torch

        with torch.inference_mode():
            out = self.model.transcribe(
                samples,
                language=self.language,
                fp16=self.device.startswith("cuda"),
                verbose=None,
                sample_len=self.options.max_tokens,
            )
        tokens = sum(len(seg.get("tokens", ())) for seg in out.get("segments", ()))
        return Transcription(str(out.get("text", "")).strip(), out.get("language"), tokens)


def float16_layers(model: Any) -> None:
    """Store the weights of whisper's ``Linear`` and ``Conv1d`` layers in float16, the dtype they
    compute in on a GPU. As loaded they are float32, and each of those layers casts its weight and
    bias to the input's dtype at every call: a copy kernel and a read of the weights per layer per
    decode step. The cast gives the same float16 values whenever it is done, so results do not
    change. Layer norms keep float32: whisper's ``LayerNorm`` computes in float32."""
    import whisper.model

    for module in model.modules():
        if isinstance(module, (whisper.model.Linear, whisper.model.Conv1d)):
            module.half()


def load_speech_model(options: SpeechWorkerOptions) -> SpeechWorker:
    """The model's process builds its model with this (``skills.model_process``)."""
    worker = SpeechWorker(options)
    worker.load_model()
    return worker
