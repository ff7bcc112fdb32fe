"""The web page (GET /) and the JSON it reads, which other tools may read too.

- `GET /` and `GET /page/<file>`: the page's static files, package data under
  daemon/http/page/ (no build step, nothing fetched from elsewhere; a Content-Security-Policy
  tells the browser so).
- `GET /api/stats`: the Stats RPC's snapshot as JSON, its fields named as the proto names them
  (enums as their short lower-case names), plus what the page's "Now" panel shows that the RPC
  does not carry (device, auto-train state).
- `GET /api/timeline[?since=N]`: the bounded per-request points and the training runs
  (daemon.timeline), for the learning chart; `since` returns only points after seq N.

No framework objects here beyond the response types: plain data in, dicts and bytes out.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from importlib import resources
from typing import Any

from speclora.daemon.stats import StatsSnapshot
from speclora.daemon.timeline import Timeline
from speclora.shared.config import Config

# The page's files: name -> media type. Nothing else under page/ is served.
ASSETS = {
    "index.html": "text/html; charset=utf-8",
    "page.css": "text/css; charset=utf-8",
    "page.js": "text/javascript; charset=utf-8",
}
# The page may load and connect to this server only: no CDN, no other origin, no framing.
PAGE_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


@functools.cache
def asset(name: str) -> bytes:
    """One of the page's files, read from the installed package."""
    return resources.files("speclora.daemon.http").joinpath("page", name).read_bytes()


def stats_json(snap: StatsSnapshot) -> dict[str, Any]:
    """The Stats RPC's StatsSnapshot as JSON: the proto's field names, enums by short name."""
    s, h = snap.sources, snap.history
    return {
        "target_model": snap.target_model,
        "draft_model": snap.draft_model,
        "adapter_version": snap.adapter_version,
        "uptime_s": snap.uptime_s,
        "requests_total": snap.requests_total,
        "requests_active": snap.requests_active,
        "tokens_total": snap.tokens_total,
        "prompt_tokens_total": snap.prompt_tokens_total,
        "prompt_tokens_cached": snap.prompt_tokens_cached,
        "acceptance_lifetime": snap.acceptance_lifetime,
        "acceptance_recent": snap.acceptance_recent,
        "acceptance_history": list(snap.acceptance_history),
        "per_adapter": [
            {
                "adapter_version": a.adapter_version,
                "requests": a.requests,
                "proposed": a.proposed,
                "accepted": a.accepted,
                "acceptance_rate": a.acceptance_rate,
            }
            for a in snap.per_adapter
        ],
        "tokens_per_second_recent": snap.tokens_per_second_recent,
        "failure_cases": snap.failure_cases,
        "pending_cases": snap.pending_cases,
        "training_state": snap.training_state,
        "queue_depth": snap.queue_depth,
        "rss_bytes": snap.rss_bytes,
        "peak_rss_bytes": snap.peak_rss_bytes,
        "weight_bytes": snap.weight_bytes,
        "prompt_cache_bytes": snap.prompt_cache_bytes,
        "blas": snap.blas,
        "blas_skinny_rows": snap.blas_skinny_rows,
        "version": snap.version,
        "default_mode": snap.default_mode,
        "pid": os.getpid(),
        "failure_store_error": snap.failure_store_error,
        "draft_proposed": s.draft_proposed,
        "draft_accepted": s.draft_accepted,
        "history_proposed": s.history_proposed,
        "history_accepted": s.history_accepted,
        "draft_acceptance_recent": s.draft_acceptance_recent,
        "history_acceptance_recent": s.history_acceptance_recent,
        "history_tokens": h.tokens,
        "history_documents": h.documents,
        "history_bytes": h.bytes,
        "auto_train": snap.auto_train.enabled,
        "auto_train_state": snap.auto_train.state,
        "auto_train_idle_s": snap.auto_train.idle_s,
        "auto_train_min_new_cases": snap.auto_train.min_new_cases,
        "auto_train_runs": snap.auto_train.runs,
        "last_training": dataclasses.asdict(snap.last_training) if snap.last_training else None,
        "training_slice_max_s": snap.training_slice_max_s,
        "idle_s": snap.idle_s,
    }


def extras_json(config: Config, snap: StatsSnapshot, idle_s: float) -> dict[str, Any]:
    """What the page's "Now" panel shows beside the snapshot: where MLX computes, and when the
    daemon would train by itself (learning.auto_train)."""
    learning = config.learning
    waiting_for = []
    enabled = snap.auto_train.enabled  # the daemon's own word (an auto-trainer is running)
    if enabled:
        if snap.training_state == "running":
            waiting_for.append("the running training run")
        if snap.pending_cases < learning.auto_train_min_new_cases:
            waiting_for.append(
                f"{learning.auto_train_min_new_cases - snap.pending_cases} more new failure cases"
            )
        if snap.failure_cases < learning.min_cases:
            waiting_for.append(f"{learning.min_cases} failure cases in all")
        if idle_s < learning.auto_train_idle_s:
            waiting_for.append(f"{learning.auto_train_idle_s - idle_s:.0f} s more idle")
    return {
        "device": device(),
        "cpu_count": os.cpu_count() or 0,
        "memory_total_bytes": memory_total(),
        "speculation_mode": config.speculation.mode,
        "auto_train": {
            "enabled": enabled,
            "state": snap.auto_train.state,
            "idle_s": idle_s,
            "idle_s_required": learning.auto_train_idle_s,
            "min_new_cases": learning.auto_train_min_new_cases,
            "min_cases": learning.min_cases,
            "waiting_for": waiting_for,
        },
    }


def timeline_json(timeline: Timeline, since: int = 0) -> dict[str, Any]:
    points, runs, last = timeline.snapshot(since)
    return {
        "max_requests": timeline.max_requests,
        "last_seq": last,
        "requests": [p.to_json() for p in points],
        "training_runs": [r.to_json() for r in runs],
    }


@functools.cache
def device() -> str:
    """Where MLX computes: "gpu (Metal)", "gpu (CUDA)" or "cpu"."""
    try:
        import mlx.core as mx
    except ImportError:
        return "unknown"
    if mx.metal.is_available():
        return "gpu (Metal)"
    cuda = getattr(mx, "cuda", None)
    if cuda is not None and cuda.is_available():
        return "gpu (CUDA)"
    return "cpu"


@functools.cache
def memory_total() -> int:
    """The machine's memory, bytes (0 where unknown)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0
