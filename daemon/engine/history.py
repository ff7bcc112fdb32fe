"""The history drafter: suffix matches over the request's own tokens and over past requests.

A proposal is the most likely continuation of the longest suffix of the current context that
occurred before (SuffixDecoding, arXiv 2411.04975; vLLM's `suffix` method; llama.cpp's ngram
caches). It costs no draft pass, so it pays wherever the target's wider verify pass does.

Semantics, shared by both sources:

- occurrences: places where the last L tokens of the context appear and at least one token
  follows them in the same document (for the request's own tokens: before the end, so the
  suffix never matches itself). L runs from `min_match` up to `max_match`; the longest wins.
- candidates: the occurrences with that longest L, most recent first, at most `max_candidates`.
- continuation, greedily: at each position the most frequent next token among the candidates
  still agreeing with what was proposed so far (ties: the one the most recent candidate saw);
  its confidence is its count over those candidates (a candidate whose document ends there
  counts as a vote for "stop"). It stops at `max_len` tokens, at int(spec_factor * L) tokens,
  where no candidate has a next token, or before the token whose cumulative probability (the
  product of the confidences so far) would fall below `min_token_prob`. The cumulative rule is
  vLLM's / Arctic Inference's; each token's own confidence is what `HistoryProposal` reports.

Data structure. Tokens live in one int32 buffer, documents separated by a -1 sentinel, so no
match can cross a document boundary. Most of it is covered by sorted segments: every position
sorted by the tokens before it read backwards (its first `max_match`), a suffix array over the
reversed text cut at `max_match`, with the common-prefix length of neighbours (LCP). A query
is one binary search for the reversed context: the longest match is with a neighbour of where
it would sort, and all its occurrences are the run of neighbours whose LCP reaches it. Segments
are built by prefix doubling (a handful of numpy sorts, ~0.75 s of CPU per million tokens
here). The newest tokens (the tail) are scanned with vectorised comparisons; LSM style, a full
tail is sorted into a small segment and a grown small segment into the large one, in a
background thread for the shared index. Answers never depend on whether a build has finished.
No MLX and no gRPC here.
"""

from __future__ import annotations

import sys
import threading
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["HistoryProposal", "RequestHistory", "SuffixIndex"]

_SENTINEL = -1
_MAX_TOKEN_ID = 1 << 30
# The scanned tail: at most this many candidates are checked in one vectorised block; more
# are first narrowed one token at a time.
_BLOCK = 64
# A scanned tail longer than this is sorted into a segment (in the background for the shared
# index). The shared index keeps two segments, LSM style: a small one over the newest tokens,
# rebuilt whenever the tail fills, and a large one, rebuilt over everything when the small one
# passes max(4 * _TAIL, max_tokens / 8); so a large rebuild (~1 s per million tokens) runs
# once per ~1/8 of the bound added, and the tail scan stays short.
_TAIL = 4096


@dataclass(frozen=True)
class HistoryProposal:
    tokens: tuple[int, ...]  # the proposed continuation, len >= 1
    confidence: tuple[float, ...]  # per token: empirical P(token | the match and tokens before it)
    match_len: int  # length of the suffix match it continues
    source: str  # "prompt": the request's own prompt + output; "history": past requests

    @property
    def expected_accepted(self) -> float:
        """Expected accepted length if each confidence were the acceptance probability:
        the sum of the cumulative products."""
        total, cum = 0.0, 1.0
        for c in self.confidence:
            cum *= c
            total += cum
        return total


# --------------------------------------------------------------------------- sorted segment


@dataclass(frozen=True)
class _Segment:
    """Entries p (continuation positions, absolute) in [lo, hi), sorted by their reversed
    window buf[p-1], buf[p-2], ...; positions stored relative to `lo`. lcp[j] is how many
    leading window tokens entries j - 1 and j share (lcp[0] = 0), capped at the width."""

    lo: int
    hi: int
    sa: np.ndarray  # int32
    lcp: np.ndarray  # uint8
    heads: np.ndarray  # int32, the distinct last tokens (window[0]), ascending
    head_starts: np.ndarray  # int64, where each head's entries start; one more: len(sa)

    @property
    def nbytes(self) -> int:
        return int(self.sa.nbytes + self.lcp.nbytes + self.heads.nbytes + self.head_starts.nbytes)


