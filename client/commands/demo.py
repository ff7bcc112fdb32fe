"""`speclora demo`: the newcomer's first ten minutes, offline, every number measured live.

It shows the two ways the daemon learns, on one templated task (the same instruction over
different short functions, as a script or an agent sends it):

1. history, the moment a request ends: each answer is streamed coloured by where its tokens
   came from (the history drafter: this prompt and past answers; the model draft), with its
   tokens/s and history/draft share, while the history grows in Stats;
2. LoRA: the draft is trained on the failure cases those requests recorded (progress bar,
   held-out acceptance before/after, promoted or not and why);
3. before/after on held-out inputs of the same task, never recorded (record = false, so they
   never enter the history): interleaved repeats of the base draft alone, the trained draft
   with history, and the target alone; medians with their range, and a speedup only where it
   exceeds that range (client/spread.py);
4. where everything is and what next; the daemon stops unless --keep-daemon.

`--tiny` does the same on tiny random models in a temporary home (seconds; used by a test).
"""

from __future__ import annotations

import os
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import click
from speclora.client.render import chunk_text, client_errors, daemon_side, human_bytes, is_tty
from speclora.client.spread import Spread, compare, normalised
from speclora.client.stub import (
    GenerationSummary,
    SpecLoRAClient,
    StatsSnapshot,
    TextChunk,
    TrainEvaluation,
    TrainProgress,
    TrainResult,
    TrainStarted,
)
from speclora.shared.config import load_config
from speclora.shared.paths import resolve_paths

# One templated task on different inputs. The recorded inputs feed the history and the failure
# cases; the held-out ones are never recorded or trained on, so they measure what carries over.
TASK = "Add type hints to this Python function. Reply with the function only.\n\n```python\n{}```"
RECORDED_INPUTS = (
    "def area(width, height):\n    return width * height\n",
    "def greet(name, excited):\n    suffix = '!' if excited else '.'\n"
    "    return 'Hello, ' + name + suffix\n",
    "def total(prices, tax):\n    subtotal = sum(prices)\n    return subtotal * (1 + tax)\n",
    "def first_word(text):\n    words = text.split()\n    return words[0] if words else ''\n",
    "def clamp(value, low, high):\n    return max(low, min(value, high))\n",
    "def count_vowels(text):\n    return sum(1 for c in text.lower() if c in 'aeiou')\n",
    "def average(numbers):\n    if not numbers:\n        return 0.0\n"
    "    return sum(numbers) / len(numbers)\n",
    "def is_even(number):\n    return number % 2 == 0\n",
    "def repeat(text, times):\n    return text * times\n",
    "def last_item(items):\n    return items[-1] if items else None\n",
    "def celsius(fahrenheit):\n    return (fahrenheit - 32) * 5 / 9\n",
    "def initials(first, last):\n    return first[0].upper() + last[0].upper()\n",
)
HELDOUT_INPUTS = (
    "def perimeter(width, height):\n    return 2 * (width + height)\n",
    "def shout(text, times):\n    loud = text.upper() + '!'\n    return ' '.join([loud] * times)\n",
    "def largest(numbers):\n    if not numbers:\n        return None\n    return max(numbers)\n",
)
ARMS = ("before", "after", "target")  # "target" = the target alone


@dataclass(frozen=True)
class DemoSettings:
    recorded: Sequence[str]
    heldout: Sequence[str]
    max_tokens: int
    train_steps: int | None
    repeats: int


@dataclass(frozen=True)
class Run:
    """What the daemon measured for one greedy generation."""

    tokens: int
    tokens_per_second: float
    target_passes: int
    draft_proposed: int
    draft_accepted: int
    history_proposed: int
    history_accepted: int

    @property
    def tokens_per_pass(self) -> float:
        return self.tokens / self.target_passes if self.target_passes else 0.0

    @classmethod
    def of(cls, s: GenerationSummary) -> Run:
        return cls(
            s.completion_tokens,
            s.tokens_per_second,
            s.target_passes,
            s.draft_proposed,
            s.draft_accepted,
            s.history_proposed,
            s.history_accepted,
        )


@dataclass
class Arm:
    """One way of serving the held-out prompts: its runs per prompt."""

    runs: dict[str, list[Run]] = field(default_factory=dict)

    def add(self, prompt: str, run: Run) -> None:
        self.runs.setdefault(prompt, []).append(run)

    def speeds(self) -> dict[str, list[float]]:
        return {p: [r.tokens_per_second for r in rs] for p, rs in self.runs.items()}

    def every(self) -> list[Run]:
        return [r for rs in self.runs.values() for r in rs]


