"""Audio in: real speech in browser/phone formats decodes to 16 kHz mono float32 of the right
length; bad audio gets the typed error a client can act on."""

from __future__ import annotations

import numpy as np
import pytest

from assistant.audio import AudioError, AudioLimits, check_samples, decode_file, float_to_wav, pcm16_to_float
from assistant.protocol import ErrorCode
from tests.speech_fixtures import FORMATS

LIMITS = AudioLimits(max_seconds=10, max_bytes=1 << 20, silence_rms=0.003)


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_decodes_to_16k_mono_of_the_spoken_length(speech_files, fmt: str) -> None:
    reference = decode_file(speech_files["wav"].read_bytes())
    samples = decode_file(speech_files[fmt].read_bytes())
    assert samples.dtype == np.float32 and samples.ndim == 1
    # The same utterance: codecs add at most a few tens of ms of padding at 16 kHz.
    assert abs(samples.size - reference.size) / 16_000 < 0.1
    assert 0.8 < reference.size / 16_000 < 5
    assert check_samples(samples, LIMITS) == pytest.approx(samples.size / 16, abs=0.1)
    # Speech, not silence or clipping: a real level.
    assert 0.01 < float(np.sqrt(np.mean(samples**2))) < 0.9


def test_the_decoder_resamples_and_downmixes(tmp_path, speech_files) -> None:
    import subprocess

    stereo = tmp_path / "stereo44k.ogg"
    subprocess.run(
        ["ffmpeg", "-nostdin", "-loglevel", "error", "-i", str(speech_files["wav"]), "-ac", "2", "-ar", "44100",
         "-c:a", "libvorbis", str(stereo)], check=True, timeout=60,
    )  # fmt: skip
    ref = decode_file(speech_files["wav"].read_bytes())
    out = decode_file(stereo.read_bytes())
    assert abs(out.size - ref.size) < 1600  # same duration at 16 kHz, within 0.1 s


def test_undecodable_and_empty_files_are_refused() -> None:
    with pytest.raises(AudioError) as err:
        decode_file(b"this is not audio at all" * 50)
    assert err.value.code == ErrorCode.audio_undecodable
    with pytest.raises(AudioError) as err:
        decode_file(b"")
    assert err.value.code == ErrorCode.audio_empty


def test_pcm16_round_trip_and_odd_length() -> None:
    tone = (0.5 * np.sin(np.linspace(0, 200 * np.pi, 16_000))).astype(np.float32)
    pcm = (tone * 32767).astype("<i2").tobytes()
    back = pcm16_to_float(pcm)
    assert np.max(np.abs(back - tone)) < 1e-3
    with pytest.raises(AudioError) as err:
        pcm16_to_float(pcm[:-1])
    assert err.value.code == ErrorCode.audio_format_invalid
    wav = float_to_wav(tone)
    assert wav[:4] == b"RIFF" and np.max(np.abs(decode_file(wav) - tone)) < 1e-3


@pytest.mark.parametrize(
    ("samples", "code"),
    [
        (np.zeros(0, np.float32), ErrorCode.audio_empty),
        (np.zeros(16_000, np.float32), ErrorCode.audio_silent),
        (np.full(16_000, 0.001, np.float32), ErrorCode.audio_silent),
        (np.full(11 * 16_000, 0.2, np.float32), ErrorCode.audio_too_long),
    ],
)
def test_checks(samples: np.ndarray, code: ErrorCode) -> None:
    with pytest.raises(AudioError) as err:
        check_samples(samples, LIMITS)
    assert err.value.code == code


def test_decoding_stops_past_the_limit_so_long_files_cannot_fill_memory(tmp_path) -> None:  # noqa: ANN001
    import subprocess

    long = tmp_path / "long.ogg"
    subprocess.run(["ffmpeg", "-nostdin", "-loglevel", "error", "-f", "lavfi", "-i", "sine=f=440:r=16000",
                    "-t", "20", "-c:a", "libopus", str(long)], check=True, timeout=60)  # fmt: skip
    capped = decode_file(long.read_bytes(), max_seconds=3)
    assert abs(capped.size / 16_000 - 4) < 0.1
    with pytest.raises(AudioError) as err:
        check_samples(capped, AudioLimits(max_seconds=3, max_bytes=1 << 20, silence_rms=0.003))
    assert err.value.code == ErrorCode.audio_too_long
