"""The static-cache Whisper decoder (skills/speech_decoder.py) transcribes exactly what
``whisper.decode`` does, alone and in batches, with the language given or detected; its load-time
check catches a decoder that attends where it should not; and the worker picks it as configured."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from skills.lifecycle import ModelLoadError
from skills.speech_worker import SpeechWorker, SpeechWorkerOptions, float16_layers
from tests.speech_fixtures import build_tiny_whisper, speak

SENTENCES = ["what is in this photo", "turn the lights off in the kitchen", "seven plus five is twelve"]
SAMPLE_LEN = 30


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> list[np.ndarray]:
    import whisper

    folder = tmp_path_factory.mktemp("sentences")
    out = []
    for i, text in enumerate(SENTENCES):
        (folder / str(i)).mkdir()
        out.append(whisper.load_audio(str(speak(folder / str(i), text))))
    return out


def mels(model, clips: list[np.ndarray]):  # noqa: ANN001, ANN201
    import torch
    import whisper

    return torch.stack(
        [whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(c)), n_mels=model.dims.n_mels) for c in clips]
    )


def load(path: Path):  # noqa: ANN201
    import whisper

    return whisper.load_model(str(path), device="cpu")


@pytest.mark.parametrize("multilingual", [False, True], ids=["english-only", "multilingual-detect"])
def test_static_decoder_matches_whisper_decode(tmp_path: Path, clips: list[np.ndarray], multilingual: bool) -> None:
    import whisper

    from skills.speech_decoder import StaticWhisperDecoder

    model = load(build_tiny_whisper(tmp_path / "w.pt", multilingual=multilingual, weight_std=0.25, seed=3))
    language = None if multilingual else "en"
    batch = mels(model, clips)
    options = whisper.DecodingOptions(language=language, without_timestamps=True, sample_len=SAMPLE_LEN, fp16=False)
    want = whisper.decode(model, batch, options)
    assert len({tuple(r.tokens) for r in want}) == len(clips), "the test model says the same for every clip"
    decoder = StaticWhisperDecoder(model, max_batch=4, sample_len=SAMPLE_LEN, language=language, cuda_graphs=False)
    assert decoder.check(batch[:1]) is None
    together = decoder.decode(batch)  # 3 clips in the batch bucket of 4
    alone = [decoder.decode(batch[i : i + 1])[0] for i in range(len(clips))]
    for ours, ref in zip(together, want):
        assert ours.tokens == ref.tokens and ours.language == ref.language
        assert decoder.tokenizer.decode(ours.tokens).strip() == ref.text
    assert [r.tokens for r in alone] == [r.tokens for r in want]
    if multilingual:
        assert all(r.language in whisper.tokenizer.LANGUAGES for r in together)


def test_the_load_check_catches_a_decoder_that_reads_future_columns(tmp_path: Path, clips: list[np.ndarray]) -> None:
    from skills.speech_decoder import StaticWhisperDecoder

    model = load(build_tiny_whisper(tmp_path / "w.pt", weight_std=0.25, seed=3))
    decoder = StaticWhisperDecoder(model, max_batch=2, sample_len=SAMPLE_LEN, language="en", cuda_graphs=False)
    decoder.decode(mels(model, clips[1:2]))  # leaves another utterance's keys in the cache
    decoder._columns -= 3  # the mask now opens three columns past the current position
    why = decoder.check(mels(model, clips[:1]))
    assert why is not None and "differ" in why


def test_the_load_check_refuses_a_model_with_no_finite_logits(tmp_path: Path, clips: list[np.ndarray]) -> None:
    """A checkpoint whose own decoder overflows on the probe (seen in float16 on a GPU) leaves nothing
    to compare: the check says so, so the worker falls back to ``whisper.decode`` with that reason."""
    import torch

    from skills.speech_decoder import StaticWhisperDecoder

    model = load(build_tiny_whisper(tmp_path / "w.pt", weight_std=0.25, seed=3))
    with torch.no_grad():
        model.decoder.ln.weight.fill_(float("inf"))
    decoder = StaticWhisperDecoder(model, max_batch=2, sample_len=SAMPLE_LEN, language="en", cuda_graphs=False)
    why = decoder.check(mels(model, clips[:1]))
    assert why is not None and why.startswith("no finite logits to compare")


def test_the_worker_decodes_through_the_static_decoder_when_told(tmp_path: Path, clips: list[np.ndarray]) -> None:
    import whisper

    path = build_tiny_whisper(tmp_path / "w.pt", weight_std=0.25, seed=3)
    options = dict(model=str(path), device="cpu", language="en", max_tokens=SAMPLE_LEN, batch_wait_ms=50)
    library = SpeechWorker(SpeechWorkerOptions(**options))  # auto: whisper.decode on the CPU
    static = SpeechWorker(SpeechWorkerOptions(**options, engine="static"))
    texts = {}
    for name, worker in (("library", library), ("static", static)):
        worker.load()
        try:
            futures = [worker.submit(c) for c in clips]
            texts[name] = [f.result(timeout=60).text for f in futures]
            assert max(worker.batch_sizes) > 1, "the utterances were not decoded together"
        finally:
            worker.close()
    assert library.decoder is None and static.decoder is not None
    assert texts["static"] == texts["library"]
    model = whisper.load_model(str(path), device="cpu")
    want = whisper.decode(model, mels(model, clips), whisper.DecodingOptions(language="en", without_timestamps=True, sample_len=SAMPLE_LEN, fp16=False))
    assert texts["static"] == [r.text for r in want]


def test_a_static_decoder_that_does_not_fit_is_a_load_error(tmp_path: Path) -> None:
    """Asked for explicitly, a static decoder that cannot be built (no batch bucket here) stops the load."""
    path = build_tiny_whisper(tmp_path / "w.pt", weight_std=0.25, seed=3)
    worker = SpeechWorker(SpeechWorkerOptions(model=str(path), device="cpu", engine="static", batch_size=0))
    with pytest.raises(ModelLoadError, match="ASSISTANT_SPEECH_ENGINE=library"):
        worker.load()


@pytest.mark.parametrize("multilingual", [False, True], ids=["english-only", "multilingual-detect"])
@pytest.mark.parametrize(
    "device",
    [
        "cpu",  # graphs emulated: the same capture and replay order, each replay running the step again
        pytest.param("cuda", marks=pytest.mark.skipif(
            not __import__("torch").cuda.is_available(), reason="CUDA graphs need a GPU (bench/gpu.sh runs this)"
        )),  # fmt: skip
    ],
)
def test_speech_steps_replayed_from_cuda_graphs_match_eager_steps(tmp_path: Path, device: str, multilingual: bool) -> None:
    """Replayed or eager, a window is one encoder pass, one pass over the whole prompt (after one for
    the language when it is detected), then one step per further token. On a GPU, replayed, nothing
    but reading the sampled tokens makes the host wait for the device (the prompt, the detected
    language included, is put together there)."""
    import torch
    import whisper

    from skills.speech_decoder import StaticWhisperDecoder

    path = build_tiny_whisper(tmp_path / "w.pt", weight_std=0.25, seed=3, multilingual=multilingual)
    model = whisper.load_model(str(path), device=device)
    t = np.arange(32000, dtype=np.float32) / 16000  # chirps: the GPU machine has no espeak-ng
    clips = [(0.3 * np.sin(2 * np.pi * (f + 300 * t) * t)).astype(np.float32) for f in (150, 300, 600)]
    batch = mels(model, clips).to(device)
    language = None if multilingual else "en"
    decoder = StaticWhisperDecoder(model, max_batch=4, sample_len=SAMPLE_LEN, language=language, cuda_graphs=True)
    decoder.graphs.on = True  # on the CPU, which has no graphs of its own
    assert decoder.check(batch[:1]) is None and decoder.graphs.on
    runs: list[str] = []
    run = decoder.graphs.run
    decoder.graphs.run = lambda key, fn: runs.append(key[0]) or run(key, fn)  # type: ignore[method-assign]
    replayed = decoder.decode(batch)
    passes = ["encode", "language", "prompt"] if multilingual else ["encode", "prompt"]
    longest = max(len(r.tokens) for r in replayed)
    # one step per token after the first, and the one queued before the last token was read
    assert runs == passes + ["step"] * min(longest + 1, SAMPLE_LEN - 1), "not one pass for the prompt and one per token"
    assert {key[0] for key in decoder.graphs.keys()} == set(passes + ["step"]), "no step was replayed from a graph"
    if device == "cuda":  # captured now: replaying, the host waits for the GPU only where it reads sampled tokens
        torch.cuda.set_sync_debug_mode("error")  # (an event each, which this mode does not flag)
        try:
            again = decoder.decode(batch)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        assert [r.tokens for r in again] == [r.tokens for r in replayed]
    decoder.graphs.on = False
    assert [r.tokens for r in replayed] == [r.tokens for r in decoder.decode(batch)]
    if device == "cpu":  # in float32 (float16 on a GPU may flip a near tie against whisper's float32)
        want = whisper.decode(model, batch, whisper.DecodingOptions(language=language, without_timestamps=True,
                                                                     sample_len=SAMPLE_LEN, fp16=False))  # fmt: skip
        assert [(r.tokens, r.language) for r in replayed] == [(r.tokens, r.language) for r in want]


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="float16 on a GPU (bench/gpu.sh runs this)")
@pytest.mark.parametrize("max_tokens", [32, 224], ids=["speech-bench", "server-default"])
def test_the_bench_whisper_base_passes_the_load_check_in_cuda_float16(tmp_path: Path, max_tokens: int) -> None:
    """The GPU benchmark's random Whisper-base model gets the static decoder with the benchmark's
    token budget and the server's default one (the mixed-load server once fell back to whisper.decode)."""
    from bench.speech_rtf import build_model

    worker = SpeechWorker(SpeechWorkerOptions(model=str(build_model(tmp_path, "base")), device="cuda", language="en",
                                              max_tokens=max_tokens, engine="static"))  # fmt: skip
    worker.load()  # a ModelLoadError says why the check refused it
    try:
        assert worker.decoder is not None
    finally:
        worker.close()


