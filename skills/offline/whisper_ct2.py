"""Convert a CTranslate2 Whisper ``model.bin`` into an openai-whisper checkpoint.

The CTranslate2 file (binary version 6) is: uint32 version, the spec name, uint32 revision, uint32
variable count, then per variable its name, rank, uint32 dims, a dtype code, a byte count and the raw
little-endian bytes, then aliases. Names map one-to-one onto openai-whisper's modules; fused q/k/v
matrices are split. The result is ``{"dims": ..., "model_state_dict": ...}``, which
``whisper.load_model(path)`` accepts.
"""

from __future__ import annotations

import re
import struct
from pathlib import Path
from typing import Any

import numpy as np

_DTYPES = {0: np.float32, 1: np.int8, 2: np.int16, 3: np.int32, 4: np.float16}


class ConversionError(ValueError):
    pass


def read_ct2(path: Path) -> dict[str, np.ndarray]:
    """All variables of a CTranslate2 model file, aliases resolved."""
    buf = Path(path).read_bytes()
    pos = 0

    def take(fmt: str) -> int:
        nonlocal pos
        (value,) = struct.unpack_from("<" + fmt, buf, pos)
        pos += struct.calcsize("<" + fmt)
        return value

    def text() -> str:
        nonlocal pos
        n = take("H")
        value = buf[pos : pos + n - 1].decode()
        pos += n
        return value

    try:
        version = take("I")
        if version != 6:
            raise ConversionError(f"unsupported CTranslate2 binary version {version} (expected 6)")
        spec = text()
        if spec != "WhisperSpec":
            raise ConversionError(f"{path} holds a {spec}, not a Whisper model")
        take("I")  # revision
        out: dict[str, np.ndarray] = {}
        for _ in range(take("I")):
            name = text()
            shape = [take("I") for _ in range(take("B"))]
            dtype = _DTYPES.get(take("B"))
            nbytes = take("I")
            if dtype is None:
                raise ConversionError(f"variable {name} has an unsupported dtype")
            count = nbytes // np.dtype(dtype).itemsize
            out[name] = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).reshape(shape)
            pos += nbytes
        for _ in range(take("I")):
            alias, target = text(), text()
            out[alias] = out[target]
    except (struct.error, ValueError) as exc:
        if isinstance(exc, ConversionError):
            raise
        raise ConversionError(f"{path} is truncated or not a CTranslate2 model ({exc})") from None
    return out


def _layers(v: dict[str, np.ndarray], side: str) -> int:
    return len({m.group(1) for k in v if (m := re.match(rf"{side}/layer_(\d+)/", k))})


def _ln(sd: dict, dst: str, v: dict, src: str) -> None:
    sd[f"{dst}.weight"], sd[f"{dst}.bias"] = v[f"{src}/gamma"], v[f"{src}/beta"]


def _lin(sd: dict, dst: str, v: dict, src: str, bias: bool = True) -> None:
    sd[f"{dst}.weight"] = v[f"{src}/weight"]
    if bias:
        sd[f"{dst}.bias"] = v[f"{src}/bias"]


def _qkv(sd: dict, dst: str, weight: np.ndarray, bias: np.ndarray, parts: tuple[str, ...]) -> None:
    for name, w, b in zip(parts, np.split(weight, len(parts)), np.split(bias, len(parts))):
        sd[f"{dst}.{name}.weight"] = w
        if name != "key":  # Whisper's key projections have no bias
            sd[f"{dst}.{name}.bias"] = b


def _block(sd: dict, dst: str, v: dict, src: str) -> None:
    """What encoder and decoder blocks share: self-attention (fused q/k/v split) and the MLP."""
    att = f"{src}/self_attention"
    _qkv(sd, f"{dst}.attn", v[f"{att}/linear_0/weight"], v[f"{att}/linear_0/bias"], ("query", "key", "value"))
    _lin(sd, f"{dst}.attn.out", v, f"{att}/linear_1")
    _ln(sd, f"{dst}.attn_ln", v, f"{att}/layer_norm")
    _lin(sd, f"{dst}.mlp.0", v, f"{src}/ffn/linear_0")
    _lin(sd, f"{dst}.mlp.2", v, f"{src}/ffn/linear_1")
    _ln(sd, f"{dst}.mlp_ln", v, f"{src}/ffn/layer_norm")


def convert(v: dict[str, np.ndarray]) -> dict[str, Any]:
    """Map CTranslate2 variables to openai-whisper's ``dims`` and state dict (numpy arrays)."""
    enc_layers, dec_layers = _layers(v, "encoder"), _layers(v, "decoder")
    n_audio_state = v["encoder/conv1/weight"].shape[0]
    dims = {
        "n_mels": int(v["encoder/conv1/weight"].shape[1]),
        "n_audio_ctx": int(v["encoder/position_encodings/encodings"].shape[0]),
        "n_audio_state": int(n_audio_state),
        "n_audio_head": int(v["encoder/num_heads"]),
        "n_audio_layer": enc_layers,
        "n_vocab": int(v["decoder/embeddings/weight"].shape[0]),
        "n_text_ctx": int(v["decoder/position_encodings/encodings"].shape[0]),
        "n_text_state": int(v["decoder/embeddings/weight"].shape[1]),
        "n_text_head": int(v["decoder/num_heads"]),
        "n_text_layer": dec_layers,
    }
    sd: dict[str, np.ndarray] = {}
    _lin(sd, "encoder.conv1", v, "encoder/conv1")
    _lin(sd, "encoder.conv2", v, "encoder/conv2")
    sd["encoder.positional_embedding"] = v["encoder/position_encodings/encodings"]
    for i in range(enc_layers):
        _block(sd, f"encoder.blocks.{i}", v, f"encoder/layer_{i}")
    _ln(sd, "encoder.ln_post", v, "encoder/layer_norm")

    sd["decoder.token_embedding.weight"] = v["decoder/embeddings/weight"]
    sd["decoder.positional_embedding"] = v["decoder/position_encodings/encodings"]
    for i in range(dec_layers):
        src, dst = f"decoder/layer_{i}", f"decoder.blocks.{i}"
        _block(sd, dst, v, src)
        cross = f"{src}/attention"
        _lin(sd, f"{dst}.cross_attn.query", v, f"{cross}/linear_0")
        _qkv(sd, f"{dst}.cross_attn", v[f"{cross}/linear_1/weight"], v[f"{cross}/linear_1/bias"], ("key", "value"))
        _lin(sd, f"{dst}.cross_attn.out", v, f"{cross}/linear_2")
        _ln(sd, f"{dst}.cross_attn_ln", v, f"{cross}/layer_norm")
    _ln(sd, "decoder.ln", v, "decoder/layer_norm")
    return {"dims": dims, "model_state_dict": sd}


def convert_file(model_bin: Path, out_path: Path) -> dict[str, int]:
    """Write the openai-whisper checkpoint for ``model_bin`` to ``out_path``; returns its dims."""
    import torch
    import whisper.model

    ckpt = convert(read_ct2(model_bin))
    dims = whisper.model.ModelDimensions(**ckpt["dims"])
    model = whisper.model.Whisper(dims)
    state = {k: torch.from_numpy(np.array(a, copy=True)).to(torch.float16) for k, a in ckpt["model_state_dict"].items()}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise ConversionError(f"weights do not match Whisper: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for k, t in state.items():
        if tuple(t.shape) != tuple(expected[k].shape):
            raise ConversionError(f"{k}: shape {tuple(t.shape)} but Whisper expects {tuple(expected[k].shape)}")
    torch.save({"dims": ckpt["dims"], "model_state_dict": state}, out_path)
    return ckpt["dims"]
