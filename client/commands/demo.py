"""`speclora demo`: the newcomer's first ten minutes, offline, every number measured live.

1. start a daemon (or use the running one) on the embedded pair, from the base draft;
2. run prompts of one kind: stream answers, show acceptance and tokens/s beside target-only;
3. train the draft on the failures just recorded (progress bar, held-out acceptance);
4. rerun *other* prompts of the same kind and show the before/after table and bar chart;
5. say where everything is and what to try next; stop the daemon unless --keep-daemon.

`--tiny` does the same on tiny random models in a temporary home (seconds; used by a test).
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import click
from speclora.client.render import chunk_text, client_errors, daemon_side, is_tty
from speclora.client.stub import (
    GenerationSummary,
    SpecLoRAClient,
    TextChunk,
    TrainEvaluation,
    TrainProgress,
    TrainResult,
    TrainStarted,
)
from speclora.shared.paths import resolve_paths

# One kind of request: the draft learns the target's habits for it. The eval prompts are never
# recorded or trained on; they measure whether what was learned carries to new prompts.
TRAIN_PROMPTS = (
    "Explain what a CPU cache is in two sentences.",
    "Explain what a hash table is in two sentences.",
    "Explain what an operating system kernel is in two sentences.",
    "Explain what a compiler is in two sentences.",
    "Explain what a database index is in two sentences.",
    "Explain what a network router is in two sentences.",
    "Explain what a file system is in two sentences.",
    "Explain what virtual memory is in two sentences.",
    "Explain what a thread is in two sentences.",
    "Explain what an API is in two sentences.",
    "Explain what encryption is in two sentences.",
    "Explain what a web browser is in two sentences.",
)
EVAL_PROMPTS = (
    "Explain what a linked list is in two sentences.",
    "Explain what a firewall is in two sentences.",
    "Explain what a GPU is in two sentences.",
    "Explain what a programming language is in two sentences.",
)


@dataclass(frozen=True)
class DemoSettings:
    train_prompts: Sequence[str]
    eval_prompts: Sequence[str]
    max_tokens: int
    train_steps: int | None


@dataclass(frozen=True)
class Measured:
    prompt: str
    acceptance: float
    tokens_per_second: float
    tokens: int


def _run(client: SpecLoRAClient, prompt: str, *, show: bool, colour: bool, **options) -> Measured:
    """One greedy generation; streams its text when `show`; returns what the daemon measured."""
    summary: GenerationSummary | None = None
    for event in client.generate(prompt, temperature=0.0, **options):
        if isinstance(event, TextChunk):
            if show:
                click.echo(chunk_text(event, colour), nl=False)
        else:
            summary = event
    if show:
        click.echo()
    assert summary is not None  # the daemon always ends a stream with a summary
    return Measured(
        prompt, summary.acceptance_rate, summary.tokens_per_second, summary.completion_tokens
    )


def _bar(value: float, scale: float, width: int = 30) -> str:
    filled = 0 if scale <= 0 else round(width * min(value / scale, 1.0))
    return "█" * filled + "·" * (width - filled)


def _mean(values: Sequence[float]) -> float:
    return statistics.fmean(values) if values else 0.0


def _heading(text: str) -> None:
    click.echo()
    click.secho(text, bold=True)


def _measure_prompts(client: SpecLoRAClient, settings: DemoSettings, colour: bool):
    _heading(
        f"1. Generating {len(settings.train_prompts)} answers with the untrained draft "
        "(recorded as failure cases when the draft does badly)"
    )
    if colour:
        click.echo("   text in " + click.style("cyan", fg="cyan") + " came from the draft")
    recorded: list[Measured] = []
    for prompt in settings.train_prompts:
        click.secho(f"\n> {prompt}", fg="yellow")
        m = _run(
            client, prompt, show=True, colour=colour, max_tokens=settings.max_tokens, record=True
        )
        recorded.append(m)
        click.echo(f"  acceptance {m.acceptance:.2f}   {m.tokens_per_second:.1f} tok/s")

    _heading(
        f"   Measuring {len(settings.eval_prompts)} held-out prompts (never trained on): "
        "speculative with the base draft, and the target alone"
    )
    before, target_only = [], []
    for prompt in settings.eval_prompts:
        base = _run(
            client, prompt, show=False, colour=colour, max_tokens=settings.max_tokens, record=False
        )
        alone = _run(
            client,
            prompt,
            show=False,
            colour=colour,
            max_tokens=settings.max_tokens,
            record=False,
            draft_tokens=0,
        )
        before.append(base)
        target_only.append(alone)
        click.echo(
            f"  {prompt[:48]:<48}  acceptance {base.acceptance:.2f}  "
            f"{base.tokens_per_second:5.1f} tok/s  (target alone {alone.tokens_per_second:5.1f})"
        )
    overall = _mean([m.acceptance for m in recorded])
    click.echo(
        f"\n  overall: acceptance {overall:.2f} on the recorded prompts; "
        f"{_mean([m.tokens_per_second for m in recorded]):.1f} tok/s speculative vs "
        f"{_mean([m.tokens_per_second for m in target_only]):.1f} tok/s target alone"
    )
    return before, target_only


def _train(client: SpecLoRAClient, steps: int | None) -> TrainResult | None:
    _heading("2. Training the draft (LoRA, KL to the target) on the recorded failures")
    result: TrainResult | None = None
    bar = None
    try:
        for event in client.train(steps=steps):
            if isinstance(event, TrainStarted):
                click.echo(
                    f"  {event.train_cases} training cases, {event.heldout_cases} held out, "
                    f"{event.steps} steps"
                )
                bar = click.progressbar(
                    length=event.steps, label="  training", show_pos=True, width=30
                )
                bar.__enter__()
            elif isinstance(event, TrainProgress) and bar is not None:
                if is_tty():  # off a terminal a changing label would print a line per step
                    bar.label = f"  training (loss {event.loss:.3f})"
                bar.update(event.step - bar.pos)
            elif isinstance(event, TrainEvaluation):
                if bar is not None and event.phase == "after":
                    bar.__exit__(None, None, None)
                    bar = None
                click.echo(f"  held-out acceptance {event.phase}: {event.heldout_acceptance:.3f}")
            elif isinstance(event, TrainResult):
                result = event
    finally:
        if bar is not None:
            bar.__exit__(None, None, None)
    if result is not None:
        verdict = (
            "promoted and swapped into the running draft" if result.promoted else "not promoted"
        )
        click.echo(
            f"  adapter {result.adapter_version}: {verdict} ({result.reason}); "
            f"{result.duration_s:.0f}s"
        )
    return result


def _compare(
    client: SpecLoRAClient,
    settings: DemoSettings,
    before: list[Measured],
    target_only: list[Measured],
    colour: bool,
) -> list[Measured]:
    _heading("3. The same held-out prompts with the trained draft")
    after = []
    for prompt in settings.eval_prompts:
        click.secho(f"\n> {prompt}", fg="yellow")
        after.append(
            _run(
                client,
                prompt,
                show=True,
                colour=colour,
                max_tokens=settings.max_tokens,
                record=False,
            )
        )

    _heading("   Before / after (held-out prompts, greedy; output identical to the target's)")
    click.echo(
        f"  {'prompt':<40} {'accept before':>13} {'after':>6} {'tok/s before':>12} "
        f"{'after':>6} {'target':>7} {'speedup':>8}"
    )
    for b, a, t in zip(before, after, target_only, strict=True):
        speedup = a.tokens_per_second / t.tokens_per_second if t.tokens_per_second else 0.0
        click.echo(
            f"  {b.prompt[:40]:<40} {b.acceptance:>13.2f} {a.acceptance:>6.2f} "
            f"{b.tokens_per_second:>12.1f} {a.tokens_per_second:>6.1f} "
            f"{t.tokens_per_second:>7.1f} {speedup:>7.2f}x"
        )
    acc_b, acc_a = _mean([m.acceptance for m in before]), _mean([m.acceptance for m in after])
    tps_b, tps_a = (_mean([m.tokens_per_second for m in ms]) for ms in (before, after))
    tps_t = _mean([m.tokens_per_second for m in target_only])
    click.echo()
    click.echo(f"  acceptance  before {_bar(acc_b, 1.0)} {acc_b:.2f}")
    click.echo(f"              after  {_bar(acc_a, 1.0)} {acc_a:.2f}")
    top = max(tps_b, tps_a, tps_t)
    click.echo(f"  tokens/s    target {_bar(tps_t, top)} {tps_t:.1f}")
    click.echo(f"              before {_bar(tps_b, top)} {tps_b:.1f}")
    click.echo(
        f"              after  {_bar(tps_a, top)} {tps_a:.1f}"
        f"   ({tps_a / tps_t if tps_t else 0:.2f}x the target alone)"
    )
    return after


def _where(keep: bool) -> None:
    paths = resolve_paths()
    _heading("4. Where things are, and what next")
    click.echo(f"  adapters        {paths.adapters_dir}")
    click.echo(f"  failure cases   {paths.database}   (speclora failures list | purge)")
    click.echo(f"  daemon log      {paths.daemon_log}")
    click.echo(f"  socket          {paths.socket_path}")
    click.echo(
        '\n  From the shell:   speclora daemon start; speclora generate "Explain DNS."; '
        "speclora interactive; speclora stats --watch; speclora train"
    )
    click.echo("  From Python:      from speclora.client import SpecLoRAClient")
    click.echo('                    print(SpecLoRAClient().generate_text("Explain DNS."))')
    if keep:
        click.echo("\n  The daemon is still running (stop it with: speclora daemon stop).")


def _tiny_environment(root: Path) -> None:
    """Point this process (and the daemon it spawns) at tiny random models in `root`."""
    with daemon_side("demo --tiny"):
        from speclora.daemon.tiny import write_tiny_pair  # lazy: imports MLX

    click.echo("building tiny random models (--tiny)...")
    target, draft = write_tiny_pair(root)
    os.environ.update(
        {
            "SPECLORA_HOME": str(root / "home"),
            "SPECLORA_MODELS_TARGET": str(target),
            "SPECLORA_MODELS_DRAFT": str(draft),
            "SPECLORA_LEARNING_FAILURE_THRESHOLD": "1.0",
            "SPECLORA_LEARNING_MIN_CASES": "4",
            # A free port: 8421 may be the user's own daemon's.
            "SPECLORA_SERVER_HTTP_ADDRESS": "127.0.0.1:0",
        }
    )


@click.command()
@click.option("--keep-daemon", is_flag=True, help="Leave the daemon running afterwards.")
@click.option("--tiny", is_flag=True, help="Tiny random models in a temporary home (a smoke test).")
@click.option("--max-tokens", type=int, default=None, help="Tokens per answer (default 64).")
@click.option("--train-steps", type=int, default=None, help="Training steps (default 60).")
@click.pass_context
def demo(
    ctx: click.Context,
    keep_daemon: bool,
    tiny: bool,
    max_tokens: int | None,
    train_steps: int | None,
) -> None:
    """Show SpecLoRA learning: generate, train the draft, generate faster."""
    from speclora.client.commands.daemon import daemon_group, running_pid

    started = time.monotonic()
    tmp = tempfile.TemporaryDirectory(prefix="speclora-demo-") if tiny else None
    if tmp is not None:
        _tiny_environment(Path(tmp.name))
        settings = DemoSettings(
            TRAIN_PROMPTS[:6], EVAL_PROMPTS[:2], max_tokens or 12, train_steps or 10
        )
    else:
        # 60 steps: ~3 minutes on 2 cores, so the whole demo stays under 10 (measured 5m40s).
        settings = DemoSettings(TRAIN_PROMPTS, EVAL_PROMPTS, max_tokens or 64, train_steps or 60)
        from speclora.client.commands.models import models_group

        ctx.invoke(models_group.commands["pull"], spec="embedded")

    paths = resolve_paths()
    was_running = running_pid(paths) is not None
    if not was_running:
        ctx.invoke(daemon_group.commands["start"], timeout=600.0)
    colour = is_tty()
    try:
        with client_errors(), SpecLoRAClient(config_path=ctx.obj.get("config_path")) as client:
            snapshot = client.stats()
            click.echo(
                f"\ntarget {snapshot.target_model}   draft {snapshot.draft_model}   "
                f"blas {snapshot.blas}"
            )
            if snapshot.adapter_version:
                click.echo(
                    f"starting from the base draft (adapter {snapshot.adapter_version} "
                    "stays stored; `speclora adapters rollback` brings it back)"
                )
                client.activate_adapter("none")
            before, target_only = _measure_prompts(client, settings, colour)
            _train(client, settings.train_steps)
            _compare(client, settings, before, target_only, colour)
        _where(keep_daemon or was_running)
    finally:
        if not (keep_daemon or was_running):
            ctx.invoke(daemon_group.commands["stop"], timeout=None)
        if tmp is not None:
            tmp.cleanup()
    click.echo(f"\ndemo finished in {time.monotonic() - started:.0f}s")
