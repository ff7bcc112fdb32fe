"""Finished requests' target KV caches, reused by requests that start with the same tokens.

A chat's next turn re-sends the whole conversation, and a tool re-sends its system prompt:
without this, every request prefills its whole prompt again. A fetch finds the entry with the
longest common prefix and hands over a cache holding just that prefix, the request's alone:
  - when the request extends the entry (a chat's next turn), the entry itself, trimmed; it
    would be replaced by the request's own cache when that ends anyway, and taking it needs no
    second copy of a long conversation's keys and values;
  - when it shares only a part (a system prompt, a document), a copy of that part, so the entry
    stays for the requests that continue it.
Entries are evicted least recently used first, beyond `max_entries` or `max_bytes`.

Only the target's cache is kept. An unadapted self-draft runs on the target's cache anyway; a
draft with a cache of its own prefills the prompt again, which costs its few layers only, and
cannot go stale when an adapter is swapped in.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from mlx_lm.models.cache import can_trim_prompt_cache, trim_prompt_cache


@dataclass(frozen=True)
class PromptCacheStats:
    entries: int
    bytes: int
    lookups: int
    hits: int  # lookups that reused at least one token
    tokens_reused: int


@dataclass
class _Entry:
    model_id: int
    tokens: list[int]
    cache: list[Any]
    nbytes: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


class PromptCache:
    """Worker thread only (it holds MLX arrays); `stats()` may be read from any thread.
    `max_entries = 0` turns it off."""

    def __init__(self, max_entries: int, max_bytes: int) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._entries: list[_Entry] = []  # least recently used first
        self._bytes = 0  # kept in step with _entries, so other threads read one int
        self._lookups = 0
        self._hits = 0
        self._tokens_reused = 0

    def fetch(self, model: Any, tokens: Sequence[int]) -> tuple[list[Any] | None, int]:
        """(a cache holding tokens[:n], n) for the longest stored prefix, else (None, 0).
        n < len(tokens): the last token is left for the pass that produces logits.

        `model` keys the store: a cache is only valid for the model that wrote it, and the
        store is meant to live no longer than the models it serves."""
        if self.max_entries <= 0 or len(tokens) < 2:
            return None, 0
        self._lookups += 1
        best, common = None, 0
        for entry in self._entries:
            if entry.model_id == id(model) and can_trim_prompt_cache(entry.cache):
                shared = common_prefix(entry.tokens, tokens)
                if shared > common:
                    best, common = entry, shared
        if best is None:
            return None, 0
        n = min(common, len(tokens) - 1)
        self._entries.remove(best)
        if common == len(best.tokens):
            cache = best.cache  # the request holds all of it (a chat's next turn): take it
            self._bytes -= best.nbytes
        else:
            cache = copy.deepcopy(best.cache)
            self._entries.append(best)  # keep it, now the most recently used
        trim_prompt_cache(cache, len(best.tokens) - n)
        self._hits += 1
        self._tokens_reused += n
        return cache, n

    def insert(self, model: Any, tokens: Sequence[int], cache: list[Any]) -> None:
        """Keep `cache` (which holds exactly `tokens`) for later requests; the caller gives it
        up. Entries whose tokens are a prefix of these are dropped: this one serves them all."""
        if self.max_entries <= 0 or not tokens:
            return
        tokens = list(tokens)
        for e in list(self._entries):
            if e.model_id == id(model) and common_prefix(e.tokens, tokens) == len(e.tokens):
                self._drop(e)
        entry = _Entry(id(model), tokens, cache, sum(c.nbytes for c in cache))
        self._entries.append(entry)
        self._bytes += entry.nbytes
        while self._entries and (
            len(self._entries) > self.max_entries or self._bytes > self.max_bytes
        ):
            self._drop(self._entries[0])

    def _drop(self, entry: _Entry) -> None:
        self._entries.remove(entry)
        self._bytes -= entry.nbytes

    def held(self) -> list[Any]:
        """Every layer cache kept (for leak checks: these are kept on purpose)."""
        return [c for e in self._entries for c in e.cache]

    def clear(self) -> None:
        while self._entries:
            self._drop(self._entries[0])

    def stats(self) -> PromptCacheStats:
        return PromptCacheStats(
            entries=len(self._entries),
            bytes=self._bytes,
            lookups=self._lookups,
            hits=self._hits,
            tokens_reused=self._tokens_reused,
        )
