"""Visual question answering: answers the turn's question about its image (BLIP by default,
ASSISTANT_VQA_MODEL)."""

from __future__ import annotations

from skills.base import SkillRequest
from skills.vision_skill import VisionSkill

DEFAULT_QUESTION = "what is in the picture?"


class VqaSkill(VisionSkill):
    name = "vqa"

    def question(self, request: SkillRequest) -> str | None:
        return request.text.strip() or DEFAULT_QUESTION
