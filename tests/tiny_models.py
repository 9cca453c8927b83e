"""Tiny random-weight models and tokenizers, built from configs and saved like real ones."""

from __future__ import annotations

from pathlib import Path

CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_chat_tokenizer(folder: Path, vocab_size: int | None = None) -> int:
    """A byte-level BPE tokenizer with a ChatML template (ids 0-2 are the specials), saved to
    ``folder``; with ``vocab_size``, padded with word tokens (" w", " wa", " wb", ...) so that every id a
    model of that vocabulary can emit decodes to text, and encodes back. Returns the vocabulary size."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|pad|>": 0, "<|im_start|>": 1, "<|im_end|>": 2}
    for ch in sorted(ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    # Word tokens come with the merges that build them from their bytes, so that a reply's text
    # encodes to the ids that made it, as a trained tokenizer's mostly does: " w" and then letters
    # (the pre-tokenizer keeps a space and the letters after it together), so " wab" is
    # " w" + "a" -> " wa", + "b" -> " wab"; the words are every string of letters in turn.
    merges: list[tuple[str, str]] = []
    if vocab_size is not None and len(vocab) < vocab_size:
        vocab["Ġw"] = len(vocab)  # "Ġ" is the byte-level space
        merges.append(("Ġ", "w"))
    n = 1
    while vocab_size is not None and len(vocab) < vocab_size:
        word = "Ġw" + _letters(n)
        vocab[word] = len(vocab)
        merges.append((word[:-1], word[-1]))
        n += 1
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<|pad|>", eos_token="<|im_end|>", additional_special_tokens=["<|im_start|>"]
    )
    fast.chat_template = CHAT_TEMPLATE
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    return len(vocab)


def _letters(n: int) -> str:
    """``n`` >= 1 in bijective base 26: a, b, ..., z, aa, ab, ... (every prefix is an earlier one)."""
    out = ""
    while n:
        n, r = divmod(n - 1, 26)
        out = chr(97 + r) + out
    return out


def widen_weights(model, std: float) -> None:  # noqa: ANN001 - any torch module
    """Redraw every weight matrix from N(0, std): a random model whose next token has a clear winner."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(0.0, std)


def build_tiny_chat_model(
    folder: Path, *, seed: int = 0, layers: int = 2, hidden: int = 32, weight_std: float | None = None
) -> Path:
    """A byte-level BPE tokenizer with a ChatML template and a tiny Qwen2 decoder, saved to ``folder``.

    The decoder's weights are random, so it babbles; the EOS token is made unreachable so replies run
    to ``max_new_tokens``, which makes streaming, batching and cancel observable. The default
    initialisation mostly repeats one token; ``weight_std`` (about 0.35) draws the matrices wider, so
    that the next token depends on the whole context and a wrong cache shows."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    vocab_size = build_chat_tokenizer(folder)

    config = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        eos_token_id=2,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():
        if weight_std is not None:
            widen_weights(model, weight_std)
        # Never pick a special token: keeps the output printable and the length predictable.
        model.lm_head.weight[:3] = 0
        model.model.embed_tokens.weight[:3] = 0
        model.lm_head.bias = None
    model.save_pretrained(folder)
    return folder
