"""`speclora generate PROMPT`: stream one completion from the daemon."""

from __future__ import annotations

import json
import sys

import click
from speclora.client.render import address_option, chunk_text, client_errors, is_tty
from speclora.client.stub import GenerationSummary, SpecLoRAClient, TextChunk


def summary_line(s: GenerationSummary) -> str:
    sources = (
        f" = draft {s.draft_accepted}/{s.draft_proposed} + history "
        f"{s.history_accepted}/{s.history_proposed}"
        if s.history_proposed or s.grammar_proposed
        else ""
    )
    if s.grammar_proposed:
        sources += f" + grammar {s.grammar_accepted}/{s.grammar_proposed}"
    return (
        f"[{s.completion_tokens} tokens, {s.tokens_per_second:.1f} tok/s, acceptance "
        f"{s.acceptance_rate:.2f} ({s.accepted}/{s.proposed}{sources}), "
        f"{s.tokens_per_step:.2f} tokens/step, "
        f"{s.mode}, finish {s.finish_reason}{', recorded' if s.failure_recorded else ''}"
        f"{f', {s.cached_prompt_tokens} prompt tokens cached' if s.cached_prompt_tokens else ''}]"
    )


@click.command()
@click.argument("prompt", required=False)
@click.option("--max-tokens", type=int, help="Most tokens to generate (default: the daemon's).")
@click.option("--temperature", type=float, help="0 = greedy (default: the daemon's).")
@click.option("--top-p", type=float, help="Nucleus sampling mass in (0, 1].")
@click.option("--top-k", type=int, help="Keep the k most likely tokens (0 = off).")
@click.option("--seed", type=int, help="Random seed for reproducible sampling.")
@click.option("--draft-tokens", type=int, help="Draft tokens per step, 0-16 (default: adaptive).")
@click.option("--mode", type=click.Choice(["detailed", "fast"]), help="Engine mode.")
@click.option("--stop", multiple=True, help="Stop at this string (repeatable).")
@click.option("--raw", is_flag=True, help="Send PROMPT as-is, without the chat template.")
@click.option(
    "--no-record", is_flag=True, help="Store nothing of this request (no failure case, no history)."
)
@click.option("--no-history", is_flag=True, help="No proposals from the history drafter.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object at the end.")
@click.option(
    "--json-schema",
    metavar="SCHEMA",
    help="Output JSON valid under this JSON schema (its text, or a file holding it).",
)
@click.option("--json-object", is_flag=True, help="Output a JSON object (any).")
@click.option("--regex", help="Output text matching this regular expression.")
@click.option("--lark", metavar="GRAMMAR", help="Output text matching this Lark grammar (or file).")
@address_option
@click.pass_context
def generate(
    ctx: click.Context,
    prompt: str | None,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    top_k: int | None,
    seed: int | None,
    draft_tokens: int | None,
    mode: str | None,
    stop: tuple[str, ...],
    raw: bool,
    no_record: bool,
    no_history: bool,
    as_json: bool,
    json_schema: str | None,
    json_object: bool,
    regex: str | None,
    lark: str | None,
    address: str | None,
) -> None:
    """Generate text for PROMPT (or stdin), streamed as it is accepted."""
    if prompt is None or prompt == "-":
        if sys.stdin.isatty():
            raise click.UsageError("give a PROMPT, or pipe one on stdin")
        prompt = sys.stdin.read()
    colour = is_tty() and not as_json
    chunks: list[TextChunk] = []
    summary: GenerationSummary | None = None
    with client_errors(), SpecLoRAClient(address, config_path=ctx.obj.get("config_path")) as client:
        stream = client.generate(
            prompt,
            raw=raw,
            max_tokens=max_tokens,
            temperature=temperature,
            top_p=top_p,
            top_k=top_k,
            seed=seed,
            stop=stop,
            draft_tokens=draft_tokens,
            mode=mode,
            record=False if no_record else None,
            use_history=False if no_history else None,
            json_schema=_text_or_file(json_schema),
            json_object=json_object,
            regex=regex,
            lark=_text_or_file(lark),
        )
        try:
            for event in stream:
                if isinstance(event, TextChunk):
                    chunks.append(event)
                    if not as_json:
                        click.echo(chunk_text(event, colour), nl=False)
                else:
                    summary = event
        except KeyboardInterrupt:
            stream.close()  # cancels the request in the daemon
            click.echo("\n[cancelled]", err=True)
            sys.exit(130)
    if as_json:
        click.echo(json.dumps(_result(chunks, summary)))
        return
    click.echo()
    if summary is not None:
        click.echo(
            click.style(summary_line(summary), dim=True) if colour else summary_line(summary),
            err=True,
        )


def _text_or_file(value: str | None) -> str | None:
    """A schema or grammar given inline, or the path of a file holding it."""
    if value is None:
        return None
    from pathlib import Path

    path = Path(value)
    try:
        if len(value) < 4096 and path.is_file():
            return path.read_text()
    except OSError:
        pass
    return value


def _result(chunks: list[TextChunk], s: GenerationSummary | None) -> dict[str, object]:
    result: dict[str, object] = {
        "text": "".join(c.text for c in chunks),
        "token_ids": [t for c in chunks for t in c.token_ids],
        "from_draft": [d for c in chunks for d in c.from_draft],
        "from_history": [h for c in chunks for h in c.from_history],
        "from_grammar": [g for c in chunks for g in c.from_grammar],
    }
    if s is not None:
        result.update(
            request_id=s.request_id,
            prompt_tokens=s.prompt_tokens,
            cached_prompt_tokens=s.cached_prompt_tokens,
            completion_tokens=s.completion_tokens,
            proposed=s.proposed,
            accepted=s.accepted,
            acceptance_rate=s.acceptance_rate,
            draft_proposed=s.draft_proposed,
            draft_accepted=s.draft_accepted,
            history_proposed=s.history_proposed,
            history_accepted=s.history_accepted,
            grammar_proposed=s.grammar_proposed,
            grammar_accepted=s.grammar_accepted,
            tokens_per_second=s.tokens_per_second,
            time_to_first_token_s=s.time_to_first_token_s,
            tokens_per_step=s.tokens_per_step,
            finish_reason=s.finish_reason,
            mode=s.mode,
            adapter_version=s.adapter_version,
            failure_recorded=s.failure_recorded,
        )
    return result
