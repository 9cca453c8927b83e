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

from typing import Any


class IncrementalDetokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._prefix = 0
        self._read = 0

    def delta(self, tokens: list[int], final: bool = False) -> str:
        """The text ``tokens`` (all of the reply so far) adds to what earlier calls returned."""
        decode = self._tokenizer.decode
        before = decode(tokens[self._prefix : self._read], skip_special_tokens=True)
        after = decode(tokens[self._prefix :], skip_special_tokens=True)
        if len(after) <= len(before) or (after.endswith("\ufffd") and not final):
            return ""  # nothing new, or an incomplete UTF-8 sequence: wait for more tokens
        self._prefix, self._read = self._read, len(tokens)
        return after[len(before) :]