def _sort_order(keys: np.ndarray, key_max: int) -> np.ndarray:
    """argsort of non-negative int64 keys; packs key and index into one int64 when they fit,
    because np.sort is several times faster than np.argsort."""
    n = len(keys)
    bits = max(1, int(n).bit_length())
    if int(key_max).bit_length() + bits <= 63:
        packed = np.sort((keys << bits) | np.arange(n, dtype=np.int64))
        return packed & ((1 << bits) - 1)
    return np.argsort(keys)


def _dense_rank(keys: np.ndarray, key_max: int) -> np.ndarray:
    """Each key's rank among the distinct keys, 1-based and order-preserving (int32)."""
    order = _sort_order(keys, key_max)
    ordered = keys[order]
    new_group = np.ones(len(keys), dtype=np.int32)
    np.not_equal(ordered[1:], ordered[:-1], out=new_group[1:])
    ranks = np.empty(len(keys), dtype=np.int32)
    ranks[order] = np.cumsum(new_group, dtype=np.int32)
    return ranks


def _build_segment(buf: np.ndarray, offset: int, lo: int, hi: int, width: int) -> _Segment:
    """Sort the entries p in [lo, hi) (absolute) of `buf` (whose buf[0] is absolute `offset`)
    by their reversed window of `width` tokens, by prefix doubling; `buf[lo - 1 - offset]` must
    be a sentinel (everything before it reads as padding)."""
    raw = buf[lo - 1 - offset : hi - offset]  # raw[i] is absolute position lo - 1 + i
    n = len(raw)
    distinct = np.unique(raw)
    rank = np.searchsorted(distinct, raw).astype(np.int32)  # the sentinel -1 ranks 0
    top = len(distinct) - 1
    # levels[j][i]: rank of the 2**j tokens ending at i (read backwards); 0 pads before raw[0].
    levels = [rank]
    while (1 << (len(levels) - 1)) < width and top < n:
        k = 1 << (len(levels) - 1)
        prev = np.zeros(n, dtype=np.int64)
        prev[k:] = rank[:-k]
        rank = _dense_rank(rank.astype(np.int64) * (top + 1) + prev, (top + 1) ** 2)
        top = int(rank.max(initial=0))
        levels.append(rank)  # once top == n every window is distinct: longer ones add nothing
    # Entry p ends its window at i = p - 1 and needs real tokens at p - 1 and p (p < hi).
    ends = np.arange(1, n - 1)
    ends = ends[(raw[ends] >= 0) & (raw[ends + 1] >= 0)]
    ends = ends[_sort_order(rank[ends].astype(np.int64), top)]
    # Common prefix of neighbours by binary lifting over the levels, longest power first.
    a, b = ends[:-1], ends[1:]
    common = np.zeros(len(a), dtype=np.int64)
    for j in range(len(levels) - 1, -1, -1):
        ia, ib = a - common, b - common
        ra = np.where(ia >= 0, levels[j][np.maximum(ia, 0)], -1)
        rb = np.where(ib >= 0, levels[j][np.maximum(ib, 0)], -1)
        common += np.where(ra == rb, 1 << j, 0)
    lcp = np.zeros(len(ends), dtype=np.uint8)
    lcp[1:] = np.minimum(common, width)
    # Where each last token's entries start, so a search begins inside its own run.
    first = raw[ends]
    starts = np.flatnonzero(np.diff(first, prepend=-2))
    # raw[i] is position lo - 1 + i, so entry p = i + 1 + lo - 1 is stored as p - lo = i.
    return _Segment(
        lo=lo,
        hi=hi,
        sa=ends.astype(np.int32),
        lcp=lcp,
        heads=first[starts].astype(np.int32),
        head_starts=np.append(starts, len(ends)).astype(np.int64),
    )


def _expand_left(lcp: np.ndarray, start: int, length: int) -> int:
    """First entry of the run around `start` whose neighbours share >= length tokens."""
    end, step = start + 1, 32
    while True:
        s = max(end - step, 0)
        short = np.flatnonzero(lcp[s:end] < length)
        if len(short):  # lcp[0] = 0 ends the search at the latest
            return s + int(short[-1])
        end, step = s, step * 4


