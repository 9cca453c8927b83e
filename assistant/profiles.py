"""Model profiles: which model each skill loads, standard (by name) or offline (prepared from PyPI).

``resolve_models(settings)`` runs when the app is built, never at import time. With profile ``auto``
a skill whose model is given by hub name keeps it when the model is already cached or the hub can
be reached; otherwise it switches to the prepared offline model, when there is one.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from assistant.settings import Settings

HUB_HOST = "huggingface.co"
WHISPER_HOST = "openaipublic.azureedge.net"

# Offline folders written by `assistant models prepare --profile offline` (skills/offline/prepare.py).
OFFLINE_FOLDERS = {
    "chat": ("chat-smollm2-135m-instruct", ""),
    "speech": ("speech-whisper-tiny-en", "model.pt"),
    # caption and vqa both run the offline vision engine (skills/offline/vision_engine.py) from this folder
    "vision": ("vision-efficientnet-lite0", ""),
}
PREPARE_HINT = "run `assistant models prepare --profile offline`"

Source = Literal["standard", "offline", "local"]


@dataclass(frozen=True)
class SkillModel:
    skill: str
    source: Source
    model: str
    note: str = ""


@dataclass
class ModelPlan:
    profile: str  # what the user asked for
    skills: dict[str, SkillModel] = field(default_factory=dict)

    @property
    def effective(self) -> str:
        sources = {m.source for m in self.skills.values()}
        return sources.pop() if len(sources) == 1 else "mixed"


def models_dir(settings: Settings) -> Path:
    return settings.models_dir or settings.data_dir / "models"


def offline_path(settings: Settings, skill: str) -> Path:
    folder, file = OFFLINE_FOLDERS[skill]
    base = models_dir(settings) / folder
    return base / file if file else base


def offline_ready(settings: Settings, skill: str) -> bool:
    folder = models_dir(settings) / OFFLINE_FOLDERS[skill][0]
    return (folder / "manifest.json").is_file()


def looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or Path(name).expanduser().exists()


def reachable(host: str, timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") in ("1", "true", "True"):
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


class _Probe:
    """Asks each host at most once per resolution."""

    def __init__(self) -> None:
        self.results: dict[str, bool] = {}

    def __call__(self, host: str) -> bool:
        if host not in self.results:
            self.results[host] = reachable(host)
        return self.results[host]


def hub_cached(repo_id: str) -> bool:
    if looks_local(repo_id):
        return False
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id, or no cache: not cached
        return False


def whisper_cached(name: str) -> bool:
    root = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "whisper"
    return (root / f"{name}.pt").is_file()


def _choose(settings: Settings, skill: str, configured: str, cached: bool, host: str, probe: _Probe) -> SkillModel:
    if looks_local(configured):
        return SkillModel(skill, "local", configured, "a local path from settings")
    if settings.model_profile == "offline":
        note = "" if offline_ready(settings, skill) else f"not prepared yet: {PREPARE_HINT}"
        return SkillModel(skill, "offline", str(offline_path(settings, skill)), note)
    if settings.model_profile == "standard" or cached:
        return SkillModel(skill, "standard", configured, "cached" if cached else "")
    if probe(host):
        return SkillModel(skill, "standard", configured, "model hub reachable")
    if offline_ready(settings, skill):
        return SkillModel(skill, "offline", str(offline_path(settings, skill)), "no model hub reachable")
    return SkillModel(skill, "standard", configured, f"no model hub reachable and no offline model: {PREPARE_HINT}")


def resolve_models(settings: Settings) -> tuple[Settings, ModelPlan]:
    """Settings with each skill's model resolved for the profile, and the plan that says why."""
    plan = ModelPlan(profile=settings.model_profile)
    probe = _Probe()
    chat = _choose(settings, "chat", settings.chat_model, hub_cached(settings.chat_model), HUB_HOST, probe)
    plan.skills["chat"] = chat
    updates: dict[str, object] = {"chat_model": chat.model}
    speech_name = getattr(settings, "speech_model", None)
    if speech_name:
        speech = _choose(settings, "speech", speech_name, whisper_cached(speech_name), WHISPER_HOST, probe)
        plan.skills["speech"] = speech
        updates["speech_model"] = speech.model
    for skill, key in (("caption", "caption_model"), ("vqa", "vqa_model")):
        name = getattr(settings, key, None)
        if name:  # empty: the skill is turned off
            choice = _choose(settings, "vision", name, hub_cached(name), HUB_HOST, probe)
            plan.skills[skill] = SkillModel(skill, choice.source, choice.model, choice.note)
            updates[key] = choice.model
    if probe.results.get(HUB_HOST) is False:
        updates["hub_offline"] = True  # loading by name would only retry an unreachable hub
    return settings.model_copy(update=updates), plan
