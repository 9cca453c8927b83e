"""Real-time factor of the speech path: our batched worker against openai-whisper's own
``model.transcribe`` on the same model and the same audio, one stream and N concurrent streams.

RTF = processing wall time / seconds of audio (lower is better; < 1 is faster than real time).
openai-whisper has no cross-request batching, so its N streams run one after another on the model;
ours are decoded together in batches by ``skills.speech_worker.SpeechWorker``.

The model has random weights with real Whisper dimensions (speed does not depend on weight values);
both paths decode greedily, without timestamps, with the same token budget per 30-second window.
``transcribe`` runs on the checkpoint as ``whisper.load_model`` gives it: float32 weights that each
layer casts to float16 at every call on a GPU. Our worker stores those layers in float16
(``float16_layers``); on a GPU the result also times ``transcribe`` on the worker's model, so the
part of the gap that is the weights' dtype shows apart from the batching and the decoder.

    .venv/bin/python bench/speech_rtf.py --dims tiny --streams 16
"""

from __future__ import annotations

import argparse
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.report import emit  # noqa: E402

from skills.speech_worker import SpeechWorker, SpeechWorkerOptions  # noqa: E402

DIMS = {  # openai-whisper's published model dimensions
    "tiny": dict(n_audio_state=384, n_audio_head=6, n_audio_layer=4, n_text_state=384, n_text_head=6, n_text_layer=4),
    "base": dict(n_audio_state=512, n_audio_head=8, n_audio_layer=6, n_text_state=512, n_text_head=8, n_text_layer=6),
    "small": dict(n_audio_state=768, n_audio_head=12, n_audio_layer=12, n_text_state=768, n_text_head=12, n_text_layer=12),
}
SENTENCES = [
    "Can you describe the picture I just uploaded?",
    "What is the weather going to be like tomorrow afternoon?",
    "Please send the report to the whole team by Friday.",
    "How many kilometres is it from Paris to Berlin by train?",
    "Remind me what we talked about in the meeting this morning.",
    "Translate good morning into Spanish and Italian please.",
    "What is in this photo and who might have taken it?",
    "Summarise the last three messages in one short sentence.",
]


def random_whisper(dims, seed: int = 0):  # noqa: ANN001, ANN201 - whisper's ModelDimensions and Whisper
    """``whisper.model.Whisper(dims)`` with every parameter drawn from ``seed``. The library makes the
    text decoder's positional embedding with ``torch.empty`` and leaves loading to fill it, so a fresh
    model holds whatever that memory held: NaN or float16-overflowing values on some runs, zeros on
    others (the GPU run's Whisper-base once gave no finite logit in float16)."""
    import torch
    import whisper.model

    torch.manual_seed(seed)
    model = whisper.model.Whisper(dims)
    with torch.no_grad():
        model.decoder.positional_embedding.normal_(0.0, 0.01)
    return model


def build_model(folder: Path, dims_name: str) -> Path:
    import torch
    import whisper.model

    dims = whisper.model.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_vocab=51865, n_text_ctx=448, **DIMS[dims_name])
    model = random_whisper(dims)
    with torch.no_grad():
        # Zero embeddings for the special tokens (end of text and up): their logits are 0 while the
        # best ordinary token's is positive, so both paths decode exactly the token budget as text.
        model.decoder.token_embedding.weight[50257:] = 0
    path = folder / f"random-{dims_name}.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


def make_audio(folder: Path, n: int) -> list[np.ndarray]:
    """Spoken sentences (espeak-ng + ffmpeg), or tone bursts when espeak-ng is missing."""
    from assistant.audio import decode_file

    clips = []
    for i in range(n):
        text = SENTENCES[i % len(SENTENCES)]
        if shutil.which("espeak-ng") and shutil.which("ffmpeg"):
            wav = folder / f"s{i}.wav"
            subprocess.run(["espeak-ng", "-s", str(150 + 5 * (i % 5)), "-w", str(wav), text], check=True, timeout=60)
            clips.append(decode_file(wav.read_bytes()))
        else:
            t = np.arange(int(16000 * (2.5 + 0.1 * i))) / 16000
            clips.append((0.3 * np.sin(2 * np.pi * (200 + 20 * i) * t)).astype(np.float32))
    return clips


def baseline(
    model, clips: list[np.ndarray], max_tokens: int, fp16: bool, language: str | None  # noqa: ANN001
) -> tuple[float, int]:
    tokens = 0
    start = time.perf_counter()
    for audio in clips:
        out = model.transcribe(
            audio, language=language, temperature=0.0, without_timestamps=True, condition_on_previous_text=False,
            sample_len=max_tokens, fp16=fp16, verbose=None,
            # Keep every decoded segment (random weights fail whisper's quality gates).
            no_speech_threshold=None, logprob_threshold=None, compression_ratio_threshold=None,
        )  # fmt: skip
        tokens += sum(len(s["tokens"]) for s in out["segments"])
    return time.perf_counter() - start, tokens


