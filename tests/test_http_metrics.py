"""Prometheus /metrics: parsed with prometheus_client's own parser, after a known sequence of
requests over both transports, every counter agrees with what the Stats RPC and the requests'
own summaries reported."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest
from helpers.daemons import local_daemon, wait_until
from helpers.http import one, open_stream, read_until, scrape, total
from speclora.shared.pb import speclora_pb2 as pb


def test_metrics_agree_with_stats_after_known_requests(
    tiny_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    # self:4 of the 4-layer target is the target: at T = 0 every proposal is accepted.
    d = local_daemon(
        tmp_path,
        {"models": {"target": str(tiny_paths[0]), "draft": "self:4"}},
        learning=False,
    )
    try:
        address = d.server.http_address
        api = openai.OpenAI(base_url=f"http://{address}/v1", api_key="x", max_retries=0)
        empty = scrape(address)
        assert total(empty, "speclora:spec_decode_num_drafts_total") == 0
        assert one(empty, "speclora:request_success_total", finished_reason="length") == 0

        summaries = []  # (mode, prompt, completion, proposed, accepted, ttft) per request
        chat = api.chat.completions.create(
            model="speclora",
            messages=[{"role": "user", "content": "Count the stars."}],
            max_tokens=8,
            extra_body={"draft_tokens": 2},
        )
        summaries.append(_from_http(chat.usage, chat.model_extra))
        streamed = list(
            api.completions.create(
                model="speclora",
                prompt="The river",
                max_tokens=7,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        final = next(c for c in streamed if c.choices and c.choices[0].finish_reason)
        summaries.append(_from_http(streamed[-1].usage, final.model_extra))
        fast = api.completions.create(
            model="speclora", prompt="A fast one", max_tokens=6, extra_body={"mode": "fast"}
        )
        summaries.append(_from_http(fast.usage, fast.model_extra))
        events = list(d.stub.Generate(pb.GenerateRequest(prompt="Over gRPC", max_tokens=5)))
        s = events[-1].summary
        summaries.append(
            ("detailed", s.prompt_tokens, s.completion_tokens, s.proposed, s.accepted,
             s.time_to_first_token_s)
        )  # fmt: skip
        # And one the client abandons midway.
        cancelled_tokens = _abandon_a_stream(address)
        wait_until(lambda: d.worker.stats.snapshot().requests_cancelled == 1, what="cancelled")

        m = scrape(address)
        stats = next(iter(d.stub.Stats(pb.StatsRequest(), timeout=10)))
        prompt = sum(x[1] for x in summaries)
        completion = sum(x[2] for x in summaries)
        proposed = sum(x[3] for x in summaries)
        accepted = sum(x[4] for x in summaries)
        traced = sum(x[4] for x in summaries if x[0] == "detailed")
        assert proposed > 0 and accepted == proposed  # the target drafting for itself

        assert one(m, "speclora:prompt_tokens_total") == stats.prompt_tokens_total == prompt
        assert one(m, "speclora:generation_tokens_total") == stats.tokens_total
        assert stats.tokens_total >= completion + cancelled_tokens > completion
        # Summed over the proposers (the model draft and the history drafter) ...
        assert total(m, "speclora:spec_decode_num_draft_tokens_total") == proposed
        assert total(m, "speclora:spec_decode_num_accepted_tokens_total") == accepted
        # ... and each proposer's figure is the Stats RPC's.
        for source in ("draft", "history"):
            assert one(m, "speclora:spec_decode_num_draft_tokens_total", source=source) == getattr(
                stats, f"{source}_proposed"
            )
            assert one(
                m, "speclora:spec_decode_num_accepted_tokens_total", source=source
            ) == getattr(stats, f"{source}_accepted")
        assert stats.acceptance_lifetime == pytest.approx(accepted / proposed)
        per_pos = m["speclora:spec_decode_num_accepted_tokens_per_pos_total"]
        positions = sorted(int(dict(k)["position"]) for k in per_pos)
        assert positions == list(range(len(positions))) and len(positions) >= 2
        assert sum(per_pos.values()) == traced  # fast mode traces no steps
        drafts = total(m, "speclora:spec_decode_num_drafts_total")
        # Every model-draft step accepted its first proposal (the draft is the target).
        assert one(m, "speclora:spec_decode_num_drafts_total", source="draft") == one(
            m,
            "speclora:spec_decode_num_accepted_tokens_per_pos_total",
            source="draft",
            position="0",
        )
        assert 0 < drafts < traced

        assert one(m, "speclora:request_success_total", finished_reason="length") == 4
        assert one(m, "speclora:request_success_total", finished_reason="cancelled") == 1
        assert stats.requests_total == 4
        assert one(m, "speclora:time_to_first_token_seconds_count") == 4
        assert one(m, "speclora:time_to_first_token_seconds_sum") == pytest.approx(
            sum(x[5] for x in summaries), rel=1e-6
        )
        assert one(m, "speclora:time_to_first_token_seconds_bucket", le="+Inf") == 4
        assert one(m, "speclora:e2e_request_latency_seconds_count") == 4
        assert one(m, "speclora:num_requests_running") == stats.requests_active == 0
        assert one(m, "speclora:num_requests_waiting") == stats.queue_depth == 0
        assert one(m, "speclora:adapter_info", version="base") == 1
        model = next(iter(m["speclora:model_info"]))
        assert dict(model)["target"] == stats.target_model == "tiny-target"
        assert dict(model)["blas"] == stats.blas_name
        assert one(m, "speclora:resident_memory_bytes") > 0
        assert one(m, "speclora:weight_bytes") == stats.weight_bytes
        for outcome in ("promoted", "rejected", "failed", "cancelled"):
            assert one(m, "speclora:training_runs_total", outcome=outcome) == 0
    finally:
        d.close()


def _from_http(usage: object, extra: dict) -> tuple:
    ext = extra["speclora"]
    return (
        ext["mode"],
        usage.prompt_tokens,  # type: ignore[attr-defined]
        usage.completion_tokens,  # type: ignore[attr-defined]
        ext["proposed"],
        ext["accepted"],
        ext["time_to_first_token_s"],
    )


def _abandon_a_stream(address: str) -> int:
    """Start a long stream, read a few tokens, hang up; the tokens it had seen."""
    with open_stream(address, {"prompt": "Go on", "max_tokens": 2000, "stream": True}) as sock:
        data = b""
        while data.count(b"token_ids") < 3:
            data += read_until(sock, b"token_ids", 10)
    seen = 0
    for line in data.split(b"\n"):
        if not line.startswith(b"data: {"):
            continue  # chunk sizes, blank lines
        try:
            chunk = json.loads(line.removeprefix(b"data: "))
        except ValueError:  # the last line, cut off
            continue
        seen += len(chunk["speclora"]["token_ids"])
    assert seen > 0
    return seen