def _expand_right(lcp: np.ndarray, stop: int, length: int) -> int:
    """One past the last entry of the run that ends at `stop - 1` or later."""
    n, step = len(lcp), 32
    while stop < n:
        e = min(stop + step, n)
        short = np.flatnonzero(lcp[stop:e] < length)
        if len(short):
            return stop + int(short[0])
        stop, step = e, step * 4
    return n


# --------------------------------------------------------------------------- the corpus


class _Corpus:
    """A token buffer, sorted segments over its older part, and a scanned tail.

    Absolute positions never change: buf[i] holds absolute position `offset + i`, and buf[0]
    is always a sentinel. Positions before `start` were evicted; they may still sit in the
    buffer and in a segment until the next large rebuild, and are filtered out of answers.
    `levels` = 2 keeps a large and a small segment (the shared index); 1 keeps one segment,
    rebuilt in full (a request's own tokens: one open document, so the sentinel a small
    segment's build needs before its first token does not exist there).
    """

    def __init__(self, width: int, *, background: bool, levels: int) -> None:
        self.width = width
        self.background = background
        self.levels = levels
        self.buf = np.full(1024, _SENTINEL, dtype=np.int32)
        self.offset = 0
        self.end = 1  # absolute position after the last token
        self.start = 1  # first live position
        self.large: _Segment | None = None
        self.small: _Segment | None = None
        # A background build: its thread, the box it leaves its segment in, and which level.
        # clear() drops it, so a build still running then can never install a stale segment.
        self._building: tuple[threading.Thread, list[_Segment], str] | None = None

    # -- writing --------------------------------------------------------------------------

    def append(self, tokens: np.ndarray) -> None:
        used = self.end - self.offset
        if used + len(tokens) + 1 > len(self.buf):  # always one sentinel slot after the end
            grown = np.full(max(used + len(tokens) + 1, 2 * len(self.buf)), _SENTINEL, np.int32)
            grown[:used] = self.buf[:used]
            self.buf = grown  # a running build keeps its reference to the old array
        self.buf[used : used + len(tokens)] = tokens
        self.end += len(tokens)

    @property
    def covered(self) -> int:
        """Entries below this position are in a segment; the tail is [covered, end)."""
        for segment in (self.small, self.large):
            if segment is not None:
                return max(segment.hi, self.start)
        return self.start

    def maybe_rebuild(self, tail_max: int, small_max: int) -> None:
        """Swap in a finished build; start one when the tail is longer than `tail_max`."""
        self._swap_built()
        tail = self.end - self.covered
        if self._building is not None or tail <= tail_max:
            return
        small = self.small.hi - self.small.lo if self.small is not None else 0
        if self.levels == 1 or self.large is None or small + tail > small_max:
            level, lo = "large", self.start
        else:
            level, lo = "small", (self.small.lo if self.small is not None else self.large.hi)
        buf, offset, hi, width = self.buf, self.offset, self.end, self.width
        box: list[_Segment] = []
        if not self.background:
            box.append(_build_segment(buf, offset, lo, hi, width))
            self._install(level, box[0])
            return
        thread = threading.Thread(
            target=lambda: box.append(_build_segment(buf, offset, lo, hi, width)),
            name="history-index",
            daemon=True,
        )
        self._building = (thread, box, level)
        thread.start()

    def wait(self) -> None:
        """Finish a background build and swap it in."""
        if self._building is not None:
            self._building[0].join()
        self._swap_built()

    def rebuild_all(self) -> None:
        """One large segment over everything, now."""
        self.wait()
        if self.end - self.covered > 0 or self.small is not None:
            self._install(
                "large", _build_segment(self.buf, self.offset, self.start, self.end, self.width)
            )

    def _swap_built(self) -> None:
        if self._building is None or self._building[0].is_alive():
            return
        _, box, level = self._building
        self._building = None
        if box:  # empty: the build raised (threading logged it); the tail still answers
            self._install(level, box[0])

    def _install(self, level: str, segment: _Segment) -> None:
        if level == "small":
            self.small = segment
            return
        self.large, self.small = segment, None  # the large build covered the small one too
        # Drop what lies before it (keeping the sentinel before its first token): nothing
        # refers to that any more. Only when it is worth a copy.
        keep = segment.lo - 1 - self.offset
        if keep > len(self.buf) // 4:
            used = self.end - self.offset
            fresh = np.full(max(2 * (used - keep) + 1, 1024), _SENTINEL, dtype=np.int32)
            fresh[: used - keep] = self.buf[keep:used]
            self.buf, self.offset = fresh, self.offset + keep

    def clear(self) -> None:
        self.buf = np.full(1024, _SENTINEL, dtype=np.int32)
        self.offset = 0
        self.end = self.start = 1
        self.large = self.small = None
        self._building = None

    @property
    def nbytes(self) -> int:
        """The buffer, the segments, and a finished build not swapped in yet."""
        size = self.buf.nbytes
        for segment in (self.large, self.small):
            if segment is not None:
                size += segment.nbytes
        if self._building is not None and self._building[1]:
            size += self._building[1][0].nbytes
        return int(size)

    # -- matching -------------------------------------------------------------------------

    def last(self, n: int) -> np.ndarray:
        """The last n tokens (fewer if there are fewer), as int64."""
        i = self.end - self.offset
        return self.buf[max(i - n, 1) : i].astype(np.int64)

    def match(self, rev: np.ndarray, min_match: int, max_candidates: int) -> tuple[int, np.ndarray]:
        """Longest suffix match of the context (given reversed: rev[0] is its last token).

        Returns (L, candidate absolute positions, most recent first); L = 0 for no match."""
        if len(rev) < min_match:
            return 0, np.empty(0, dtype=np.int64)
        pattern = rev.tolist()
        results = [
            self._match_segment(segment, pattern, min_match, max_candidates)
            for segment in (self.large, self.small)
            if segment is not None
        ]
        results.append(self._match_tail(rev, min_match, max_candidates))
        best = max(r[0] for r in results)
        if best < min_match:
            return 0, np.empty(0, dtype=np.int64)
        parts = [r[1] for r in results if r[0] == best]
        cands = parts[0] if len(parts) == 1 else np.sort(np.concatenate(parts))[::-1]
        return best, cands[:max_candidates]

    def _live(self, pos: np.ndarray) -> np.ndarray:
        return pos if len(pos) == 0 or pos.min() > self.start else pos[pos > self.start]

    def _match_segment(
        self, seg: _Segment, pattern: list[int], min_match: int, max_candidates: int
    ) -> tuple[int, np.ndarray]:
        """Binary search for the reversed context among the sorted windows: the longest
        match is with one of the two entries beside where it would go, and every entry that
        shares L tokens with it is in the run of neighbours whose lcp is >= L."""
        none = (0, np.empty(0, dtype=np.int64))
        sa, n, m = seg.sa, len(seg.sa), len(pattern)
        if n == 0:
            return none
        buf, base = self.buf, seg.lo - self.offset  # buf index of entry j: sa[j] + base

        def window(j: int) -> list[int]:
            e = int(sa[j]) + base  # tokens buf[e - 1], buf[e - 2], ... (buf[0] is a sentinel)
            return buf[max(e - m, 0) : e][::-1].tolist()

        h = int(np.searchsorted(seg.heads, pattern[0]))
        if h == len(seg.heads) or seg.heads[h] != pattern[0]:
            return none  # no entry shares even the last token
        a, b = int(seg.head_starts[h]), int(seg.head_starts[h + 1])
        first_run = (a, b)
        while a < b:
            mid = (a + b) // 2
            if window(mid) < pattern:
                a = mid + 1
            else:
                b = mid
        best, at = 0, -1
        for j in (a - 1, a):
            if first_run[0] <= j < first_run[1]:
                w = window(j)
                common = 0
                while common < len(w) and w[common] == pattern[common]:
                    common += 1
                if common > best:
                    best, at = common, j
        lo, hi = at, at + 1
        for length in range(best, min_match - 1, -1):
            # Entries that share `length` tokens with the context; when all of them were
            # evicted, the longest live match is shorter (and lies in a wider run).
            lo, hi = _expand_left(seg.lcp, lo, length), _expand_right(seg.lcp, hi, length)
            live = self._live(sa[lo:hi].astype(np.int64) + seg.lo)
            if len(live):
                return length, _most_recent(live, max_candidates)
        return none

    def _match_tail(
        self, rev: np.ndarray, min_match: int, max_candidates: int
    ) -> tuple[int, np.ndarray]:
        """Brute force over the entries p in [covered, end)."""
        none = (0, np.empty(0, dtype=np.int64))
        lo = max(self.covered, self.start + 1, self.offset + 2)
        if self.end - lo <= 0:
            return none
        i0, i1 = lo - self.offset, self.end - self.offset
        buf = self.buf
        # p needs buf[p] real (a continuation); buf[p-1] == rev[0] makes buf[p-1] real too.
        mask = (buf[i0 - 1 : i1 - 1] == rev[0]) & (buf[i0:i1] >= 0)
        matched = 1
        if len(rev) >= 2:
            both = mask & (buf[i0 - 2 : i1 - 2] == rev[1])
            if both.any() or min_match >= 2:
                mask, matched = both, 2
        pos = np.flatnonzero(mask) + lo
        if len(pos) == 0:
            return none
        while len(pos) > _BLOCK and matched < len(rev):
            keep = buf[pos - self.offset - 1 - matched] == rev[matched]
            if not keep.any():
                break
            pos = pos[keep]
            matched += 1
        lengths = self._window_lengths(pos, rev, matched)
        best = int(lengths.max())
        return best, pos[lengths == best][::-1][:max_candidates]

    def _window_lengths(self, pos: np.ndarray, rev: np.ndarray, from_col: int) -> np.ndarray:
        """For entries `pos` known to match rev[:from_col], their full match length."""
        width = len(rev)
        if from_col >= width or len(pos) == 0:
            return np.full(len(pos), from_col, dtype=np.int64)
        cols = np.arange(from_col + 1, width + 1)  # read buf[p - 1 - column]
        idx = (pos - self.offset)[:, None] - cols[None, :]
        np.maximum(idx, 0, out=idx)  # buf[0] is a sentinel: reads before it never match
        equal = self.buf[idx] == rev[from_col:][None, :]
        return from_col + np.cumprod(equal, axis=1).sum(axis=1)

    # -- continuing -----------------------------------------------------------------------

    def continuation(
        self,
        cands: np.ndarray,
        match_len: int,
        max_len: int,
        min_token_prob: float,
        spec_factor: float,
    ) -> tuple[list[int], list[float]]:
        """The greedy most-frequent path after the candidates (most recent first)."""
        n = min(max_len, int(spec_factor * match_len + 1e-6))
        tokens: list[int] = []
        confidence: list[float] = []
        if n <= 0 or len(cands) == 0:
            return tokens, confidence
        idx = (cands - self.offset)[:, None] + np.arange(n)[None, :]
        np.minimum(idx, len(self.buf) - 1, out=idx)  # the buffer always ends in a sentinel
        rows = self.buf[idx]  # (candidates, n); -1 where a document (or the request) ends
        # Columns where every candidate agrees (and none has ended) cost nothing; the few
        # where they differ are counted in plain Python, cheaper than numpy at this size.
        unanimous = (rows[0] >= 0) & (rows == rows[0]).all(axis=0)
        alive = list(range(len(rows)))
        cum = 1.0
        for j in range(n):
            if len(alive) == 1:  # one candidate left: its document up to its end
                rest = rows[alive[0], j:]
                stop = int(np.argmin(rest >= 0)) if rest.min() < 0 else len(rest)
                tokens.extend(rest[:stop].tolist())
                confidence.extend([1.0] * stop)
                break
            if len(alive) == len(rows) and unanimous[j]:
                tokens.append(int(rows[0, j]))
                confidence.append(1.0)
                continue
            column = rows[:, j].tolist()
            votes = [column[i] for i in alive]
            counts = Counter(t for t in votes if t >= 0)
            if not counts:
                break
            top = max(counts.values())
            # Most votes; among equals, the token the most recent candidate saw.
            choice = next(t for t in votes if t >= 0 and counts[t] == top)
            conf = top / len(votes)
            if cum * conf < min_token_prob:
                break
            cum *= conf
            tokens.append(choice)
            confidence.append(conf)
            alive = [i for i, t in zip(alive, votes, strict=True) if t == choice]
        return tokens, confidence


