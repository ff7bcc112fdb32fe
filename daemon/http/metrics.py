"""Prometheus /metrics, in vLLM's and llama.cpp's names under a `speclora:` prefix.

Nothing is counted here: every number is read from the snapshot the Stats RPC reports (the
worker's StatsTracker plus the daemon's state), at scrape time, so /metrics and Stats agree.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from speclora.daemon.stats import HistogramSnapshot, StatsSnapshot

PREFIX = "speclora:"
# Our finish reasons, each counted even at zero so that rate() works from the first scrape.
FINISH_REASONS = ("eos", "stop_string", "length", "cancelled")
TRAINING_OUTCOMES = ("promoted", "rejected", "failed", "cancelled")


def render_metrics(snapshot: StatsSnapshot) -> bytes:
    """The text exposition format of one snapshot."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_SnapshotCollector(snapshot))
    return generate_latest(registry)


class _SnapshotCollector(Collector):
    def __init__(self, snapshot: StatsSnapshot) -> None:
        self.s = snapshot

    def collect(self) -> Iterator[Metric]:
        s, c = self.s, self.s.counters
        # vLLM's spec_decode counters, with a `source` label: the model draft or the history
        # drafter (sum over it for vLLM's figure).
        yield _by_source(
            "spec_decode_num_drafts", "Speculative steps (detailed mode), by proposer.", c.drafts
        )
        yield _by_source(
            "spec_decode_num_draft_tokens",
            "Tokens proposed (finished requests), by proposer.",
            c.proposed,
        )
        yield _by_source(
            "spec_decode_num_accepted_tokens",
            "Proposed tokens the target accepted, by proposer.",
            c.accepted,
        )
        per_pos = CounterMetricFamily(
            PREFIX + "spec_decode_num_accepted_tokens_per_pos",
            "Speculative steps whose proposal at this position was accepted, by proposer.",
            labels=["source", "position"],
        )
        for source, counts in c.accepted_per_position:
            for position, n in enumerate(counts):
                per_pos.add_metric([source, str(position)], n)
        yield per_pos
        yield _gauge("history_tokens", "Past requests' tokens the history holds.", s.history.tokens)
        yield _gauge("history_bytes", "Memory the history's index takes.", s.history.bytes)

        finished = CounterMetricFamily(
            PREFIX + "request_success",
            "Requests by how they finished (client cancellations included).",
            labels=["finished_reason"],
        )
        reasons = dict(c.finish_reasons)
        for reason in (*FINISH_REASONS, *sorted(set(reasons) - set(FINISH_REASONS))):
            finished.add_metric([reason], reasons.get(reason, 0))
        yield finished
        yield _counter(
            "prompt_tokens", "Prompt tokens of finished requests.", s.prompt_tokens_total
        )
        yield _counter(
            "prompt_tokens_cached",
            "Of those, tokens whose KV came from the prompt cache.",
            s.prompt_tokens_cached,
        )
        yield _counter(
            "generation_tokens", "Completion tokens (cancelled requests included).", s.tokens_total
        )
        yield _histogram(
            "time_to_first_token_seconds", "Time to first token.", c.time_to_first_token
        )
        yield _histogram(
            "e2e_request_latency_seconds", "Request duration in the engine.", c.request_duration
        )
        yield _gauge("num_requests_running", "Generations in the engine.", s.requests_active)
        yield _counter(
            "model_forwards",
            "Model forwards the worker ran for generations (batched or alone).",
            c.model_forwards,
        )
        yield _counter(
            "model_forward_rows",
            "Generations' passes those forwards carried (rows / forwards: the mean batch).",
            c.model_forward_rows,
        )
        yield _counter(
            "model_forward_tokens", "Tokens those forwards ran over.", c.model_forward_tokens
        )
        yield _gauge("num_requests_waiting", "Generations queued for a slot.", s.queue_depth)

        runs = CounterMetricFamily(
            PREFIX + "training_runs", "Training runs by outcome.", labels=["outcome"]
        )
        outcomes = {outcome: n for task, outcome, n in c.task_runs if task == "training"}
        for outcome in (*TRAINING_OUTCOMES, *sorted(set(outcomes) - set(TRAINING_OUTCOMES))):
            runs.add_metric([outcome], outcomes.get(outcome, 0))
        yield runs
        yield _gauge(
            "training_running", "1 while a training run is going.", s.training_state == "running"
        )
        yield _gauge("failure_cases", "Failure cases stored.", s.failure_cases)
        yield _gauge("failure_cases_pending", "Cases since the last training run.", s.pending_cases)

        adapter = InfoMetricFamily(PREFIX + "adapter", "The draft's active adapter version.")
        adapter.add_metric([], {"version": s.adapter_version or "base"})
        yield adapter
        model = InfoMetricFamily(PREFIX + "model", "The served pair and how it runs.")
        model.add_metric(
            [],
            {
                "target": s.target_model,
                "draft": s.draft_model,
                "blas": s.blas,
                "blas_skinny_rows": str(s.blas_skinny_rows),
                "version": s.version,
            },
        )
        yield model
        yield _gauge("resident_memory_bytes", "Resident memory of the daemon.", s.rss_bytes)
        yield _gauge("peak_resident_memory_bytes", "Peak resident memory.", s.peak_rss_bytes)
        yield _gauge(
            "weight_bytes",
            "Target + draft weights, adapter and draft head included (shared arrays once).",
            s.weight_bytes,
        )
        yield _gauge(
            "prompt_cache_bytes", "KV caches the prompt cache holds.", s.prompt_cache_bytes
        )
        yield _gauge("uptime_seconds", "Seconds since the daemon started.", s.uptime_s)


def _by_source(name: str, doc: str, values: Sequence[tuple[str, int]]) -> CounterMetricFamily:
    family = CounterMetricFamily(PREFIX + name, doc, labels=["source"])
    for source, value in values:
        family.add_metric([source], value)
    return family


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(PREFIX + name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(PREFIX + name, doc, value=float(value))


def _histogram(name: str, doc: str, h: HistogramSnapshot) -> HistogramMetricFamily:
    cumulative, running = [], 0
    for bound, n in zip((*h.bounds, float("inf")), h.counts, strict=True):
        running += n
        cumulative.append((_bucket_label(bound), running))
    return HistogramMetricFamily(PREFIX + name, doc, buckets=cumulative, sum_value=h.sum)


def _bucket_label(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
