"""The explicit skill registry: which skills exist and how each is built from settings."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from skills.base import Skill

if TYPE_CHECKING:
    from assistant.settings import Settings
    from skills.chat_first import ChatFirst


def in_child_process(choice: str, device: str) -> bool:
    """Whether a model runs in a child process: ``auto`` puts it there where it would use an NVIDIA
    GPU (its launch-bound Python would otherwise compete with the event loop for the GIL)."""
    if choice != "auto":
        return choice == "process"
    return on_nvidia_gpu(device)


def on_nvidia_gpu(device: str) -> bool:
    """Whether a model with this device setting runs on an NVIDIA GPU (``auto``: where one is present)."""
    if device.startswith("cuda"):
        return True
    return device == "auto" and Path("/dev/nvidiactl").exists()


def chat_first(settings: Settings) -> ChatFirst | None:
    """The flag that puts chat prefill ahead of speech and vision steps, where it is on."""
    from skills.chat_first import ChatFirst

    on = settings.chat_first == "on" or (settings.chat_first == "auto" and on_nvidia_gpu(settings.chat_device))
    return ChatFirst() if on and settings.load_models else None


def build_skills(settings: Settings) -> dict[str, Skill]:
    """Every skill the server offers, by name. Models are not loaded here (see ``Skill.start``)."""
    from skills.chat import ChatSkill
    from skills.chat_worker import ChatWorkerOptions

    first = chat_first(settings)
    chat = ChatSkill(
        ChatWorkerOptions(
            model=settings.chat_model,
            device=settings.chat_device,
            dtype=settings.chat_dtype,
            max_new_tokens=settings.chat_max_new_tokens,
            temperature=settings.chat_temperature,
            top_p=settings.chat_top_p,
            kv_blocks=settings.chat_kv_blocks,
            kv_page_size=settings.chat_kv_page_size,
            max_batch_tokens=settings.chat_max_batch_tokens,
            cuda_graphs=settings.chat_cuda_graphs,
            compile_level=settings.chat_compile_level,
            local_files_only=settings.hub_offline,
            engine=settings.chat_engine,
            slots=settings.chat_slots,
            context_tokens=settings.chat_context_tokens,
            fused_forward=settings.chat_fused_forward,
            prefix_reuse=settings.chat_prefix_reuse,
            prefill_chunk=settings.chat_prefill_chunk,
            chat_first=first,
        ),
        system_prompt=settings.chat_system_prompt or None,
        context_tokens=settings.chat_context_tokens,
        enabled=settings.load_models,
        in_process=not in_child_process(settings.chat_worker, settings.chat_device),
    )
    from skills.speech import build_speech_skill

    speech = build_speech_skill(settings, first)
    skills: dict[str, Skill] = {chat.name: chat, speech.name: speech}
    from skills.vision_registry import build_vision_skills

    skills.update(build_vision_skills(settings, first))
    return skills
