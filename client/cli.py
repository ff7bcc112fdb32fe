"""The `speclora` command: one click group; each command group lives in client/commands/.

Commands that only talk to the daemon never import MLX; `serve`, `models` and `demo` import
the daemon side lazily inside the command.
"""

from __future__ import annotations

import importlib

import click

from speclora import __version__

# (module under speclora.client.commands, attribute) for each command or group, in help order.
_COMMANDS: tuple[tuple[str, str], ...] = (
    ("generate", "generate"),
    ("interactive", "interactive"),
    ("stats", "stats"),
    ("train", "train"),
    ("daemon", "serve"),
    ("daemon", "daemon_group"),
    ("service", "service_group"),
    ("failures", "failures_group"),
    ("history", "history_group"),
    ("adapters", "adapters_group"),
    ("models", "models_group"),
    ("demo", "demo"),
)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="speclora")
@click.option(
    "--config",
    "config_path",
    envvar="SPECLORA_CONFIG",
    type=click.Path(dir_okay=False),
    help="YAML config file (default: the user's config.yaml if present).",
)
@click.pass_context
def main(ctx: click.Context, config_path: str | None) -> None:
    """SpecLoRA: a local LLM daemon that gets faster the more you use it."""
    ctx.ensure_object(dict)
    ctx.obj["config_path"] = config_path


def _register() -> None:
    for module_name, attr in _COMMANDS:
        try:
            module = importlib.import_module(f"speclora.client.commands.{module_name}")
        except ModuleNotFoundError as exc:
            # A command module not written yet must not break the others.
            if exc.name == f"speclora.client.commands.{module_name}":
                continue
            raise
        command = getattr(module, attr, None)
        if command is not None:
            main.add_command(command)


_register()
