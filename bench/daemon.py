"""Daemon overhead, batching and fairness: tokens/s through the daemon against the engine
in-process, and N concurrent clients against one, with the active generations' target passes
batched (the default) and, beside it, a second daemon with `server.batch_passes: false`.

Per round, on the same prompts at T = 0 (identical work each time):
  a. in-process: the engine driven directly in this process (no gRPC, no worker), bound to
     the hub as the daemon binds it (prompt cache, acceptance memory);
  b. daemon, 1 client: a `speclora serve` subprocess, prompts one after another; the same on
     the unbatched daemon. a and b run prompt by prompt: each prompt on the three in turn, the
     order rotating, and their ratios come with the spread of these per-prompt pairs;
  c. daemon, N clients (each N of --clients): N threads each sending every prompt (rotated
     order) at once; the first N also on the unbatched daemon and over HTTP;
  d. the same scaling at the defaults (adaptive K: the controller picks each request's K,
     priced as a row of the shared forward), 1 client and each N, requests not recorded (so
     the history stays the same from round to round). A fixed K makes every row speculate
     whether or not it pays; this is what a user's clients get.
The concurrent phases (c, d) run in an order that rotates from round to round.
Rounds alternate the phases so load drift on a shared machine hits all of them alike. The
memory figure is the batched daemon's after its largest N.
Rates are completion tokens over wall time measured by the caller (prefill included).

Then the two transports on the same requests: each prompt streamed over gRPC (the stub) and
over the HTTP API (POST /v1/chat/completions, stream: true, read as SSE by http.client), in
alternating order (gRPC first, then HTTP first), so drift and the prompt cache treat both
alike. Per pair: HTTP tokens/s over gRPC's, and HTTP's time to first token minus gRPC's, both
measured by the client (to the first text).

Then the prompt cache, in-process: a multi-turn chat where each turn re-sends the conversation,
every turn run twice back to back, with the prompt cache and without; time to first token
compared turn by turn, outputs checked identical.

    .venv/bin/python bench/daemon.py                 # the embedded SmolLM2 pair (minutes)
    .venv/bin/python bench/daemon.py --smoke         # tiny random models (seconds)
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import speclora.daemon.blas  # (imported first: OpenBLAS before mlx)
import speclora.daemon.cpu_attention
from speclora.client.stub import DaemonNotRunning, GenerationSummary, SpecLoRAClient
from speclora.daemon.engine import ChatTurn, GenerationRequest, PromptCache
from speclora.daemon.engine import GenerationSummary as EngineSummary
from speclora.daemon.engine.draft_vocab import model_parts
from speclora.daemon.runtime import build_hub
from speclora.daemon.state import ModelHub
from speclora.daemon.worker import engine_generate
from speclora.shared.config import Config, load_config
from speclora.shared.logging import configure_logging

CHAT = (
    "Tell me about the history of the printing press.",
    "Who was Johannes Gutenberg?",
    "What changed in Europe after his invention?",
    "Which later inventions spread ideas even faster?",
    "Sum up our conversation in two sentences.",
)

PROMPTS = (
    "Explain quantum computing simply.",
    "Write a haiku about the sea.",
    "What is the capital of France, and why is it famous?",
    "Give three tips for writing clean Python code.",
)


@dataclass
class Phase:
    tokens: int = 0
    seconds: float = 0.0
    per_client: list[float] = field(default_factory=list)  # tokens/s of each client (phase c)

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0


def in_process(
    hub: ModelHub, config: Config, prompts: list[str], max_tokens: int, k: int | None
) -> Phase:
    phase = Phase()
    for prompt in prompts:
        request = GenerationRequest(
            prompt=prompt, max_tokens=max_tokens, draft_tokens=k, record=False
        )
        start = time.perf_counter()
        for event in engine_generate(config.speculation)(hub, request, None):
            if isinstance(event, EngineSummary):
                phase.tokens += event.completion_tokens
        phase.seconds += time.perf_counter() - start
    return phase


def chat_turns(hub: ModelHub, config: Config, max_tokens: int, k: int | None) -> list[dict]:
    """Each turn of CHAT twice, back to back: with a prompt cache, then without one."""
    spec = config.speculation
    cache = PromptCache(spec.prompt_cache_entries, spec.prompt_cache_mb << 20)
    turns: list[ChatTurn] = []
    rows = []
    for question in CHAT:
        turns.append(ChatTurn("user", question))
        request = GenerationRequest(
            messages=tuple(turns), max_tokens=max_tokens, draft_tokens=k, record=False
        )
        cached, fresh = (
            list(engine_generate(spec)(dataclasses.replace(hub, prompt_cache=c), request, None))[-1]
            for c in (cache, None)
        )
        rows.append(
            {
                "prompt_tokens": cached.prompt_tokens,
                "cached_prompt_tokens": cached.cached_prompt_tokens,
                "ttft_cached_s": cached.time_to_first_token_s,
                "ttft_fresh_s": fresh.time_to_first_token_s,
                "identical": cached.completion_token_ids == fresh.completion_token_ids,
            }
        )
        reply = hub.tokenizer.decode(list(cached.completion_token_ids))
        turns.append(ChatTurn("assistant", reply))
    return rows


def client_phase(
    client: SpecLoRAClient, prompts: list[str], max_tokens: int, k: int | None, record: bool
) -> Phase:
    phase = Phase()
    start = time.perf_counter()
    for prompt in prompts:
        for event in client.generate(
            prompt, max_tokens=max_tokens, temperature=0.0, draft_tokens=k, record=record
        ):
            if isinstance(event, GenerationSummary):
                phase.tokens += event.completion_tokens
    phase.seconds = time.perf_counter() - start
    return phase


def run_client(
    address: str, prompts: list[str], max_tokens: int, k: int | None, record: bool = False
) -> tuple[int, float]:
    with SpecLoRAClient(address) as client:
        phase = client_phase(client, prompts, max_tokens, k, record)
        return phase.tokens, phase.seconds


def single_streams(
    hub: ModelHub,
    config: Config,
    addresses: dict[str, str],
    prompts: list[str],
    max_tokens: int,
    k: int | None,
    round_index: int,
) -> dict[str, list[Phase]]:
    """One stream at a time, prompt by prompt: the in-process engine and each daemon
    (`addresses`: phase name -> address) run the same prompt in turn, the order rotating from
    one prompt to the next, so a burst of load on this shared machine lands on one pair of
    prompts, not on one side of a ratio. Returns one Phase per prompt for each name."""
    names = ["in_process", *addresses]
    runs: dict[str, list[Phase]] = {name: [] for name in names}
    clients = {name: SpecLoRAClient(address) for name, address in addresses.items()}
    try:
        for i, prompt in enumerate(prompts):
            shift = (round_index * len(prompts) + i) % len(names)
            for name in names[shift:] + names[:shift]:
                if name == "in_process":
                    runs[name].append(in_process(hub, config, [prompt], max_tokens, k))
                else:
                    runs[name].append(
                        client_phase(clients[name], [prompt], max_tokens, k, record=False)
                    )
    finally:
        for client in clients.values():
            client.close()
    return runs


def run_http_client(
    address: tuple[str, int], prompts: list[str], max_tokens: int, k: int | None
) -> tuple[int, float]:
    """run_client's work over the HTTP API (streamed chat completions)."""
    tokens, seconds = 0, 0.0
    for prompt in prompts:
        timed = http_stream(address, prompt, max_tokens, k)
        tokens, seconds = tokens + timed.tokens, seconds + timed.total_s
    return tokens, seconds


