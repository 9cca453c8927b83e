"""Builds the vision skills (captioning, VQA) from settings; an empty model name leaves a skill out."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from skills.base import Skill

if TYPE_CHECKING:
    from assistant.settings import Settings
    from skills.chat_first import ChatFirst


def build_vision_skills(settings: Settings, chat_first: ChatFirst | None = None) -> dict[str, Skill]:
    from skills.caption import CaptionSkill
    from skills.registry import in_child_process
    from skills.offline.vision_engine import OFFLINE_FOLDER, OfflineVisionWorker, is_offline_vision_folder
    from skills.vision_worker import VisionWorkerOptions
    from skills.vqa import VqaSkill

    out: dict[str, Skill] = {}
    for cls, model, task, setting in (
        (CaptionSkill, settings.caption_model, "caption", "ASSISTANT_CAPTION_MODEL"),
        (VqaSkill, settings.vqa_model, "vqa", "ASSISTANT_VQA_MODEL"),
    ):
        if not model:
            continue
        options = VisionWorkerOptions(
            model=model,
            task=task,  # type: ignore[arg-type]
            setting=setting,
            device=settings.vision_device,
            dtype=settings.vision_dtype,
            max_new_tokens=settings.vision_max_new_tokens,
            max_batch=settings.vision_batch_size,
            batch_wait_ms=settings.vision_batch_wait_ms,
            local_files_only=settings.hub_offline,
            in_process=not in_child_process(settings.media_worker, settings.vision_device),
            chat_first=chat_first,
        )
        skill = cls(options, enabled=settings.load_models)
        if is_offline_vision_folder(model) or Path(model).name == OFFLINE_FOLDER:  # classifier + OCR + colours
            skill.worker = OfflineVisionWorker(options)
        out[cls.name] = skill
    return out
