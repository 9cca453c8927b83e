"""The real-model tier: the offline models prepared by the set-up (`assistant models prepare`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from assistant.settings import REPO_ROOT
from skills.offline.prepare import OFFLINE_MODELS, check_folder

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