def test_float16_layers_change_no_result_and_copy_no_weight_per_call(tmp_path: Path, clips: list[np.ndarray]) -> None:
    """On a GPU the worker stores whisper's Linear and Conv1d weights in float16 (``float16_layers``).
    Computing in float16, whisper.decode then gives the tokens it gives on the float32 weights as
    loaded, the decoder the same logits, and a decoder forward no longer copies each layer's weights
    (float16 on the CPU here: the same operations)."""
    import torch
    import whisper
    from torch.profiler import ProfilerActivity, profile

    path = build_tiny_whisper(tmp_path / "w.pt", weight_std=0.25, seed=3)
    loaded, halved = load(path), load(path)
    float16_layers(halved)
    batch = mels(loaded, clips).half()
    options = whisper.DecodingOptions(language="en", without_timestamps=True, sample_len=SAMPLE_LEN, fp16=True)
    with torch.inference_mode():
        want = whisper.decode(loaded, batch, options)
        assert all(r.tokens for r in want)
        assert [r.tokens for r in whisper.decode(halved, batch, options)] == [r.tokens for r in want]
        audio = loaded.encoder(batch[:1])
        assert torch.equal(halved.encoder(batch[:1]), audio)
        tokens = torch.tensor([[*want[0].tokens[:8]]])

        def copies(model) -> tuple[torch.Tensor, int]:  # noqa: ANN001
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                logits = model.decoder(tokens, audio)
            return logits, sum(e.name == "aten::_to_copy" for e in prof.events())

        (want_logits, before), (logits, after) = copies(loaded), copies(halved)
    assert torch.equal(logits, want_logits)
    layers = [m for m in loaded.decoder.modules() if isinstance(m, whisper.model.Linear)]
    assert before - after == sum(1 + (m.bias is not None) for m in layers), "one weight and bias copy per layer call"
    assert all(m.weight.dtype == torch.float16 for m in halved.modules() if isinstance(m, (whisper.model.Linear, whisper.model.Conv1d)))
    assert all(m.weight.dtype == torch.float32 for m in halved.modules() if isinstance(m, whisper.model.LayerNorm))


def test_the_random_test_and_bench_whispers_have_no_uninitialised_weights(tmp_path: Path) -> None:
    """openai-whisper makes the text decoder's positional embedding with torch.empty: a random model
    saved as it comes holds whatever that memory held (once no finite float16 logit on the GPU run).
    The fixtures draw it from their seed, so two builds with one seed load as the same model."""
    import torch
    import whisper

    from bench.speech_rtf import build_model

    first = whisper.load_model(str(build_tiny_whisper(tmp_path / "a.pt", seed=5)), device="cpu")
    again = whisper.load_model(str(build_tiny_whisper(tmp_path / "b.pt", seed=5)), device="cpu")
    bench = torch.load(build_model(tmp_path, "tiny"), map_location="cpu")["model_state_dict"]
    for state in (first.state_dict(), bench):
        assert all(bool(torch.isfinite(t).all()) for t in state.values())
        assert 0.005 < float(state["decoder.positional_embedding"].std()) < 0.02
    assert all(torch.equal(t, again.state_dict()[k]) for k, t in first.state_dict().items())