def _prompt(function: str) -> str:
    return TASK.format(function)


def _label(prompt: str) -> str:
    """A held-out prompt by the function it is about."""
    head = prompt.split("```python\n", 1)[-1].split("(", 1)[0]
    return head.removeprefix("def ").strip() + "()"


def _share(part: int, whole: int) -> str:
    return f"{100 * part / whole:3.0f}%" if whole else "  -"


def _rate(accepted: int, proposed: int) -> str:
    return f"{accepted / proposed:.2f} ({accepted}/{proposed})" if proposed else "- (none proposed)"


def _generate(
    client: SpecLoRAClient, prompt: str, *, show: bool, colour: bool, **options: object
) -> Run:
    """One greedy generation; streams its text when `show`."""
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
    return Run.of(summary)


def _heading(text: str) -> None:
    click.echo()
    click.secho(text, bold=True)


def _history_line(snap: StatsSnapshot) -> str:
    return (
        f"history {snap.history_tokens} tokens of {snap.history_documents} past requests "
        f"({human_bytes(snap.history_bytes)})"
    )


# ---------------------------------------------------------------------- 1. history


def _history_phase(client: SpecLoRAClient, settings: DemoSettings, colour: bool) -> list[Run]:
    _heading(
        f"1. History: {len(settings.recorded)} requests of one task, each learned from the "
        "moment it ends"
    )
    click.echo(f"   task: {TASK.splitlines()[0]}  (a different function each time)")
    click.echo(f"   before the first one: {_history_line(client.stats())}")
    if colour:
        click.echo(
            "   text in "
            + click.style("magenta", fg="magenta")
            + " came from the history (this prompt and past answers), in "
            + click.style("cyan", fg="cyan")
            + " from the model draft"
        )
    runs = []
    for i, function in enumerate(settings.recorded, 1):
        click.secho(
            f"\n> [{i}/{len(settings.recorded)}] {function.splitlines()[0]} ...", fg="yellow"
        )
        run = _generate(
            client,
            _prompt(function),
            show=True,
            colour=colour,
            max_tokens=settings.max_tokens,
            record=True,
        )
        runs.append(run)
        snap = client.stats()
        click.echo(
            f"  {run.tokens} tokens {run.tokens_per_second:5.1f} tok/s "
            f"{run.tokens_per_pass:4.2f} tokens/pass   from history "
            f"{_share(run.history_accepted, run.tokens)}  from draft "
            f"{_share(run.draft_accepted, run.tokens)}   history now {snap.history_tokens} "
            f"tokens, {snap.history_documents} requests"
        )
    again = _generate(
        client,
        _prompt(settings.recorded[0]),
        show=False,
        colour=colour,
        max_tokens=settings.max_tokens,
        record=False,
    )
    click.echo(
        f"\n  the first function again (its answer is in the history now): from history "
        f"{_share(again.history_accepted, again.tokens)}, {again.tokens_per_pass:.2f} tokens/pass "
        f"(first time {_share(runs[0].history_accepted, runs[0].tokens)}, "
        f"{runs[0].tokens_per_pass:.2f})"
    )
    tokens = sum(r.tokens for r in runs)
    half = len(runs) // 2
    click.echo(
        f"\n  from history: {_share(sum(r.history_accepted for r in runs), tokens)} of all tokens"
        f" (first {half} requests {_share(*_sums(runs[:half]))}, last {len(runs) - half} "
        f"{_share(*_sums(runs[half:]))}); history acceptance "
        f"{_rate(sum(r.history_accepted for r in runs), sum(r.history_proposed for r in runs))}"
        f"; model draft acceptance "
        f"{_rate(sum(r.draft_accepted for r in runs), sum(r.draft_proposed for r in runs))}"
    )
    return runs


def _sums(runs: Sequence[Run]) -> tuple[int, int]:
    return sum(r.history_accepted for r in runs), sum(r.tokens for r in runs)


# ---------------------------------------------------------------------- 2. LoRA


def _train(client: SpecLoRAClient, steps: int | None) -> TrainResult | None:
    snap = client.stats()
    _heading(
        f"2. LoRA: training the draft on the {snap.failure_cases} recorded failure cases "
        "(KL to the target)"
    )
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


# ---------------------------------------------------------------------- 3. before / after


