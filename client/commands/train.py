"""`speclora train`: fine-tune the draft on the recorded failure cases."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Any

import click
from speclora.client.render import address_option, client_errors
from speclora.client.stub import (
    SpecLoRAClient,
    TrainEvaluation,
    TrainProgress,
    TrainResult,
    TrainStarted,
)


@click.command()
@click.option("--steps", type=int, help="Optimizer steps (default: lora.steps).")
@click.option("--max-cases", type=int, help="Use at most the newest N failure cases.")
@click.option("--learning-rate", type=float, help="Default: lora.learning_rate.")
@click.option("--force-promote", is_flag=True, help="Promote even if acceptance does not rise.")
@click.option(
    "--max-seconds",
    type=float,
    help="Keep the run within this many seconds (default: learning.max_train_s, 300; 0 = no limit).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
@address_option
@click.pass_context
def train(
    ctx: click.Context,
    steps: int | None,
    max_cases: int | None,
    learning_rate: float | None,
    force_promote: bool,
    max_seconds: float | None,
    as_json: bool,
    address: str | None,
) -> None:
    """Fine-tune the draft (LoRA) on recorded failure cases."""
    record: dict[str, Any] = {"losses": []}
    bar: Any = None
    result: TrainResult | None = None
    with client_errors(), SpecLoRAClient(address, config_path=ctx.obj.get("config_path")) as client:
        stream = client.train(
            steps=steps,
            max_cases=max_cases,
            learning_rate=learning_rate,
            force_promote=force_promote,
            max_train_s=max_seconds,
        )
        try:
            for event in stream:
                if isinstance(event, TrainStarted):
                    record.update(dataclasses.asdict(event))
                    if not as_json:
                        click.echo(
                            f"Training on {event.train_cases} cases ({event.heldout_cases} held "
                            f"out), {event.steps} steps, from {event.parent_version or 'the base draft'}."
                        )
                        bar = click.progressbar(
                            length=event.steps, label="training", show_pos=True, file=sys.stderr
                        )
                        bar.__enter__()
                elif isinstance(event, TrainEvaluation):
                    record[f"acceptance_{event.phase}"] = event.heldout_acceptance
                    if not as_json:
                        if bar is not None and event.phase == "after":
                            bar.__exit__(None, None, None)
                            bar = None
                        click.echo(
                            f"held-out acceptance {event.phase}: {event.heldout_acceptance:.3f}"
                        )
                elif isinstance(event, TrainProgress):
                    record["losses"].append(event.loss)
                    if bar is not None:
                        bar.label = f"loss {event.loss:.4f}"
                        bar.update(1)
                elif isinstance(event, TrainResult):
                    result = event
        except KeyboardInterrupt:
            stream.close()  # the daemon stops the run; nothing is written
            click.echo("\ntraining cancelled", err=True)
            sys.exit(130)
        finally:
            if bar is not None:
                bar.__exit__(None, None, None)
    if result is None:
        raise click.ClickException("the daemon ended training without a result")
    record.update(dataclasses.asdict(result))
    if as_json:
        click.echo(json.dumps(record))
        return
    verdict = "promoted" if result.promoted else "not promoted"
    click.echo(
        f"adapter {result.adapter_version}: {verdict} ({result.reason}), {result.duration_s:.1f}s"
    )
