"""`speclora interactive`: a multi-turn chat with the daemon."""

from __future__ import annotations

import click
from speclora.client.commands.generate import summary_line
from speclora.client.render import address_option, chunk_text, client_errors, is_tty, stats_lines
from speclora.client.stub import (
    DaemonNotRunning,
    GenerationSummary,
    SpecLoRAClient,
    SpecLoRAClientError,
    TextChunk,
)

HELP = "Commands: /stats  /reset (forget the conversation)  /exit (or Ctrl-D)"


@click.command()
@click.option("--system", help="A system message that starts the conversation.")
@click.option("--max-tokens", type=int, help="Most tokens per reply (default: the daemon's).")
@click.option("--temperature", type=float, help="0 = greedy (default: the daemon's).")
@click.option("--mode", type=click.Choice(["detailed", "fast"]), help="Engine mode.")
@address_option
@click.pass_context
def interactive(
    ctx: click.Context,
    system: str | None,
    max_tokens: int | None,
    temperature: float | None,
    mode: str | None,
    address: str | None,
) -> None:
    """Chat with the model; draft-proposed text is coloured."""
    colour = is_tty()
    start: list[tuple[str, str]] = [("system", system)] if system else []
    history = list(start)
    with client_errors(), SpecLoRAClient(address, config_path=ctx.obj.get("config_path")) as client:
        client.health()  # not running: say so now, not after the first question
        click.echo(f"SpecLoRA chat. {HELP}")
        while True:
            try:
                line = input("> ")  # plain: readline miscounts the width of coloured prompts
            except EOFError:
                click.echo()
                break
            except KeyboardInterrupt:
                click.echo()
                continue
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit"):
                break
            if text == "/reset":
                history = list(start)
                click.echo("(conversation cleared)")
                continue
            if text == "/stats":
                click.echo("\n".join(stats_lines(client.stats(), spark=colour)))
                continue
            if text.startswith("/"):
                click.echo(f"unknown command {text}. {HELP}")
                continue
            reply = _turn(client, [*history, ("user", line)], max_tokens, temperature, mode, colour)
            if reply is not None:
                history += [("user", line), ("assistant", reply)]


def _turn(
    client: SpecLoRAClient,
    messages: list[tuple[str, str]],
    max_tokens: int | None,
    temperature: float | None,
    mode: str | None,
    colour: bool,
) -> str | None:
    """One reply, streamed; None when it failed or was interrupted (the turn is dropped)."""
    parts: list[str] = []
    summary: GenerationSummary | None = None
    stream = client.generate(
        messages=messages, max_tokens=max_tokens, temperature=temperature, mode=mode
    )
    try:
        for event in stream:
            if isinstance(event, TextChunk):
                parts.append(event.text)
                click.echo(chunk_text(event, colour), nl=False)
            else:
                summary = event
    except KeyboardInterrupt:
        stream.close()
        click.echo("\n[interrupted]")
        return None
    except DaemonNotRunning:
        raise
    except SpecLoRAClientError as exc:
        click.echo(f"\nerror: {exc}", err=True)
        return None
    click.echo()
    if summary is not None:
        line = summary_line(summary)
        click.echo(click.style(line, dim=True) if colour else line)
    return "".join(parts)
