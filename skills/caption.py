"""Image captioning: describes the turn's image (BLIP by default, ASSISTANT_CAPTION_MODEL)."""

from __future__ import annotations

from skills.base import SkillRequest
from skills.vision_skill import VisionSkill


class CaptionSkill(VisionSkill):
    name = "caption"

    def question(self, request: SkillRequest) -> str | None:
        return None  # unconditional captioning: the text of the turn does not steer it
