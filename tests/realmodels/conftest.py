"""The real-model tier: the offline models prepared by the set-up (`assistant models prepare`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from assistant.settings import REPO_ROOT
from skills.offline.prepare import OFFLINE_MODELS, check_folder
from tests.conftest import LiveServer, make_settings, start_server

MODELS_DIR = Path(os.environ.get("ASSISTANT_MODELS_DIR", REPO_ROOT / "data" / "models"))


@pytest.fixture(scope="session")
def offline_models() -> Path:
    """The prepared models folder. CI prepares it in the README's set-up, so there it must exist."""
    problems = {s: check_folder(MODELS_DIR / m.folder) for s, m in OFFLINE_MODELS.items()}
    problems = {s: p for s, p in problems.items() if p}
    if problems:
        message = f"offline models not ready in {MODELS_DIR}: {problems}; run `assistant models prepare`"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return MODELS_DIR


@pytest.fixture(scope="session")
def real_server(tmp_path_factory: pytest.TempPathFactory, offline_models: Path) -> Iterator[LiveServer]:
    """One server with every skill on the offline profile. The settings name the standard models
    (hub names); the profile replaces each with its prepared offline model, as on a machine with no hub."""
    settings = make_settings(
        tmp_path_factory.mktemp("real"),
        Path("unused"),
        chat_model="HuggingFaceTB/SmolLM2-135M-Instruct",
        speech_model="base",
        caption_model="Salesforce/blip-image-captioning-base",
        vqa_model="Salesforce/blip-vqa-base",
        model_profile="offline",
        models_dir=offline_models,
        vision_device="cpu",
        chat_max_new_tokens=48,
        chat_kv_blocks=None,
        chat_kv_page_size=64,
        chat_max_batch_tokens=None,
    )
    live = start_server(settings)
    yield live
    live.stop()
