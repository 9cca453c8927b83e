"""Streaming detokenization that costs the same for the 500th token as for the first.

Decoding a reply's whole token list for every frame costs O(length) per frame (126 µs at 256
tokens with a 151,936-token vocabulary, on the web process's event loop). This keeps two offsets,
the way TGI's ``decode_token`` does: ``prefix`` (where the decoded window starts) and ``read`` (up
to where text has been emitted). Each call decodes ``tokens[prefix:read]`` and ``tokens[prefix:]``
and emits the difference. The offsets only move when the new text ends on a whole character, so a
multi-byte character split across tokens is held back until it is complete, and decoding both
windows from the same token cancels what a tokenizer does at a window's start (a leading space).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def text_decoder(tokenizer: Any) -> Callable[[list[int]], str]:
    """``ids -> text`` without special tokens. For a fast tokenizer whose transformers wrapper adds
    nothing to the tokenizers library's own decode (its ``_decode`` not overridden, no clean-up of
    spaces), the library's decode directly: the wrapper's argument checks cost twice the decode."""
    try:
        from transformers.tokenization_utils_tokenizers import TokenizersBackend
    except ImportError:  # pragma: no cover - transformers is a dependency
        TokenizersBackend = None  # noqa: N806
    backend = getattr(tokenizer, "_tokenizer", None)
    if (
        TokenizersBackend is not None
        and isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer)._decode is TokenizersBackend._decode
        and not tokenizer.clean_up_tokenization_spaces
        and backend is not None
    ):
        return lambda ids: backend.decode(ids, skip_special_tokens=True)
    return lambda ids: tokenizer.decode(ids, skip_special_tokens=True)


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._decode = text_decoder(tokenizer)
        self._prefix = 0
        self._read = 0

    def delta(self, tokens: list[int], final: bool = False) -> str:
        """The text ``tokens`` (all of the reply so far) adds to what earlier calls returned."""
        decode = self._decode
        before = decode(tokens[self._prefix : self._read])
        after = decode(tokens[self._prefix :])
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""  # nothing new, or an incomplete UTF-8 sequence: wait for more tokens
        self._prefix, self._read = self._read, len(tokens)
        return after[len(before) :]