def concurrent(
    address: str | tuple[str, int],
    prompts: list[str],
    max_tokens: int,
    k: int | None,
    clients: int,
    record: bool = False,
) -> Phase:
    """`clients` threads at once, over gRPC (a socket address) or HTTP (a (host, port)).
    `record` (gRPC only): the requests teach the daemon's history, as a client's do by default."""
    results: list[tuple[int, float]] = [(0, 0.0)] * clients
    barrier = threading.Barrier(clients + 1)
    if isinstance(address, tuple):
        client = run_http_client
    else:
        client = functools.partial(run_client, record=record)

    def one(i: int) -> None:
        rotated = prompts[i % len(prompts) :] + prompts[: i % len(prompts)]
        barrier.wait()
        results[i] = client(address, rotated, max_tokens, k)  # type: ignore[arg-type]

    threads = [threading.Thread(target=one, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    barrier.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return Phase(
        tokens=sum(n for n, _ in results),
        seconds=wall,
        per_client=[n / s for n, s in results],
    )


@dataclass(frozen=True)
class Timed:
    tokens: int
    ttft_s: float  # request sent -> first text received
    total_s: float

    @property
    def rate(self) -> float:
        return self.tokens / self.total_s


def grpc_stream(client: SpecLoRAClient, prompt: str, max_tokens: int, k: int | None) -> Timed:
    start = time.perf_counter()
    first = None
    tokens = 0
    for event in client.generate(
        messages=[("user", prompt)], max_tokens=max_tokens, temperature=0.0, draft_tokens=k,
        record=False,
    ):  # fmt: skip
        if isinstance(event, GenerationSummary):
            tokens = event.completion_tokens
        elif first is None and event.text:
            first = time.perf_counter()
    end = time.perf_counter()
    return Timed(tokens, (first or end) - start, end - start)


def http_stream(address: tuple[str, int], prompt: str, max_tokens: int, k: int | None) -> Timed:
    """One streamed chat request on a fresh connection, connected before the clock starts
    (a kept-alive one is closed by the server after its keep-alive timeout, as uvicorn's 5 s,
    while the gRPC half of a pair runs)."""
    body = {
        "model": "speclora",
        "messages": [{"role": "user", "content": prompt}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "record": False,
    }
    if k is not None:
        body["draft_tokens"] = k
    conn = http.client.HTTPConnection(*address, timeout=600)
    conn.connect()
    start = time.perf_counter()
    conn.request(
        "POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"}
    )
    response = conn.getresponse()
    assert response.status == 200, response.read()
    first = None
    tokens = 0
    while True:
        line = response.readline()
        if not line or line == b"data: [DONE]\n":
            break
        if not line.startswith(b"data: "):
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            tokens = chunk["usage"]["completion_tokens"]
        elif first is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
            first = time.perf_counter()
    response.read()
    end = time.perf_counter()
    conn.close()
    return Timed(tokens, (first or end) - start, end - start)


def transports(
    address: str, http_address: str, prompts: list[str], max_tokens: int, k: int | None, rounds: int
) -> list[dict]:
    """Each prompt over both transports, back to back, the order alternating."""
    host, port = http_address.rsplit(":", 1)
    conn = (host.strip("[]"), int(port))
    pairs = []
    with SpecLoRAClient(address) as client:
        for prompt in prompts:  # warm up: each prompt's KV in the prompt cache for both
            grpc_stream(client, prompt, 4, k)
            http_stream(conn, prompt, 4, k)
        for r in range(rounds):
            for i, prompt in enumerate(prompts):
                grpc_first = (r + i) % 2 == 0
                if grpc_first:
                    g = grpc_stream(client, prompt, max_tokens, k)
                    h = http_stream(conn, prompt, max_tokens, k)
                else:
                    h = http_stream(conn, prompt, max_tokens, k)
                    g = grpc_stream(client, prompt, max_tokens, k)
                assert g.tokens == h.tokens, (g, h)  # the same work
                pairs.append(
                    {
                        "grpc_first": grpc_first,
                        "tokens": g.tokens,
                        "grpc_tokens_per_s": g.rate,
                        "http_tokens_per_s": h.rate,
                        "http_over_grpc": h.rate / g.rate,
                        "grpc_ttft_s": g.ttft_s,
                        "http_ttft_s": h.ttft_s,
                        "ttft_http_minus_grpc_ms": (h.ttft_s - g.ttft_s) * 1000,
                    }
                )
    return pairs


def spread(values: list[float]) -> dict[str, float]:
    """Median and the range around it (min, max) of paired measurements."""
    ordered = sorted(values)
    return {"median": statistics.median(ordered), "min": ordered[0], "max": ordered[-1]}


def kv_bytes_per_token(model) -> int:
    """Bytes one token adds to a model's KV cache (keys and values, every layer)."""
    args = model.args
    heads = args.num_attention_heads
    kv_heads = getattr(args, "num_key_value_heads", None) or heads
    head_dim = getattr(args, "head_dim", None) or args.hidden_size // heads
    itemsize = model.layers[0].self_attn.k_proj.weight.dtype.size
    return 2 * len(model.layers) * kv_heads * head_dim * itemsize


def memory_report(address: str, hub: ModelHub, clients: int, context_tokens: int) -> dict:
    """The daemon's RSS against weights + the KV caches the benchmark can have alive at once:
    one per client, and those the prompt cache keeps (as the daemon reports them).

    mlx-lm's KVCache grows in steps of 256 tokens, so that is the allocation counted."""
    with SpecLoRAClient(address) as client:
        snap = client.stats()
    step = 256
    allocated = -(-context_tokens // step) * step
    per_token = kv_bytes_per_token(hub.target)
    draft = hub.draft
    if draft is not None and not model_parts(draft).is_prefix_of(model_parts(hub.target)):
        per_token += kv_bytes_per_token(draft)  # else it runs on the target's cache
    kv = clients * allocated * per_token + snap.prompt_cache_bytes
    budget = snap.weight_bytes + kv
    return {
        "rss_bytes": snap.rss_bytes,
        "peak_rss_bytes": snap.peak_rss_bytes,
        "weight_bytes": snap.weight_bytes,
        "blas": snap.blas_label,
        "kv_cache_bytes": kv,
        "prompt_cache_bytes": snap.prompt_cache_bytes,
        "rss_over_weights_plus_kv": snap.rss_bytes / budget,
        "peak_rss_over_weights_plus_kv": snap.peak_rss_bytes / budget,
    }


def defaults_memory(
    address: str,
    hub: ModelHub,
    prompts: list[str],
    max_tokens: int,
    clients: int,
    context_tokens: int,
) -> dict:
    """Peak RSS after the same clients with the daemon's defaults (adaptive K, the history
    drafter, requests recorded) instead of a fixed K, twice: the second round's outputs are
    copies of the first's, so the history proposes up to history.max_proposal tokens per row,
    and a batch's verify logits are as wide as they get. (RSS peaks only rise: this one covers
    the run so far.)"""
    for _ in range(2):
        concurrent(address, prompts, max_tokens, None, clients, record=True)
    return memory_report(address, hub, clients, context_tokens)


def http_address_from_log(log: Path) -> str:
    """host:port of the HTTP API, from the daemon's daemon_ready log line."""
    for line in log.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and record.get("event") == "daemon_ready" and record["http"]:
            return record["http"].removeprefix("http://")
    raise SystemExit(f"the daemon logged no HTTP address; see {log}")


def start_daemon(env: dict[str, str], home: Path) -> tuple[subprocess.Popen[bytes], str]:
    log = open(home / "daemon.log", "ab")  # noqa: SIM115  (kept open for the child)
    proc = subprocess.Popen(
        [sys.executable, "-m", "speclora", "serve"], env=env, stdout=log, stderr=log
    )
    address = f"unix:{home / 'state' / 'run' / 'speclora.sock'}"
    deadline = time.monotonic() + 900
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"daemon exited; see {home / 'daemon.log'}")
        if time.monotonic() > deadline:
            raise SystemExit("daemon did not start")
        try:
            with SpecLoRAClient(address, connect_timeout=0.5) as client:
                if client.health() == "SERVING":
                    return proc, address
        except DaemonNotRunning:
            pass
        time.sleep(0.5)


def transport_results(pairs: list[dict]) -> dict:
    return {
        "transports": pairs,
        "http_over_grpc_tokens_per_s": spread([p["http_over_grpc"] for p in pairs]),
        "ttft_http_minus_grpc_ms": spread([p["ttft_http_minus_grpc_ms"] for p in pairs]),
    }


def print_transports(pairs: list[dict]) -> None:
    results = transport_results(pairs)
    rate, ttft = results["http_over_grpc_tokens_per_s"], results["ttft_http_minus_grpc_ms"]
    print(
        f"\nTransports, the same {len(pairs)} streamed chat requests over gRPC and HTTP (SSE), "
        "alternating order, client-side timing:\n"
    )
    print("| measure | median | min .. max | target |")
    print("|---|---:|---:|---:|")
    print(
        f"| HTTP tokens/s / gRPC tokens/s | {rate['median']:.3f} | {rate['min']:.3f} .. "
        f"{rate['max']:.3f} | >= 0.95 |"
    )
    print(
        f"| HTTP TTFT - gRPC TTFT (ms) | {ttft['median']:+.1f} | {ttft['min']:+.1f} .. "
        f"{ttft['max']:+.1f} | within 10 |"
    )
    grpc_rates = [p["grpc_tokens_per_s"] for p in pairs]
    http_rates = [p["http_tokens_per_s"] for p in pairs]
    print(
        f"| tokens/s, gRPC / HTTP (median) | {statistics.median(grpc_rates):.1f} / "
        f"{statistics.median(http_rates):.1f} | | |"
    )


def transports_only(
    env: dict[str, str], work: Path, prompts: list[str], args, k: int | None
) -> int:
    proc, address = start_daemon(env, work / "home")
    try:
        run_client(address, prompts[:1], 8, k)  # warm up the daemon
        http_address = http_address_from_log(work / "home" / "daemon.log")
        pairs = transports(address, http_address, prompts, args.max_tokens, k, args.rounds)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    results = {
        "target": env.get("SPECLORA_MODELS_TARGET", "configured"),
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "draft_tokens": "adaptive" if k is None else k,
        "load_average": os.getloadavg()[0],
        **transport_results(pairs),
        "targets": {"http_over_grpc_tokens_per_s": 0.95, "ttft_http_minus_grpc_ms": 10.0},
    }
    print(
        f"K={results['draft_tokens']}, {len(prompts)} prompts x {args.max_tokens} tokens, T=0, "
        f"{args.rounds} round(s), load average {results['load_average']:.1f} on "
        f"{os.cpu_count()} cores"
    )
    print_transports(pairs)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny random models, seconds")
    parser.add_argument("--target", help="models.target (default: the configured/embedded one)")
    parser.add_argument("--draft", help="models.draft (default: the configured one)")
    parser.add_argument("--max-tokens", type=int, default=64)
    # Two rounds left the 4-client figure anywhere in 1.70 .. 1.96 on this shared machine.
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument(
        "--clients", default="4,8", help="concurrent clients, comma-separated (e.g. 4,8)"
    )
    parser.add_argument(
        "--no-unbatched", action="store_true", help="skip the daemon without batching"
    )
    parser.add_argument(
        "--draft-tokens",
        type=int,
        default=2,
        help="fixed K for every run (-1 = adaptive; adaptive K depends on a cost ratio each "
        "process measures at start, so the two sides would not do identical work)",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--transports-only",
        action="store_true",
        help="only the gRPC vs HTTP comparison (no in-process engine, clients, memory, chat)",
    )
    args = parser.parse_args()
    configure_logging("warning", stream=sys.stderr)  # stdout is the table

    work = Path(tempfile.mkdtemp(prefix="speclora-bench-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPECLORA_MODELS_")}
    env["SPECLORA_HOME"] = str(work / "home")
    env["SPECLORA_SERVER_HTTP_ADDRESS"] = "127.0.0.1:0"  # a free port; read back from the log
    prompts = list(PROMPTS)
    if args.smoke:
        from speclora.daemon.tiny import write_tiny_pair

        target, _ = write_tiny_pair(work / "models")
        args.target, args.draft = str(target), args.draft or "self:2"
        args.max_tokens, args.rounds, prompts = min(args.max_tokens, 32), 1, prompts[:2]
    for key, value in (("TARGET", args.target), ("DRAFT", args.draft)):
        if value:
            env[f"SPECLORA_MODELS_{key}"] = value
    config = load_config(env=env)
    k = None if args.draft_tokens < 0 else args.draft_tokens
    (work / "home").mkdir(parents=True, exist_ok=True)

    if args.transports_only:
        return transports_only(env, work, prompts, args, k)
    counts = sorted({int(n) for n in str(args.clients).split(",") if n.strip()})
    if args.smoke:
        counts = counts[:1]
    hub = build_hub(config)
    in_process(hub, config, prompts[:1], 8, k)  # warm up MLX kernels
    proc, address = start_daemon(env, work / "home")
    plain_proc = plain_address = None
    try:
        if not args.no_unbatched:
            plain_env = {**env, "SPECLORA_HOME": str(work / "plain"),
                         "SPECLORA_SERVER_BATCH_PASSES": "false"}  # fmt: skip
            (work / "plain").mkdir()
            plain_proc, plain_address = start_daemon(plain_env, work / "plain")
            run_client(plain_address, prompts[:1], 8, k)
        run_client(address, prompts[:1], 8, k)  # warm up the daemon
        host, port = http_address_from_log(work / "home" / "daemon.log").rsplit(":", 1)
        http = (host.strip("[]"), int(port))
        phases: dict[str, list[Phase]] = {}
        singles: dict[str, list[Phase]] = {}  # per prompt, paired across the names
        streams = {"daemon": address}
        if plain_address is not None:
            streams["unbatched"] = plain_address
        for r in range(args.rounds):
            runs = single_streams(hub, config, streams, prompts, args.max_tokens, k, r)
            for name, per_prompt in runs.items():
                singles.setdefault(name, []).extend(per_prompt)
                phases.setdefault(name, []).append(
                    Phase(sum(p.tokens for p in per_prompt), sum(p.seconds for p in per_prompt))
                )
            # The concurrent phases, in an order that rotates from round to round: whichever
            # ran first read ~5% lower when 4 HTTP and 4 gRPC clients took turns on one daemon.
            multi: list[tuple[str, str | tuple[str, int], int, int | None]] = [
                (f"concurrent_{n}", address, n, k) for n in counts
            ]
            multi.append((f"http_{counts[0]}", http, counts[0], k))
            if plain_address is not None:
                multi.append((f"unbatched_{counts[0]}", plain_address, counts[0], k))
            # The same scaling with the controller choosing each request's K (the default):
            # a fixed K makes every row speculate whether or not it pays.
            if k is not None:
                multi += [(f"defaults_{n}", address, n, None) for n in [1, *counts]]
            shift = r % len(multi)
            for name, target, n, k_phase in multi[shift:] + multi[:shift]:
                phases.setdefault(name, []).append(
                    concurrent(target, prompts, args.max_tokens, k_phase, n)
                )
        if plain_proc is not None:  # only the batched daemon from here on
            plain_proc.send_signal(signal.SIGTERM)
            plain_proc.wait(60)
            plain_proc = None
        pairs = transports(
            address,
            http_address_from_log(work / "home" / "daemon.log"),
            prompts,
            args.max_tokens,
            k,
            args.rounds,
        )
        longest_prompt = max(len(hub.tokenizer.encode(p)) for p in prompts) + 32  # + template
        context = longest_prompt + args.max_tokens
        memory = memory_report(address, hub, counts[-1], context)
        memory_defaults = defaults_memory(
            address, hub, prompts, args.max_tokens, counts[-1], context
        )
    finally:
        for p in (proc, plain_proc):
            if p is not None:
                p.send_signal(signal.SIGTERM)
                p.wait(60)
        shutil.rmtree(work, ignore_errors=True)  # tiny models, the daemon's home and log
    chat = chat_turns(hub, config, args.max_tokens, k)
    later = chat[1:]  # the first turn has nothing to reuse
    ttft_ratio = sum(t["ttft_fresh_s"] for t in later) / sum(t["ttft_cached_s"] for t in later)

    def total(name: str) -> Phase:
        ps = phases[name]
        return Phase(sum(p.tokens for p in ps), sum(p.seconds for p in ps))

    def ratios(name: str, over: str) -> list[float]:
        """Per round: phase `name`'s rate over phase `over`'s (paired, so drift cancels)."""
        return [a.rate / b.rate for a, b in zip(phases[name], phases[over], strict=True)]

    def paired(name: str, over: str) -> dict[str, float]:
        """The spread of `name`'s rate over `over`'s, prompt by prompt (run one after the other)."""
        return spread([a.rate / b.rate for a, b in zip(singles[name], singles[over], strict=True)])

    inproc, single = total("in_process"), total("daemon")

    def scaling(prefix: str, one: str) -> dict[str, dict]:
        """Phases `prefix`N against the 1-client phase `one`, per N."""
        out, alone = {}, total(one)
        for n in counts:
            name = f"{prefix}{n}"
            multi = total(name)
            fairness = [max(p.per_client) / min(p.per_client) for p in phases[name]]
            out[str(n)] = {
                "aggregate_tokens_per_s": multi.rate,
                "vs_single": multi.rate / alone.rate,
                "vs_single_per_round": ratios(name, one),
                "per_client_tokens_per_s": [r for p in phases[name] for r in p.per_client],
                "fairness_max_over_min": max(fairness),
                "fairness_per_round": fairness,
            }
        return out

    clients = scaling("concurrent_", "daemon")
    defaults = scaling("defaults_", "defaults_1") if "defaults_1" in phases else {}
    unbatched = {}
    if "unbatched" in phases:
        n = counts[0]
        unbatched = {
            "single_tokens_per_s": total("unbatched").rate,
            "batched_single_over_unbatched_single": single.rate / total("unbatched").rate,
            "batched_single_over_unbatched_single_per_round": ratios("daemon", "unbatched"),
            "batched_single_over_unbatched_single_per_prompt": paired("daemon", "unbatched"),
            f"unbatched_{n}_clients_vs_single": total(f"unbatched_{n}").rate
            / total("unbatched").rate,
            f"batched_{n}_over_unbatched_{n}_clients": total(f"concurrent_{n}").rate
            / total(f"unbatched_{n}").rate,
            f"batched_{n}_over_unbatched_{n}_per_round": ratios(
                f"concurrent_{n}", f"unbatched_{n}"
            ),
        }
    first = clients[str(counts[0])]
    http_clients = {
        "clients": counts[0],
        "aggregate_tokens_per_s": total(f"http_{counts[0]}").rate,
        "vs_single_grpc": total(f"http_{counts[0]}").rate / single.rate,
        "vs_single_grpc_per_round": ratios(f"http_{counts[0]}", "daemon"),
        "over_grpc_same_clients": total(f"http_{counts[0]}").rate
        / total(f"concurrent_{counts[0]}").rate,
    }
    results = {
        "target": config.models.target,
        "draft": config.models.draft,
        "prompts": len(prompts),
        "max_tokens": args.max_tokens,
        "rounds": args.rounds,
        "clients": counts,
        "draft_tokens": "adaptive" if k is None else k,
        "load_average": os.getloadavg()[0],
        "blas": speclora.daemon.blas.blas_info().label,
        "attention": speclora.daemon.cpu_attention.attention_info().label,
        "daemon_blas": memory.pop("blas"),
        "in_process_tokens_per_s": inproc.rate,
        "daemon_tokens_per_s": single.rate,
        "daemon_vs_in_process": single.rate / inproc.rate,
        "daemon_vs_in_process_per_prompt": paired("daemon", "in_process"),
        "concurrent": clients,
        "concurrent_defaults": defaults,
        "defaults_single_tokens_per_s": total("defaults_1").rate if defaults else None,
        "unbatched": unbatched,
        "http_concurrent": http_clients,
        # The first N's figures under the names earlier results used:
        "concurrent_aggregate_tokens_per_s": first["aggregate_tokens_per_s"],
        "concurrent_vs_single": first["vs_single"],
        "per_client_tokens_per_s": first["per_client_tokens_per_s"],
        "fairness_max_over_min": max(c["fairness_max_over_min"] for c in clients.values()),
        "fairness_per_round": first["fairness_per_round"],
        "per_round_tokens_per_s": {name: [p.rate for p in ps] for name, ps in phases.items()},
        "memory": memory,
        "memory_defaults": memory_defaults,
        "transports": pairs,
        "http_over_grpc_tokens_per_s": spread([p["http_over_grpc"] for p in pairs]),
        "ttft_http_minus_grpc_ms": spread([p["ttft_http_minus_grpc_ms"] for p in pairs]),
        "chat_turns": chat,
        "chat_ttft_fresh_over_cached": ttft_ratio,
        "chat_identical": all(t["identical"] for t in chat),
        "targets": {
            "daemon_vs_in_process": 0.95,
            "concurrent_vs_single": {"4": 2.0, "8": 2.5},
            "batched_single_over_unbatched_single": 0.97,
            "fairness": 1.5,
            "peak_rss_over_weights_plus_kv": 1.25,
            "http_over_grpc_tokens_per_s": 0.95,
            "ttft_http_minus_grpc_ms": 10.0,
        },
    }
    print(
        f"target {results['target']}, draft {results['draft']}, K={results['draft_tokens']}, "
        f"{len(prompts)} prompts x {args.max_tokens} tokens, T=0, {args.rounds} round(s), "
        f"load average {results['load_average']:.1f} on {os.cpu_count()} cores\n"
    )
    print("| measure | tokens/s | ratio | target |")
    print("|---|---:|---:|---:|")
    print(f"| in-process engine | {inproc.rate:.1f} | 1.00 | |")

    def pairs_text(p: dict[str, float]) -> str:
        return f"prompt pairs {p['min']:.2f} .. {p['max']:.2f}, median {p['median']:.2f}"

    print(
        f"| daemon, 1 client | {single.rate:.1f} | {results['daemon_vs_in_process']:.3f} "
        f"({pairs_text(results['daemon_vs_in_process_per_prompt'])}) | >= 0.95 |"
    )
    goals = results["targets"]["concurrent_vs_single"]
    for n, c in clients.items():
        per_client, rounds = c["per_client_tokens_per_s"], c["vs_single_per_round"]
        goal = f">= {goals[n]}" if n in goals else ""
        print(
            f"| daemon, {n} clients (aggregate) | {c['aggregate_tokens_per_s']:.1f} | "
            f"{c['vs_single']:.2f} vs 1 client (rounds {min(rounds):.2f} .. {max(rounds):.2f}) "
            f"| {goal} |"
        )
        print(
            f"| {n} clients: per-client rate, min / median / max | {min(per_client):.1f} / "
            f"{statistics.median(per_client):.1f} / {max(per_client):.1f} | "
            f"max/min {c['fairness_max_over_min']:.2f} | <= 1.5 |"
        )
    for n, c in defaults.items():
        per_client, rounds = c["per_client_tokens_per_s"], c["vs_single_per_round"]
        print(
            f"| daemon, {n} clients at the defaults (adaptive K) | "
            f"{c['aggregate_tokens_per_s']:.1f} | {c['vs_single']:.2f} vs 1 client at the "
            f"defaults, {results['defaults_single_tokens_per_s']:.1f} tok/s (rounds "
            f"{min(rounds):.2f} .. {max(rounds):.2f}); fastest / slowest client "
            f"{c['fairness_max_over_min']:.2f} | {f'>= {goals[n]}' if n in goals else ''} |"
        )
    rounds = http_clients["vs_single_grpc_per_round"]
    print(
        f"| daemon, {counts[0]} HTTP clients (aggregate) | "
        f"{http_clients['aggregate_tokens_per_s']:.1f} | {http_clients['vs_single_grpc']:.2f} vs "
        f"1 gRPC client (rounds {min(rounds):.2f} .. {max(rounds):.2f}); "
        f"{http_clients['over_grpc_same_clients']:.2f} of {counts[0]} gRPC clients | |"
    )
    if unbatched:
        n = counts[0]
        print(
            f"| unbatched daemon, 1 client | {unbatched['single_tokens_per_s']:.1f} | batched "
            f"1 client / this {unbatched['batched_single_over_unbatched_single']:.3f} "
            f"({pairs_text(unbatched['batched_single_over_unbatched_single_per_prompt'])}) "
            "| >= 0.97 |"
        )
        rounds = unbatched[f"batched_{n}_over_unbatched_{n}_per_round"]
        print(
            f"| unbatched daemon, {n} clients | | "
            f"{unbatched[f'unbatched_{n}_clients_vs_single']:.2f} vs its 1 client; batched / "
            f"unbatched {unbatched[f'batched_{n}_over_unbatched_{n}_clients']:.2f} (rounds "
            f"{min(rounds):.2f} .. {max(rounds):.2f}) | |"
        )
    mib = 2**20
    print(
        f"| daemon memory: rss / peak rss vs weights {memory['weight_bytes'] / mib:.0f} MiB + "
        f"KV {memory['kv_cache_bytes'] / mib:.0f} MiB (of which the prompt cache "
        f"{memory['prompt_cache_bytes'] / mib:.0f}) | {memory['rss_bytes'] / mib:.0f} / "
        f"{memory['peak_rss_bytes'] / mib:.0f} MiB | {memory['rss_over_weights_plus_kv']:.2f} / "
        f"{memory['peak_rss_over_weights_plus_kv']:.2f} | <= 1.25 |"
    )
    d = memory_defaults
    print(
        f"| daemon peak rss, {counts[-1]} clients twice more with the defaults (adaptive K, "
        f"history) | {d['peak_rss_bytes'] / mib:.0f} MiB | "
        f"{d['peak_rss_over_weights_plus_kv']:.2f} | <= 1.25 |"
    )
    print_transports(pairs)
    print(
        f"\nPrompt cache, {len(chat)}-turn chat (each turn re-sends the conversation), "
        f"in-process, T=0:\n"
    )
    print("| turn | prompt tokens | from the cache | TTFT cached / fresh (s) | identical |")
    print("|---:|---:|---:|---|---|")
    for i, t in enumerate(chat, 1):
        print(
            f"| {i} | {t['prompt_tokens']} | {t['cached_prompt_tokens']} | "
            f"{t['ttft_cached_s']:.3f} / {t['ttft_fresh_s']:.3f} | "
            f"{'yes' if t['identical'] else 'NO'} |"
        )
    print(f"\nturns 2-{len(chat)}: time to first token, fresh / cached = {ttft_ratio:.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