def _heldout_phase(
    client: SpecLoRAClient, settings: DemoSettings, trained: str, colour: bool
) -> dict[str, Arm]:
    """Interleaved repeats: per repeat and prompt, each arm once, the order rotating so no arm
    always runs first. `trained` is the adapter "after" runs with ("" = the base draft)."""
    prompts = [_prompt(f) for f in settings.heldout]
    history_before = client.stats().history_tokens
    after_label = f"adapter {trained}" if trained else "the base draft (nothing was promoted)"
    _heading(
        f"3. Before / after: {len(prompts)} held-out functions (never recorded), "
        f"{settings.repeats} interleaved repeats each"
    )
    click.echo("   before: the base draft alone, history off (use_history = false)")
    click.echo(f"   after:  {after_label} with history (the daemon's default)")
    click.echo("   target: the target alone, no speculation (draft_tokens = 0)")
    arms = {name: Arm() for name in ARMS}
    active = trained
    options = {
        "before": {"use_history": False},
        "after": {},
        "target": {"draft_tokens": 0},
    }
    for repeat in range(settings.repeats):
        for i, prompt in enumerate(prompts):
            shift = (repeat + i) % len(ARMS)
            for name in ARMS[shift:] + ARMS[:shift]:
                wanted = "" if name == "before" else trained
                if name != "target" and wanted != active:
                    client.activate_adapter(wanted or "none")
                    active = wanted
                show = repeat == 0 and name == "after"  # the text once; it is the same each time
                if show:
                    click.secho(f"\n> {_label(prompt)}  (after)", fg="yellow")
                run = _generate(
                    client,
                    prompt,
                    show=show,
                    colour=colour,
                    max_tokens=settings.max_tokens,
                    record=False,
                    **options[name],
                )
                arms[name].add(prompt, run)
        click.echo(f"  repeat {repeat + 1}/{settings.repeats} done")
    if active != trained:
        client.activate_adapter(trained or "none")
    grown = client.stats().history_tokens - history_before
    click.echo(
        f"  history grew by {grown} tokens during these runs"
        + (" (record = false: held-out prompts never enter it)" if grown == 0 else "")
    )
    return arms


def _report(arms: dict[str, Arm]) -> None:
    _heading(
        "   Tokens/s, median (min-max) of the repeats; greedy, so every output is the target's"
    )
    click.echo(f"  {'function':<13}{'before':>23}{'after':>23}{'target':>23}   after vs target")
    target = arms["target"].speeds()
    for prompt, speeds in arms["after"].speeds().items():
        cells = "".join(f" {Spread.of(arms[n].speeds()[prompt]).describe():>23}" for n in ARMS)
        click.echo(f"  {_label(prompt):<13}{cells}   {compare(speeds, target[prompt]).describe()}")
    pooled = {name: normalised(arms[name].speeds(), target) for name in ARMS}
    click.echo("\n  All functions pooled (each run over its function's target-alone median):")
    for a, b in (("after", "target"), ("before", "target"), ("after", "before")):
        click.echo(f"    {a + ' vs ' + b:<18} {compare(pooled[a], pooled[b]).describe()}")
    top = max(max(p) for p in pooled.values())
    for name in ARMS:
        click.echo(f"    {name:<18} {_bar(Spread.of(pooled[name]), top)}")
    click.echo("\n  Where the tokens came from (accepted/proposed, every run):")
    for name in ARMS[:2]:
        runs = arms[name].every()
        tokens = sum(r.tokens for r in runs)
        h = sum(r.history_accepted for r in runs), sum(r.history_proposed for r in runs)
        d = sum(r.draft_accepted for r in runs), sum(r.draft_proposed for r in runs)
        passes = tokens / max(sum(r.target_passes for r in runs), 1)
        click.echo(
            f"    {name:<7} history {_share(h[0], tokens)} of tokens, acceptance {_rate(*h)}; "
            f"draft {_share(d[0], tokens)}, acceptance {_rate(*d)}; {passes:.2f} tokens/pass"
        )


def _bar(s: Spread, scale: float, width: int = 36) -> str:
    """Solid to the slowest run, shaded across the range of the repeats."""
    scale = scale if scale > 0 else 1.0
    low, high = (min(width, round(width * v / scale)) for v in (s.low, s.high))
    cells = "█" * low + "▒" * max(high - low, 1) + "·" * max(width - max(high, low + 1), 0)
    return f"{cells} {s.median:.2f} ({s.low:.2f}-{s.high:.2f})"


# ---------------------------------------------------------------------- 4. where


