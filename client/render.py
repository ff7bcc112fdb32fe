"""How the CLI shows things: draft-coloured text, sparklines, stats, and errors as one line.

Colours and redraws only on a terminal; piped output stays plain text (or JSON with --json).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import TextIO

import click
from speclora.client.settings import ClientConfigError
from speclora.client.stub import (
    DaemonNotRunning,
    SpecLoRAClientError,
    StatsSnapshot,
    TextChunk,
)
from speclora.shared.config import ConfigError

EXIT_NOT_RUNNING = 2
DRAFT_COLOUR = "cyan"  # text the model draft proposed
HISTORY_COLOUR = "magenta"  # text the history drafter proposed (past requests, the prompt)
_SPARKS = "▁▂▃▄▅▆▇█"


def is_tty(stream: TextIO | None = None) -> bool:
    stream = stream or sys.stdout
    return hasattr(stream, "isatty") and stream.isatty()


def chunk_text(chunk: TextChunk, colour: bool) -> str:
    """A chunk's text; on a terminal, chunks mostly proposed by the draft are cyan and those
    mostly proposed by the history drafter magenta.

    A chunk is one speculative step's text (accepted proposals plus the target's own token),
    and its token boundaries are not in the text, so the colour marks the step, not single
    tokens.
    """
    n = len(chunk.token_ids)
    if not colour or not n:
        return chunk.text
    if sum(chunk.from_history) / n >= 0.5:
        return click.style(chunk.text, fg=HISTORY_COLOUR)
    if sum(chunk.from_draft) / n >= 0.5:
        return click.style(chunk.text, fg=DRAFT_COLOUR)
    return chunk.text


def sparkline(values: Sequence[float], width: int = 40) -> str:
    """Values in [0, 1] as block characters, newest on the right."""
    tail = list(values)[-width:]
    return "".join(_SPARKS[min(int(max(v, 0.0) * len(_SPARKS)), len(_SPARKS) - 1)] for v in tail)


def human_bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def human_duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d {hours}h"
    if hours:
        return f"{hours}h {minutes}m"
    return f"{minutes}m {s}s" if minutes else f"{s}s"


def stats_lines(snap: StatsSnapshot, spark: bool) -> list[str]:
    """The human form of a stats snapshot."""
    lines = [
        f"target      {snap.target_model}",
        f"draft       {snap.draft_model or '(none)'}   adapter {snap.adapter_version or 'none'}",
        f"uptime      {human_duration(snap.uptime_s)}   version {snap.version}   "
        f"blas {snap.blas_label}   mode {snap.default_mode}",
        f"requests    {snap.requests_total} done, {snap.requests_active} running, "
        f"{snap.queue_depth} queued   tokens {snap.tokens_total}   prompt tokens "
        f"{snap.prompt_tokens_total} ({snap.prompt_tokens_cached} from the prompt cache)",
        f"acceptance  lifetime {snap.acceptance_lifetime:.3f}   recent {snap.acceptance_recent:.3f}"
        f"   tokens/s recent {snap.tokens_per_second_recent:.1f}",
        f"  by source draft {snap.draft_accepted}/{snap.draft_proposed} accepted "
        f"(recent {snap.draft_acceptance_recent:.3f})   history {snap.history_accepted}/"
        f"{snap.history_proposed} (recent {snap.history_acceptance_recent:.3f})",
        f"history     {snap.history_tokens} tokens of {snap.history_documents} past requests, "
        f"{human_bytes(snap.history_bytes)}",
    ]
    if snap.failure_store_error:
        lines.append(f"warning     {snap.failure_store_error}")
    if spark and snap.acceptance_history:
        lines.append(f"recent      {sparkline(snap.acceptance_history)}")
    for a in snap.per_adapter:
        lines.append(
            f"  adapter {a.adapter_version or 'base':10s} {a.requests:6d} requests  "
            f"acceptance {a.acceptance_rate:.3f} ({a.accepted}/{a.proposed})"
        )
    lines += [
        f"learning    {snap.failure_cases} failure cases, {snap.pending_cases} new   "
        f"training {snap.training_state}",
        f"auto-train  {auto_train_text(snap)}",
    ]
    if snap.last_training is not None:
        lines.append(f"  last run  {last_training_text(snap)}")
    lines += [
        f"memory      rss {human_bytes(snap.rss_bytes)}   peak {human_bytes(snap.peak_rss_bytes)}"
        f"   weights {human_bytes(snap.weight_bytes)}   prompt cache "
        f"{human_bytes(snap.prompt_cache_bytes)}",
    ]
    return lines


def auto_train_text(snap: StatsSnapshot) -> str:
    """What the learner running by itself is doing, in words."""
    state = snap.auto_train_state
    if not snap.auto_train:
        return "off (learning.auto_train)"
    need = snap.auto_train_min_new_cases
    idle = human_duration(snap.auto_train_idle_s)
    words = {
        "waiting_for_cases": f"on, waiting for new failure cases ({snap.pending_cases}/{need})",
        "waiting_for_idle": f"on, {snap.pending_cases} new cases; trains after {idle} idle "
        f"(idle {human_duration(snap.idle_s)})",
        "due": "on, starting a run",
        "running": "on, a training run is going",
        "no_draft": "on, but there is no draft model to train",
        "store_unavailable": "on, but the failure database cannot be read",
    }
    text = words.get(state, f"on ({state or 'unknown'})")
    return f"{text}   {snap.auto_train_runs} runs by itself since start"


def last_training_text(snap: StatsSnapshot) -> str:
    last = snap.last_training
    assert last is not None
    when = time.strftime("%H:%M:%S", time.localtime(last.finished_at)) if last.finished_at else "-"
    verdict = "promoted" if last.promoted else "not promoted"
    return (
        f"{last.adapter_version} {verdict} ({last.trigger or 'manual'}, {when}, "
        f"{human_duration(last.duration_s)})   held-out {last.acceptance_before:.3f} -> "
        f"{last.acceptance_after:.3f}   longest slice {snap.training_slice_max_s * 1000:.0f} ms"
    )


@contextmanager
def client_errors() -> Iterator[None]:
    """Turn client errors into one line for the user; the daemon not running exits 2."""
    try:
        yield
    except DaemonNotRunning as exc:
        click.echo(f"speclora: {exc}", err=True)
        sys.exit(EXIT_NOT_RUNNING)
    except SpecLoRAClientError as exc:
        raise click.ClickException(str(exc)) from None
    except (ConfigError, ClientConfigError) as exc:
        raise click.ClickException(f"{exc}\nFix the configuration and try again.") from None


@contextmanager
def daemon_side(command: str) -> Iterator[None]:
    """Around the imports of a command that runs daemon code (serve, models, service, demo):
    the base install is the client alone, and says what to install instead of a traceback."""
    try:
        yield
    except ImportError as exc:
        raise click.ClickException(
            f"`speclora {command}` runs the daemon, whose dependencies this install lacks "
            f"({exc}); install them with: pip install 'speclora[daemon]'"
        ) from None


def address_option(f):  # type: ignore[no-untyped-def]
    """--address for every command that talks to the daemon."""
    return click.option(
        "--address",
        envvar="SPECLORA_ADDRESS",
        help="Daemon address: a socket path, unix:PATH or HOST:PORT (default: the configured "
        "socket).",
    )(f)
