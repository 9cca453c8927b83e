"""Which free chat slots still hold which conversation in their KV-cache rows.

A turn's prompt is the conversation so far: the previous turn's prompt, its reply, and the new
message. When a request finishes, its slot's cache rows still hold the keys and values of its
prompt and reply; the next turn of that conversation, placed in the same slot, needs only its new
tokens computed (``SlotEngine.extend``) instead of the whole history again.

``PrefixIndex`` records, for each free slot that holds something, those tokens, and finds the slot
whose tokens share the longest prefix with a new prompt through hashes of whole blocks of
``BLOCK`` tokens, each chained to the one before (as vLLM's prefix cache names its blocks): a few
dictionary lookups a prompt, however many slots hold a conversation, then a direct comparison of
the candidates' tokens. A prompt that continues no conversation takes an empty slot, else the one
left longest ago, and when it shares a long enough start with one (a system prompt) it gets those
keys and values copied from there. Slots are not blocks here: a slot holds one conversation.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

BLOCK = 16  # tokens a hash covers; a match shorter than this is not looked for


def chain(tokens: list[int], start: list[int] | None = None) -> list[int]:
    """The hash of every whole block of ``tokens``, each chained to the one before; ``start``: the
    hashes of an earlier call over a prefix of ``tokens``, which are kept and continued."""
    hashes = list(start or ())
    h = hashes[-1] if hashes else 0
    for i in range(len(hashes) * BLOCK, len(tokens) - BLOCK + 1, BLOCK):
        h = hash((h, *tokens[i : i + BLOCK]))
        hashes.append(h)
    return hashes


@dataclass
class _Kept:
    tokens: list[int]
    hashes: list[int]
    prompt: int  # how many of the tokens were its request's prompt (the rest, its reply)
    freed: int  # when it was left (a counter), for the least recently used


class PrefixIndex:
    def __init__(self) -> None:
        self._slots: dict[int, _Kept] = {}
        self._by_hash: dict[int, set[int]] = {}
        self._clock = 0

    def __contains__(self, slot: int) -> bool:
        return slot in self._slots

    def length(self, slot: int) -> int:
        return len(self._slots[slot].tokens)

    def continues(self, slot: int, common: int) -> bool:
        """Whether a prompt that shares ``common`` tokens with what ``slot`` holds carries on that
        conversation, so it may take the slot: it holds the slot's whole prompt (and the reply
        after it, or the part of it whose text came back as the same tokens). Another that shares
        a start with it (a system prompt, or an edited last message) gets those tokens copied."""
        return common >= self._slots[slot].prompt

    def keep(self, slot: int, tokens: list[int], hashes: list[int], prompt: int) -> None:
        """Slot ``slot`` is free and its cache rows hold ``tokens``' keys and values (``hashes``:
        their ``chain``), the first ``prompt`` of them its request's prompt."""
        self.drop(slot)
        self._clock += 1
        self._add(slot, _Kept(tokens, hashes, prompt, self._clock))

    def _add(self, slot: int, kept: _Kept) -> None:
        self._slots[slot] = kept
        for h in kept.hashes:
            self._by_hash.setdefault(h, set()).add(slot)

    def drop(self, slot: int) -> None:
        """Forget what ``slot`` holds (it is taken, or its rows are overwritten)."""
        kept = self._slots.pop(slot, None)
        if kept is None:
            return
        for h in kept.hashes:
            slots = self._by_hash.get(h)
            if slots is not None:
                slots.discard(slot)
                if not slots:
                    del self._by_hash[h]

    def swap(self, a: int, b: int) -> None:
        """Slots ``a`` and ``b`` exchanged their cache rows."""
        ka, kb = self._slots.get(a), self._slots.get(b)
        self.drop(a)
        self.drop(b)
        for slot, kept in ((b, ka), (a, kb)):
            if kept is not None:
                self._add(slot, kept)

    def clear(self) -> None:
        self._slots.clear()
        self._by_hash.clear()

    def match(self, prompt: list[int], hashes: list[int]) -> tuple[int | None, int]:
        """The slot whose tokens share the longest prefix with ``prompt`` (``hashes``: its
        ``chain``), and how many tokens they share; (None, 0) when none shares a whole block.
        Of slots that share as many, the lowest."""
        candidates: set[int] = set()
        depth = 0
        for h in hashes:
            slots = self._by_hash.get(h)
            if not slots:
                break
            candidates, depth = slots, depth + 1
        best, best_common = None, 0
        base = depth * BLOCK
        for slot in sorted(candidates):
            tokens = self._slots[slot].tokens
            if tokens[:base] != prompt[:base]:  # two blocks with one hash
                continue
            common, end = base, min(len(tokens), len(prompt))
            while common < end and tokens[common] == prompt[common]:
                common += 1
            if common > best_common:
                best, best_common = slot, common
        return best, best_common

    def victim(self, free: Iterable[int]) -> int:
        """Of the ``free`` slots (not empty), the one a prompt that continues nothing should take:
        the lowest that holds nothing, else the one left longest ago."""
        held = []
        for slot in sorted(free):
            kept = self._slots.get(slot)
            if kept is None:
                return slot
            held.append((kept.freed, slot))
        return min(held)[1]
