"""Finished requests' KV caches, reused by requests that start with the same tokens.

A chat's next turn re-sends the whole conversation, and a tool re-sends its system prompt:
without this, every request prefills its whole prompt again. A fetch finds the entry with the
longest common prefix and hands over a cache holding just that prefix, the request's alone:
  - when the request extends the entry (a chat's next turn), the entry itself, trimmed; it
    would be replaced by the request's own cache when that ends anyway, and taking it needs no
    second copy of a long conversation's keys and values;
  - when it shares only a part (a system prompt, a document), a copy of that part, so the entry
    stays for the requests that continue it.
Entries are evicted least recently used first, beyond `max_entries` or `max_bytes`.

A draft with a cache of its own (a separate model, or a self-draft with an adapter) has it kept
in the same entry, under a key naming its weights (the adapter version): after a swap it is not
reused, and the draft prefills the prompt again. An unadapted self-draft runs on the target's
cache, so it needs nothing more.
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
    hits: int  # fetches that reused at least one token
    draft_tokens_reused: int  # by drafts with a cache of their own


@dataclass
class Reused:
    """What a fetch hands over: caches that are now the request's alone."""

    cache: list[Any]  # the target's, holding tokens[:n]
    n: int
    draft_cache: list[Any] | None = None  # the draft's (same weights), holding tokens[:draft_n]
    draft_n: int = 0


@dataclass
class _Entry:
    model_id: int
    tokens: list[int]
    cache: list[Any]
    nbytes: int
    draft_key: Any = None  # identifies the draft weights that wrote draft_cache
    draft_cache: list[Any] | None = None
    draft_len: int = 0


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
        self._hits = 0
        self._draft_tokens_reused = 0

    def fetch(self, model: Any, tokens: Sequence[int], draft_key: Any = None) -> Reused | None:
        """Caches for the longest stored prefix of `tokens` (None when nothing matches); n <
        len(tokens): the last token is left for the pass that produces logits. The draft's
        cache comes along when `draft_key` names the weights that wrote it.

        `model` keys the store: a cache is only valid for the model that wrote it, and the
        store is meant to live no longer than the models it serves."""
        if self.max_entries <= 0 or len(tokens) < 2:
            return None
        best, common = None, 0
        for entry in self._entries:
            if entry.model_id == id(model) and can_trim_prompt_cache(entry.cache):
                shared = common_prefix(entry.tokens, tokens)
                if shared > common:
                    best, common = entry, shared
        if best is None:
            return None
        n = min(common, len(tokens) - 1)
        self._entries.remove(best)
        take = common == len(best.tokens)  # the request holds all of it (a chat's next turn)
        if take:
            self._bytes -= best.nbytes
        else:
            self._entries.append(best)  # keep it, now the most recently used
        reused = Reused(_own(best.cache, take), n)
        trim_prompt_cache(reused.cache, len(best.tokens) - n)
        draft = best.draft_cache
        if draft is not None and draft_key is not None and best.draft_key == draft_key:
            reused.draft_cache, reused.draft_n = _own(draft, take), min(best.draft_len, n)
            trim_prompt_cache(reused.draft_cache, best.draft_len - reused.draft_n)
            self._draft_tokens_reused += reused.draft_n
        self._hits += 1
        return reused

    def insert(
        self,
        model: Any,
        tokens: Sequence[int],
        cache: list[Any],
        draft: tuple[Any, list[Any], int] | None = None,
    ) -> None:
        """Keep `cache` (which holds exactly `tokens`) for later requests, and with `draft` =
        (key, cache, length) the draft's cache holding tokens[:length]; the caller gives them
        up. Entries whose tokens are a prefix of these are dropped: this one serves them all."""
        if self.max_entries <= 0 or not tokens:
            return
        tokens = list(tokens)
        for e in list(self._entries):
            if e.model_id == id(model) and common_prefix(e.tokens, tokens) == len(e.tokens):
                self._drop(e)
        entry = _Entry(id(model), tokens, cache, sum(c.nbytes for c in cache))
        if draft is not None and can_trim_prompt_cache(draft[1]):
            entry.draft_key, entry.draft_cache, entry.draft_len = draft
            entry.nbytes += sum(c.nbytes for c in draft[1])
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
        return [c for e in self._entries for c in e.cache + (e.draft_cache or [])]

    def clear(self) -> None:
        while self._entries:
            self._drop(self._entries[0])

    def stats(self) -> PromptCacheStats:
        return PromptCacheStats(
            entries=len(self._entries),
            bytes=self._bytes,
            hits=self._hits,
            draft_tokens_reused=self._draft_tokens_reused,
        )


def _own(cache: list[Any], take: bool) -> list[Any]:
    return cache if take else copy.deepcopy(cache)
