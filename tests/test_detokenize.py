"""Streaming detokenization: the deltas of any chunking join to the whole reply's decode, a
character split across tokens is never sent half, and the work per frame does not grow with the
reply (the window decoded stays short)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from skills.detokenize import IncrementalDetokenizer

TEXT = "Café déjà vu — 東京 🚀🚀 naïve coöperation; ∑ x² ≥ 0. Ünïcödé ends here 👍🏽"


@pytest.fixture(scope="module")
def tokenizer(tiny_chat_model: Path):  # noqa: ANN201
    return AutoTokenizer.from_pretrained(tiny_chat_model)  # byte-level BPE: one token per byte


def stream(tokenizer, tokens: list[int], rng: random.Random) -> list[str]:  # noqa: ANN001
    detok, deltas, n = IncrementalDetokenizer(tokenizer), [], 0
    while n < len(tokens):
        n = min(len(tokens), n + rng.randint(1, 4))  # a frame carries 1-4 new tokens
        deltas.append(detok.delta(tokens[:n], final=n == len(tokens)))
    return deltas


@pytest.mark.parametrize("seed", range(5))
def test_deltas_join_to_the_whole_decode_and_never_split_a_character(tokenizer, seed: int) -> None:  # noqa: ANN001
    tokens = tokenizer(TEXT * 3)["input_ids"]
    assert len(tokens) > len(TEXT * 3), "the test text should need several bytes per character"
    deltas = stream(tokenizer, tokens, random.Random(seed))
    assert "".join(deltas) == tokenizer.decode(tokens, skip_special_tokens=True) == TEXT * 3
    assert all("\ufffd" not in d for d in deltas)


def test_invalid_bytes_still_join_to_the_whole_decode(tokenizer) -> None:  # noqa: ANN001
    rng = random.Random(7)
    byte_tokens = [i for i in range(3, 259)]
    tokens = [rng.choice(byte_tokens) for _ in range(400)]  # random bytes: broken UTF-8 included
    assert "".join(stream(tokenizer, tokens, rng)) == tokenizer.decode(tokens, skip_special_tokens=True)


def test_each_frame_decodes_a_short_window(tokenizer) -> None:  # noqa: ANN001
    calls: list[int] = []

    class Counting:
        def decode(self, ids: list[int], **kw: object) -> str:
            calls.append(len(ids))
            return tokenizer.decode(ids, **kw)

    tokens = tokenizer("word " * 300)["input_ids"]
    detok = IncrementalDetokenizer(Counting())
    for n in range(1, len(tokens) + 1):
        detok.delta(tokens[:n])
    assert max(calls) <= 4, "a frame decoded more than the last few tokens"


def test_the_direct_decode_is_the_tokenizers_decode(tokenizer) -> None:  # noqa: ANN001
    """The fast path (the tokenizers library's own decode) gives what the transformers wrapper
    gives, special tokens skipped, on random ids over the whole vocabulary."""
    from skills.detokenize import text_decoder

    decode = text_decoder(tokenizer)
    assert decode.__code__ is not text_decoder(object()).__code__, "a plain fast tokenizer should skip the wrapper"
    rng = random.Random(3)
    for _ in range(50):
        ids = [rng.randrange(len(tokenizer)) for _ in range(rng.randint(0, 12))]
        assert decode(ids) == tokenizer.decode(ids, skip_special_tokens=True)