def http_links(address: str | None, timeout: float = 1.0) -> list[tuple[str, str]]:
    """What the daemon's HTTP server (server.http_address) serves, found by asking it: the
    OpenAI-compatible API when /health answers, the web page when / does. Nothing is assumed
    for a server that is off, bound to a port chosen at start (":0") or not answering."""
    if not address or address.rsplit(":", 1)[-1] in ("", "0"):
        return []
    base = f"http://{address}"
    if not _answers(f"{base}/health", timeout):
        return []
    links = [("OpenAI API", f"{base}/v1")]
    if _answers(f"{base}/", timeout):
        links.append(("web page", f"{base}/"))
    return links


def _answers(url: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as reply:
            return reply.status == 200
    except OSError:  # refused, timed out, or an HTTP error status
        return False


def _where(keep: bool, config_path: str | None) -> None:
    paths = resolve_paths()
    _heading("4. Where things are, and what next")
    click.echo(f"  adapters        {paths.adapters_dir}")
    click.echo(f"  failure cases   {paths.database}   (speclora failures list | purge)")
    click.echo(
        f"  history         {paths.history_database}   (speclora history stats | purge; "
        "failures purge deletes it too)"
    )
    click.echo(f"  daemon log      {paths.daemon_log}")
    click.echo(f"  socket          {paths.socket_path}")
    config = load_config(config_path)
    for name, url in http_links(config.server.http_address):
        click.echo(f"  {name:<15} {url}")
    learning = config.learning
    if learning.auto_train:
        click.echo(
            f"\n  Training by itself: after {learning.auto_train_idle_s:.0f} s idle with "
            f"{learning.auto_train_min_new_cases} new failure cases the daemon trains and "
            "promotes through the same gate (speclora stats shows when; adapters list marks "
            "its adapters auto; learning.auto_train: false turns it off)."
        )
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
            "SPECLORA_LEARNING_MIN_CASES": "2",  # history carries most tiny-model tokens: few draft cases
            # A free port: 8421 may be the user's own daemon's.
            "SPECLORA_SERVER_HTTP_ADDRESS": "127.0.0.1:0",
        }
    )


@click.command()
@click.option("--keep-daemon", is_flag=True, help="Leave the daemon running afterwards.")
@click.option("--tiny", is_flag=True, help="Tiny random models in a temporary home (a smoke test).")
@click.option("--max-tokens", type=int, default=None, help="Tokens per answer (default 64).")
@click.option("--train-steps", type=int, default=None, help="Training steps (default 60).")
@click.option(
    "--repeats",
    type=click.IntRange(1, 20),
    default=3,
    show_default=True,
    help="Interleaved repeats of each held-out prompt.",
)
@click.pass_context
def demo(
    ctx: click.Context,
    keep_daemon: bool,
    tiny: bool,
    max_tokens: int | None,
    train_steps: int | None,
    repeats: int,
) -> None:
    """Show SpecLoRA learning: from history at once, and by training the draft."""
    from speclora.client.commands.daemon import daemon_group, running_pid

    started = time.monotonic()
    tmp = tempfile.TemporaryDirectory(prefix="speclora-demo-") if tiny else None
    if tmp is not None:
        _tiny_environment(Path(tmp.name))
        settings = DemoSettings(
            RECORDED_INPUTS[:6], HELDOUT_INPUTS[:2], max_tokens or 12, train_steps or 10, repeats
        )
    else:
        settings = DemoSettings(
            RECORDED_INPUTS, HELDOUT_INPUTS, max_tokens or 64, train_steps or 60, repeats
        )
        from speclora.client.commands.models import models_group

        ctx.invoke(models_group.commands["pull"], spec="embedded")

    config_path = ctx.obj.get("config_path")
    paths = resolve_paths()
    was_running = running_pid(paths) is not None
    if not was_running:
        ctx.invoke(daemon_group.commands["start"], timeout=600.0)
    colour = is_tty()
    try:
        with client_errors(), SpecLoRAClient(config_path=config_path) as client:
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
            _history_phase(client, settings, colour)
            _train(client, settings.train_steps)
            trained = client.stats().adapter_version  # the promoted adapter, else the base
            arms = _heldout_phase(client, settings, trained, colour)
            _report(arms)
        _where(keep_daemon or was_running, config_path)
    finally:
        if not (keep_daemon or was_running):
            ctx.invoke(daemon_group.commands["stop"], timeout=None)
        if tmp is not None:
            tmp.cleanup()
    click.echo(f"\ndemo finished in {time.monotonic() - started:.0f}s")