def ours(worker: SpeechWorker, clips: list[np.ndarray], concurrent: bool) -> tuple[float, int]:
    start = time.perf_counter()
    if concurrent:
        results = [f.result() for f in [worker.submit(a) for a in clips]]
    else:
        results = [worker.submit(a).result() for a in clips]
    return time.perf_counter() - start, sum(r.tokens for r in results)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dims", choices=sorted(DIMS), default="tiny")
    ap.add_argument("--streams", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=32, help="token budget per 30-second window, both paths")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--language", default="en", help="spoken language, both paths ('' = detect it per window)")
    ap.add_argument("--batch-size", type=int, default=0, help="most utterances per decode (0 = --streams)")
    ap.add_argument("--repeats", type=int, default=2, help="best of N timings")
    ap.add_argument("--engine", choices=["auto", "static", "library"], default="auto", help="how our worker decodes windows")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "speech_rtf.json")
    args = ap.parse_args()

    import torch
    import whisper

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    fp16 = device.startswith("cuda")
    language = args.language or None
    with tempfile.TemporaryDirectory() as tmp:
        path = build_model(Path(tmp), args.dims)
        clips = make_audio(Path(tmp), args.streams)
        worker = SpeechWorker(
            SpeechWorkerOptions(model=str(path), device=device, language=language, batch_size=args.batch_size or args.streams,
                                batch_wait_ms=5, max_tokens=args.max_tokens, engine=args.engine)
        )  # fmt: skip
        worker.load()
        model = whisper.load_model(str(path), device=device)  # the same checkpoint, as openai-whisper loads it
        audio_one, audio_all = clips[0].size / 16000, sum(c.size for c in clips) / 16000
        baseline(model, clips[:1], args.max_tokens, fp16, language)  # warm-up
        ours(worker, clips[:2], True)

        def best(fn) -> tuple[float, int]:  # noqa: ANN001
            runs = [fn() for _ in range(args.repeats)]
            return min(runs, key=lambda r: r[0])

        b1, b1_tok = best(lambda: baseline(model, clips[:1], args.max_tokens, fp16, language))
        o1, o1_tok = best(lambda: ours(worker, clips[:1], False))
        bn, bn_tok = best(lambda: baseline(model, clips, args.max_tokens, fp16, language))
        layers16 = {}
        if fp16:  # transcribe on the worker's float16 layers
            baseline(worker.model, clips[:1], args.max_tokens, fp16, language)
            h1, _ = best(lambda: baseline(worker.model, clips[:1], args.max_tokens, fp16, language))
            hn, _ = best(lambda: baseline(worker.model, clips, args.max_tokens, fp16, language))
            layers16 = {"single": round(h1, 4), "all_streams": round(hn, 4)}
        worker.batch_sizes.clear()
        on, on_tok = best(lambda: ours(worker, clips, True))
        batches = list(worker.batch_sizes)
        worker.close()

    result = {
        "benchmark": "speech_rtf",
        "model_dims": args.dims,
        "weights": "random (speed does not depend on weight values)",
        "device": device if not fp16 else f"{device} ({torch.cuda.get_device_name()})",
        "cpu_threads": torch.get_num_threads(),
        "machine": platform.platform(),
        "max_tokens_per_window": args.max_tokens,
        "language": language or "detected per window",
        "engine": "static" if worker.decoder is not None else "library",
        "streams": args.streams,
        "audio_seconds": {"single": round(audio_one, 3), "all_streams": round(audio_all, 3)},
        "single_stream": {
            "openai_whisper_transcribe": {"seconds": round(b1, 4), "rtf": round(b1 / audio_one, 4), "tokens": b1_tok},
            "ours_batched_worker": {"seconds": round(o1, 4), "rtf": round(o1 / audio_one, 4), "tokens": o1_tok},
            "speedup": round(b1 / o1, 2),
        },
        "concurrent_streams": {
            "openai_whisper_transcribe_sequential": {"seconds": round(bn, 4), "rtf": round(bn / audio_all, 4), "tokens": bn_tok},
            "ours_batched_worker": {"seconds": round(on, 4), "rtf": round(on / audio_all, 4), "tokens": on_tok,
                                    "batch_sizes": batches},
            "speedup": round(bn / on, 2),
        },
    }  # fmt: skip
    if layers16:
        result["openai_whisper_transcribe_on_float16_layers"] = {
            "seconds": layers16,
            "speedup_single": round(layers16["single"] / o1, 2),
            "speedup_all_streams": round(layers16["all_streams"] / on, 2),
        }
    emit(result, args.out)


if __name__ == "__main__":
    main()
