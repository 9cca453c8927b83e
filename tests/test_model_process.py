"""Speech and vision models in a process of their own (``ASSISTANT_MEDIA_WORKER=process``): the
same answers as in the web process, typed errors across the pipe, and a crashed model process
replaced by the next request instead of taking the skill down."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path

import numpy as np
import pytest

from assistant.audio import decode_file
from skills.base import SkillError
from skills.lifecycle import ModelLoadError
from skills.model_process import ModelProcess, ModelProcessExited
from skills.speech_worker import SpeechWorker, SpeechWorkerOptions
from skills.vision_worker import VisionWorker, VisionWorkerOptions
from tests.conftest import make_settings, start_server, ws_client
from tests.photos import photo, upload
from tests.tiny_vision_models import build_tiny_blip

# ----------------------------------------------------------------------------- the transport


class Toy:
    """A stand-in model with the calls a test needs (built in the child by ``toy``)."""

    def __init__(self, options: dict) -> None:
        if options.get("fail_load"):
            raise ModelLoadError("no weights here; set ASSISTANT_TOY_MODEL")
        self.options = options

    def host_info(self) -> dict:
        return {"pid": os.getpid(), "options": self.options}

    def double(self, values: list[int]) -> list[int]:
        return [2 * v for v in values]

    def refuse(self, code: str) -> None:
        raise SkillError(code, f"refused with {code}")

    def unpicklable_error(self) -> None:
        class Local(Exception):  # a class defined in a function cannot be pickled
            pass

        raise Local("from inside")

    def unpicklable_result(self) -> object:
        return lambda: None

    def exit_now(self) -> None:
        os._exit(3)


def toy(options: dict) -> Toy:
    return Toy(options)


def kill(host: ModelProcess) -> None:
    """SIGKILL the model's process and wait until it is gone."""
    os.kill(host.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while host.is_running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not host.is_running()


def test_calls_run_in_the_child_and_errors_come_back_typed() -> None:
    host = ModelProcess("toy-model", toy, {"size": 7})
    try:
        info = host.start()
        frozen = info.pop("frozen_objects")  # what the child froze once loaded (skills/gc_pauses.py)
        assert info == {"pid": host.pid, "options": {"size": 7}} and host.pid != os.getpid()
        assert frozen > 1000, frozen
        assert host.call("double", [1, 2, 3]) == [2, 4, 6]
        with pytest.raises(SkillError) as err:
            host.call("refuse", "image_corrupt")
        assert (err.value.code, err.value.message) == ("image_corrupt", "refused with image_corrupt")
        with pytest.raises(RuntimeError, match="Local: from inside"):
            host.call("unpicklable_error")
        with pytest.raises(RuntimeError, match="could not be sent back"):
            host.call("unpicklable_result")
        assert host.call("double", [5]) == [10], "the child serves on after each failure"
    finally:
        host.close()
    assert not host.is_running()


def test_a_child_that_exits_fails_its_call_and_the_next_call_starts_a_new_one() -> None:
    host = ModelProcess("toy-model", toy, {})
    try:
        host.start()
        first = host.pid
        with pytest.raises(ModelProcessExited, match="exit code 3"):
            host.call("exit_now")
        assert not host.is_running()
        assert host.call("double", [4]) == [8]
        assert host.starts == 2 and host.pid != first
        kill(host)  # killed while idle (the OOM killer)
        assert host.call("double", [1]) == [2] and host.starts == 3
    finally:
        host.close()


def test_a_model_that_cannot_load_raises_its_load_error() -> None:
    host = ModelProcess("toy-model", toy, {"fail_load": True})
    with pytest.raises(ModelLoadError, match="ASSISTANT_TOY_MODEL"):
        host.start()
    assert not host.is_running()


# ----------------------------------------------------------------------------- the workers


@pytest.fixture(scope="module")
def blip(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_blip(tmp_path_factory.mktemp("tiny-blip") / "caption", task="caption")


def test_vision_in_its_own_process_gives_the_same_captions(blip: Path) -> None:
    images = [photo("astronaut"), b"\xff\xd8\xffbroken", photo("coffee"), photo("rocket")]

    async def captions(in_process: bool) -> tuple[list, VisionWorker]:
        worker = VisionWorker(
            VisionWorkerOptions(model=str(blip), task="caption", device="cpu", max_new_tokens=4, batch_wait_ms=100,
                                in_process=in_process)
        )  # fmt: skip
        await asyncio.to_thread(worker.load)
        try:
            out = await asyncio.gather(*(worker.submit(img, None) for img in images), return_exceptions=True)
        finally:
            await worker.aclose()
        return out, worker

    here, _ = asyncio.run(captions(True))
    there, worker = asyncio.run(captions(False))
    assert worker.host is not None and worker.host.starts == 1 and worker.model is None, "the model stayed out of this process"
    assert list(worker.batch_sizes) == [4], "the batching still happens here: one call for the four"
    assert [r for i, r in enumerate(there) if i != 1] == [r for i, r in enumerate(here) if i != 1]
    assert all(isinstance(r, tuple) and r[0] and r[1] == 4 for i, r in enumerate(there) if i != 1)
    assert isinstance(there[1], SkillError) and there[1].code == "image_corrupt"


@pytest.fixture(scope="module")
def utterance(speech_files) -> np.ndarray:  # noqa: ANN001
    return decode_file(speech_files["wav"].read_bytes())


def test_speech_in_its_own_process_transcribes_the_same_and_survives_a_crash(tiny_whisper: Path, utterance) -> None:  # noqa: ANN001
    clips = [utterance, utterance * 0.5, np.concatenate([utterance, np.zeros(16_000, np.float32)] * 14)]  # the last is ~34 s

    def transcripts(worker: SpeechWorker) -> list:
        return [f.result(timeout=120) for f in [worker.submit(c) for c in clips]]

    options = SpeechWorkerOptions(model=str(tiny_whisper), device="cpu", max_tokens=6, batch_wait_ms=50)
    here = SpeechWorker(options)
    here.load()
    try:
        expected = transcripts(here)
    finally:
        here.close()
    there = SpeechWorker(SpeechWorkerOptions(**{**options.__dict__, "in_process": False}))
    there.load()
    try:
        assert there.model is None and there.host is not None and there.engine == "library"
        assert transcripts(there) == expected
        assert there.transcribe_calls == 1, "the long clip went through chunked transcription"
        kill(there.host)
        assert there.submit(utterance).result(timeout=120) == expected[0], "the next request started a new model process"
        assert there.host.starts == 2
    finally:
        there.close()
    assert not there.host.is_running()


def test_a_server_with_media_models_in_processes_answers_over_the_websocket(
    tmp_path: Path, tiny_chat_model: Path, blip: Path
) -> None:
    live = start_server(
        make_settings(tmp_path, tiny_chat_model, caption_model=str(blip), vision_device="cpu", vision_max_new_tokens=4,
                      media_worker="process")
    )  # fmt: skip
    try:
        token = live.token("vic")

        async def scenario() -> dict:
            async with ws_client(live, token) as c:
                sid = await c.new_session()
                image_id = upload(live.http, token, sid, photo("chelsea")).json()["id"]
                _, done = await c.turn(sid, "/caption", attachment_ids=[image_id])
                return done

        done = asyncio.run(scenario())
        worker = live.app.state.skills["caption"].worker
        assert worker.host is not None and worker.host.is_running() and worker.host.pid != os.getpid()
    finally:
        live.stop()
    assert done["status"] == "completed" and done["skill"] == "caption" and done["text"]
    assert not worker.host.is_running(), "stopping the server stops the model's process"