def _most_recent(pos: np.ndarray, k: int) -> np.ndarray:
    if len(pos) > k:
        pos = pos[np.argpartition(pos, len(pos) - k)[len(pos) - k :]]
    return np.sort(pos)[::-1]


def _as_tokens(tokens: Sequence[int] | np.ndarray, what: str) -> np.ndarray:
    arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if len(arr) and (arr.min() < 0 or arr.max() >= _MAX_TOKEN_ID):
        raise ValueError(f"{what}: token ids must lie in [0, {_MAX_TOKEN_ID})")
    return arr


def _check_params(max_match: int, min_match: int) -> None:
    if min_match < 1:
        raise ValueError(f"min_match must be >= 1, got {min_match}")
    if max_match < min_match:
        raise ValueError(f"max_match ({max_match}) must be >= min_match ({min_match})")


# --------------------------------------------------------------------------- public API


class SuffixIndex:
    """Longest-suffix-match index over a bounded store of token documents (past requests).

    Thread-safe (one lock; `propose` takes it uncontended in the engine thread). Memory is
    bounded by `max_tokens`: 4 bytes per token of buffer plus 5 per sorted entry, with the
    small segment, the tail and evicted tokens not yet compacted as slack (see `nbytes`).
    """

    def __init__(
        self,
        max_tokens: int,
        *,
        max_match: int = 32,
        min_match: int = 2,
        max_candidates: int = 64,
        background: bool = True,
    ) -> None:
        _check_params(max_match, min_match)
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        if max_candidates < 1:
            raise ValueError(f"max_candidates must be >= 1, got {max_candidates}")
        self.max_tokens = max_tokens
        self.max_match = max_match
        self.min_match = min_match
        self.max_candidates = max_candidates
        self._lock = threading.RLock()
        self._corpus = _Corpus(max_match, background=background, levels=2)
        self._docs: deque[tuple[int, int]] = deque()  # (absolute start, length), oldest first
        self._tokens = 0

    def add(self, tokens: Sequence[int]) -> None:
        """Add one document; the oldest documents go once the total passes `max_tokens`."""
        arr = _as_tokens(tokens, "add")
        with self._lock:
            self._append(arr)
            self._maintain()

    def add_many(self, documents: Sequence[Sequence[int] | np.ndarray]) -> None:
        """Add documents in order, then sort everything at once (loading a store): cheaper
        than one `add` each, and the first proposals do not scan a long tail."""
        arrays = [_as_tokens(doc, "add_many") for doc in documents]
        with self._lock:
            for arr in arrays:
                self._append(arr)
            self._corpus.rebuild_all()

    def _append(self, arr: np.ndarray) -> None:
        if len(arr) == 0:
            return
        if len(arr) > self.max_tokens:
            arr = arr[-self.max_tokens :]  # a document longer than the bound keeps its end
        corpus = self._corpus
        self._docs.append((corpus.end, len(arr)))
        corpus.append(np.append(arr, _SENTINEL).astype(np.int32))
        self._tokens += len(arr)
        while self._tokens > self.max_tokens:
            _, length = self._docs.popleft()
            self._tokens -= length
        corpus.start = self._docs[0][0]

    def propose(
        self,
        context: Sequence[int],
        max_len: int,
        *,
        min_token_prob: float = 0.1,
        spec_factor: float = 1.0,
    ) -> HistoryProposal | None:
        """The continuation of the context's longest suffix match in the history, or None."""
        tail = context[-self.max_match :] if len(context) > self.max_match else context
        rev = _as_tokens(tail, "propose")[::-1]
        return self._propose_rev(rev, max_len, min_token_prob, spec_factor)

    def _propose_rev(
        self, rev: np.ndarray, max_len: int, min_token_prob: float, spec_factor: float
    ) -> HistoryProposal | None:
        rev = rev[: self.max_match]
        if max_len <= 0 or len(rev) < self.min_match:
            return None
        with self._lock:
            corpus = self._corpus
            self._maintain()
            if not self._docs:
                return None
            match_len, cands = corpus.match(rev, self.min_match, self.max_candidates)
            if not match_len:
                return None
            tokens, confidence = corpus.continuation(
                cands, match_len, max_len, min_token_prob, spec_factor
            )
        if not tokens:
            return None
        return HistoryProposal(tuple(tokens), tuple(confidence), match_len, "history")

    def clear(self) -> None:
        with self._lock:
            self._corpus.clear()
            self._docs.clear()
            self._tokens = 0

    def wait(self) -> None:
        """Finish a background rebuild of the sorted segment (tests, benches, after a load)."""
        with self._lock:
            self._corpus.wait()

    def rebuild(self) -> None:
        """Sort everything into one segment now, synchronously: after loading a store, so
        that the first proposals do not scan a long tail."""
        with self._lock:
            self._corpus.rebuild_all()

    def _maintain(self) -> None:
        self._corpus.maybe_rebuild(_TAIL, max(4 * _TAIL, self.max_tokens // 8))

    @property
    def tokens(self) -> int:
        return self._tokens

    @property
    def documents(self) -> int:
        return len(self._docs)

    @property
    def nbytes(self) -> int:
        """Memory held: the token buffer, the sorted segment (and a finished build waiting to
        be swapped in), and the document list's Python objects."""
        with self._lock:
            size = self._corpus.nbytes + sys.getsizeof(self._docs)
            if self._docs:
                # Every entry is a tuple of two ints; ints below 2**30 are 28 bytes each.
                size += len(self._docs) * (sys.getsizeof((0, 0)) + 2 * sys.getsizeof(2**29))
            return int(size)


class RequestHistory:
    """What the engine holds for one generation: a prompt-lookup index over the request's own
    prompt and output so far, plus the shared SuffixIndex of past requests (may be None)."""

    def __init__(
        self,
        prompt: Sequence[int],
        index: SuffixIndex | None,
        *,
        max_match: int = 32,
        min_match: int = 2,
        max_candidates: int = 64,
    ) -> None:
        _check_params(max_match, min_match)
        self.index = index
        self.max_match = max_match
        self.min_match = min_match
        self.max_candidates = max_candidates
        self._own = _Corpus(max_match, background=False, levels=1)
        self._own.append(_as_tokens(prompt, "prompt").astype(np.int32))
        self._maintain()

    def extend(self, tokens: Sequence[int]) -> None:
        """Tokens the target just emitted (accepted proposals + the correction)."""
        arr = _as_tokens(tokens, "extend")
        if len(arr):
            self._own.append(arr.astype(np.int32))
            self._maintain()

    def _maintain(self) -> None:
        # Sort the request's tokens only when the scan would be long (prompts past ~16k
        # tokens), and again each time they double: a few ms per sort, a few per request.
        own = self._own
        own.maybe_rebuild(max(4 * _TAIL, own.covered - own.start), 0)

    @property
    def tokens(self) -> int:
        """Prompt plus output so far."""
        return self._own.end - 1

    def proposals(
        self, max_len: int, *, min_token_prob: float = 0.1, spec_factor: float = 1.0
    ) -> list[HistoryProposal]:
        """The request's own match's continuation (source "prompt"), then the history's
        ("history"), each where there is one. The controller prices them apart: the two are
        not equally reliable at the same match length (a long match into a past request of the
        same template often continues with another topic's text)."""
        if max_len <= 0:
            return []
        width = max(self.max_match, self.index.max_match if self.index is not None else 0)
        rev = self._own.last(width)[::-1]
        found = []
        if len(rev) >= self.min_match:
            match_len, cands = self._own.match(
                rev[: self.max_match], self.min_match, self.max_candidates
            )
            if match_len:
                tokens, confidence = self._own.continuation(
                    cands, match_len, max_len, min_token_prob, spec_factor
                )
                if tokens:
                    found.append(
                        HistoryProposal(tuple(tokens), tuple(confidence), match_len, "prompt")
                    )
        if self.index is not None:
            past = self.index._propose_rev(rev, max_len, min_token_prob, spec_factor)
            if past is not None:
                found.append(past)
        return found
