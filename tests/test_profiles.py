"""Model profiles: which model each skill loads with a hub, without one, and when forced offline."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from assistant.profiles import resolve_models
from assistant.settings import Settings


def settings(tmp: Path, **kw: object) -> Settings:
    base: dict[str, object] = dict(
        data_dir=tmp, chat_model="Org/standard-chat", speech_model="", caption_model="", vqa_model=""
    )
    base.update(kw)
    return Settings(**base)


def prepare_fake_chat(tmp: Path) -> Path:
    folder = tmp / "models" / "chat-smollm2-135m-instruct"
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(json.dumps({"skill": "chat", "files": {}}))
    return folder


@pytest.fixture()
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # the probe then reports the hub unreachable


def test_a_local_path_is_loaded_as_given(tmp_path: Path, no_hub: None) -> None:
    resolved, plan = resolve_models(settings(tmp_path, chat_model=str(tmp_path)))
    assert resolved.chat_model == str(tmp_path) and plan.skills["chat"].source == "local"
    assert resolved.hub_offline is False  # no hub was needed, so none was asked


def test_no_hub_and_an_offline_model_prepared_switches_to_it(tmp_path: Path, no_hub: None) -> None:
    folder = prepare_fake_chat(tmp_path)
    resolved, plan = resolve_models(settings(tmp_path))
    assert resolved.chat_model == str(folder) and plan.effective == "offline"
    assert "no model hub reachable" in plan.skills["chat"].note


def test_no_hub_and_nothing_prepared_fails_fast_and_says_how_to_fix_it(tmp_path: Path, no_hub: None) -> None:
    resolved, plan = resolve_models(settings(tmp_path))
    assert resolved.chat_model == "Org/standard-chat" and plan.skills["chat"].source == "standard"
    assert "assistant models prepare --profile offline" in plan.skills["chat"].note
    assert resolved.hub_offline is True  # loaders will not spend a minute retrying the hub


def test_offline_profile_is_forced_even_when_not_prepared(tmp_path: Path) -> None:
    resolved, plan = resolve_models(settings(tmp_path, model_profile="offline"))
    assert resolved.chat_model.endswith("chat-smollm2-135m-instruct") and plan.skills["chat"].source == "offline"
    assert "not prepared" in plan.skills["chat"].note


def test_standard_profile_keeps_names(tmp_path: Path, no_hub: None) -> None:
    prepare_fake_chat(tmp_path)
    resolved, plan = resolve_models(settings(tmp_path, model_profile="standard"))
    assert resolved.chat_model == "Org/standard-chat" and plan.effective == "standard"


def test_an_unknown_profile_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError) as err:
        Settings(model_profile="gpu-cluster")
    assert "offline" in str(err.value) and "standard" in str(err.value)
