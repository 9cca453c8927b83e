"""Random-weight chat models for benchmarks, built from configs and saved like real ones.

Speed does not depend on weight values, so a model with a real model's shape (layers, widths,
heads, vocabulary) serves as a stand-in where weights cannot be downloaded. End-of-text is made
unreachable, so every reply runs to the server's ``chat_max_new_tokens``.

    python -m bench.chat_model --shape qwen2.5-0.5b --out /tmp/qwen-shaped
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tests.tiny_models import build_chat_tokenizer  # noqa: E402

SPECIALS = 3  # ids 0-2: pad, im_start, im_end (tests/tiny_models.py builds the tokenizer)

# Qwen/Qwen2.5-0.5B-Instruct's config.json (494 M parameters, 136 M of them the tied embedding).
SHAPES: dict[str, dict[str, int | float | bool]] = {
    "tiny": dict(
        vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
    ),
    # A CPU stand-in where a prompt's compute shows: about 11 M parameters, Qwen2.5-0.5B's head
    # width and its 7:1 query to key-value heads ratio.
    "small": dict(
        vocab_size=4096, hidden_size=448, intermediate_size=1216, num_hidden_layers=6,
        num_attention_heads=7, num_key_value_heads=1, max_position_embeddings=4096,
    ),
    "qwen2.5-0.5b": dict(
        vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
        num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-6,
    ),
}


def build_chat_model(folder: Path, shape: str = "tiny", *, seed: int = 0) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if shape not in SHAPES:
        raise SystemExit(f"unknown shape {shape!r}; available: {', '.join(SHAPES)}")
    dims = SHAPES[shape]
    build_chat_tokenizer(folder, int(dims["vocab_size"]))
    config = Qwen2Config(**dims, eos_token_id=2, pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(seed)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(device):
        model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        model.model.embed_tokens.weight[:SPECIALS] = 0  # tied: logit 0 for specials, never the argmax
    model.to(torch.bfloat16 if device == "cuda" else torch.float32).save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    print(build_chat_model(args.out, args.shape))


if __name__ == "__main__":
    main()
