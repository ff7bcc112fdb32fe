"""The target's tokenizer without transformers: a snapshot of what mlx-lm builds, taken once.

Importing transformers (and huggingface_hub, which it imports) costs a process ~26 MiB of RSS
for as long as it runs, and mlx-lm's TokenizerWrapper adds a per-token map of the vocabulary;
on the embedded pair that is most of the daemon's memory beyond weights and KV caches. At run
time the daemon needs only: the Rust `tokenizers.Tokenizer` that transformers configures (its
post-processor and added tokens included), the special tokens a chat template sees, the EOS
ids mlx-lm settles on, and the chat template itself.

`take_snapshot` reads those from mlx-lm's `load_tokenizer` (so transformers runs, in a child
process when the caller has not imported it already) and checks, on probe texts and
conversations, that `Tokenizer` encodes, decodes and renders them exactly as mlx-lm's wrapper
does. The snapshot is cached by the tokenizer files' contents and the library versions.
`Tokenizer` then needs only `tokenizers` and jinja2. Streamed text is the decode of the ids so
far, whichever tokenizer (`StreamingDetokenizer`): a completion of a raw prompt keeps its
leading space, as OpenAI's and llama.cpp's servers return it (mlx-lm's BPE streaming
detokenizer drops it). A tokenizer that fails a check (a chat renderer written in Python, a
template this module renders differently) is recorded as such, and `models.load_model` loads
it through mlx-lm as before.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

log = structlog.get_logger(__name__)

SNAPSHOT_FORMAT = 2
# What decides how a tokenizer behaves: its files (config.json and generation_config.json
# carry the EOS ids mlx-lm adds; the vocabulary files build a tokenizer without
# tokenizer.json) and the libraries that interpret them.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "generation_config.json",
    "config.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
)
TOKENIZER_FILE_PATTERNS = ("*.tiktoken",)
# Reading a tokenizer through transformers takes seconds; a child still at it after this is stuck.
SNAPSHOT_CHILD_TIMEOUT_S = 600.0
LIBRARIES = ("transformers", "mlx-lm", "tokenizers", "jinja2")
# Probes for the equivalence check: scripts, whitespace runs, digits, code, control tokens
# written as text, and bytes that split inside a UTF-8 character.
PROBE_TEXTS = (
    "",
    "Hello, world!",
    " leading space and trailing space ",
    "Line one\nline two\n\n\tindented\r\nwindows",
    "def f(x):\n    return x ** 2  # square\n",
    "Numbers: 0 1 12 123 1234 3.14159 -7 1e10 2026-12-05",
    "Größe, naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어, עברית, العربية",
    "emoji 🙂👍🏽 and symbols ©®™ ∑∫√ → ← ≠",
    "   multiple    spaces     and\u00a0nbsp\u200bzero-width",
    "<|im_start|>user\nhi<|im_end|> <s></s> [INST] <|endoftext|> <|eot_id|>",
    "A" * 300,
    "Hello , world . It 's fine , isn 't it ? Yes ! I 'm sure ; they 're here : ok",
    '{"key": [1, 2, {"nested": "value"}], "ok": true}',
)
PROBE_CONVERSATIONS: tuple[tuple[dict[str, str], ...], ...] = (
    ({"role": "user", "content": "Hello!"},),
    (
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name three colours."},
        {"role": "assistant", "content": "Red, green, blue."},
        {"role": "user", "content": "Two more, in French\n  please."},
    ),
    ({"role": "user", "content": "Write a haiku"}, {"role": "assistant", "content": "Autumn "}),
    ({"role": "user", "content": "Größe 🙂 <|im_end|> {{ not jinja }}"},),
)


class TokenizerSnapshotError(Exception):
    """The tokenizer cannot be served from a snapshot; `reason` says why."""


# --------------------------------------------------------------------------- chat templates


class _GenerationTag:
    """jinja2 extension for `{% generation %}...{% endgeneration %}` (transformers marks the
    assistant's tokens with it); renders the body unchanged. Built lazily: jinja2 is imported
    only when a template is."""

    @staticmethod
    @functools.cache
    def extension() -> type:
        from jinja2 import nodes
        from jinja2.ext import Extension

        class GenerationTag(Extension):
            tags = {"generation"}  # noqa: RUF012  (jinja2's own class attribute)

            def parse(self, parser: Any) -> Any:
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
                return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

            def _render(self, caller: Any) -> str:
                return str(caller())

        return GenerationTag


@functools.cache
def compile_chat_template(source: str) -> Any:
    """A chat template compiled in the environment transformers renders templates in: a
    sandbox, trim_blocks and lstrip_blocks, loop controls, a `tojson` that does not escape
    HTML, and the `raise_exception` / `strftime_now` helpers templates call."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        x: Any,
        ensure_ascii: bool = False,
        indent: Any = None,
        separators: Any = None,
        sort_keys: bool = False,
    ) -> str:
        return json.dumps(
            x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
        )

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag.extension(), jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


# The marker transformers appends to a message it is asked to continue, then cuts at.
_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def render_chat(
    template: str,
    messages: Sequence[Mapping[str, str]],
    *,
    add_generation_prompt: bool = False,
    continue_final_message: bool = False,
    **variables: Any,
) -> str:
    """Render plain role/content messages as transformers' `apply_chat_template(...,
    tokenize=False)` does for them; `variables` are what else the template sees (special
    tokens, a thinking switch)."""
    if not messages:
        raise ValueError("cannot apply a chat template to an empty conversation")
    if continue_final_message and add_generation_prompt:
        raise ValueError("continue_final_message and add_generation_prompt are not compatible")
    chat = [{k: v for k, v in m.items() if v is not None} for m in messages]
    final = ""
    if continue_final_message:
        final = chat[-1].get("content")
        if final is None:
            raise ValueError("the final message has no content to continue")
        if "content" not in template:
            raise ValueError("the chat template does not read the messages' content")
        chat[-1] = {**chat[-1], "content": final + _CONTINUE_TAG}
    rendered = str(
        compile_chat_template(template).render(
            messages=chat,
            tools=None,
            documents=None,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    )
    if continue_final_message:
        tag = _CONTINUE_TAG.strip()
        if final.strip() not in rendered or tag not in rendered:
            raise ValueError("the chat template drops part of the final message it would continue")
        at = rendered.rindex(tag)
        if rendered[at : at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
            rendered = rendered[:at]
        else:  # the template trimmed the message's trailing space
            rendered = rendered[:at].rstrip()
    return rendered


# --------------------------------------------------------------------------- the tokenizer


class StreamingDetokenizer:
    """Text as tokens arrive: each `add_token` makes `last_segment` the new text, holding back
    a partial UTF-8 character (shown as U+FFFD until its last byte comes). The text streamed is
    always `tokenizer.decode` of the ids so far; any tokenizer with a `decode` will do.

    It decodes a short window of recent tokens, twice (with and without the newest ones), and
    emits the difference: decoding from the same start token both times keeps a decoder's
    first-token rules (SentencePiece's dropped leading space) out of the difference. The
    window is a few tokens, so each call costs microseconds whatever the vocabulary."""

    def __init__(self, tokenizer: Any) -> None:
        self._decode = tokenizer.decode
        self.reset()

    def reset(self) -> None:
        self.tokens: list[int] = []
        self.text = ""
        self.last_segment = ""
        self._prefix = 0  # window start: tokens before it are settled
        self._read = 0  # tokens before it are in `text`

    def _step(self, final: bool) -> None:
        settled = self._decode(self.tokens[self._prefix : self._read])
        current = self._decode(self.tokens[self._prefix :])
        if len(current) > len(settled) and (final or not current.endswith("\ufffd")):
            self.last_segment = current[len(settled) :]
            self.text += self.last_segment
            self._prefix, self._read = self._read, len(self.tokens)
        else:
            self.last_segment = ""

    def add_token(self, token: int) -> None:
        self.tokens.append(int(token))
        self._step(final=False)

    def finalize(self) -> None:
        self._step(final=True)


class Tokenizer:
    """What the engine, the servicers and the grammar matcher use of a tokenizer, over a
    snapshot (see the module docstring). The names follow transformers' and mlx-lm's, so either
    kind of tokenizer can be handed to the same code."""

    def __init__(self, snapshot: Mapping[str, Any]) -> None:
        from tokenizers import Tokenizer as Backend

        self.backend = Backend.from_str(snapshot["tokenizer"])
        # transformers turns these off inside each encode call; a tokenizer.json may set them.
        self.backend.no_truncation()
        self.backend.no_padding()
        self.bos_token: str | None = snapshot["bos_token"]
        self.eos_token: str | None = snapshot["eos_token"]
        self.eos_token_id: int | None = snapshot["eos_token_id"]
        self.eos_token_ids = frozenset(int(t) for t in snapshot["eos_token_ids"])
        self.chat_template: str | None = snapshot["chat_template"]
        self.has_chat_template = self.chat_template is not None
        self.vocab_size = int(self.backend.get_vocab_size(with_added_tokens=False))
        # What a template sees beside the messages: the special tokens, the thinking switch.
        self._template_variables: dict[str, Any] = dict(snapshot["template_variables"])

    def __len__(self) -> int:
        return int(self.backend.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=add_special_tokens).ids)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return str(self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def get_vocab(self) -> dict[str, int]:
        return dict(self.backend.get_vocab(with_added_tokens=True))

    def render_chat(self, messages: Sequence[Mapping[str, str]], **options: Any) -> str:
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template")
        return render_chat(self.chat_template, messages, **{**self._template_variables, **options})

    def apply_chat_template(
        self, messages: Sequence[Mapping[str, str]], tokenize: bool = True, **options: Any
    ) -> Any:
        text = self.render_chat(messages, **options)
        return self.encode(text, add_special_tokens=False) if tokenize else text

    @property
    def detokenizer(self) -> StreamingDetokenizer:
        """A fresh streaming detokenizer (one per generation)."""
        return StreamingDetokenizer(self)

    def to_json(self) -> str:
        """The backend tokenizer as tokenizer.json text, without padding or truncation (what
        llguidance builds its own tokenizer from, as `llguidance.hf` does)."""
        return str(self.backend.to_str())


# --------------------------------------------------------------------------- snapshots


def snapshot_key(model_dir: Path) -> str:
    """What the snapshot of `model_dir`'s tokenizer depends on, hashed."""
    h = hashlib.sha256(f"format {SNAPSHOT_FORMAT}\n".encode())
    for name in LIBRARIES:
        try:
            version = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            version = "-"
        h.update(f"{name} {version}\n".encode())
    patterns = sorted(
        p.name for pattern in TOKENIZER_FILE_PATTERNS for p in model_dir.glob(pattern)
    )
    for name in (*TOKENIZER_FILES, *patterns):
        path = model_dir / name
        h.update(f"{name}\n".encode())
        if path.is_file():
            with open(path, "rb") as f:
                h.update(hashlib.file_digest(f, "sha256").digest())
    return h.hexdigest()[:24]


def take_snapshot(model_dir: Path, eos_token_ids: Any = None) -> dict[str, Any]:
    """Read `model_dir`'s tokenizer through mlx-lm (this imports transformers) and check that a
    `Tokenizer` over what was read behaves the same. Returns the snapshot; `ok` is False, with a
    `reason`, where it does not."""
    from mlx_lm.utils import load_tokenizer

    wrapper = load_tokenizer(model_dir, eos_token_ids=eos_token_ids)
    hf = wrapper._tokenizer
    snapshot: dict[str, Any] = {"format": SNAPSHOT_FORMAT, "ok": False, "reason": ""}
    backend = getattr(hf, "backend_tokenizer", None)
    if backend is None:
        snapshot["reason"] = f"{type(hf).__name__} has no Rust tokenizer (a slow tokenizer)"
        return snapshot
    if getattr(wrapper, "_chat_template", None) is not None:
        snapshot["reason"] = "mlx-lm renders this model's chat template in Python"
        return snapshot
    template = hf.chat_template
    if template is not None and not isinstance(template, str):
        snapshot["reason"] = "the tokenizer has several named chat templates"
        return snapshot
    variables: dict[str, Any] = dict(hf.special_tokens_map)
    thinking_kwarg = getattr(wrapper, "_thinking_kwarg", None)
    if thinking_kwarg:
        variables[thinking_kwarg] = bool(wrapper.has_thinking)
    snapshot.update(
        tokenizer=backend.to_str(),
        bos_token=hf.bos_token,
        eos_token=hf.eos_token,
        eos_token_id=hf.eos_token_id,
        eos_token_ids=sorted(int(t) for t in wrapper.eos_token_ids),
        chat_template=template if wrapper.has_chat_template else None,
        template_variables=variables,
    )
    try:
        mismatch = first_mismatch(wrapper, Tokenizer(snapshot))
    except Exception as exc:  # a template or decoder this module cannot handle
        mismatch = f"{type(exc).__name__}: {exc}"
    if mismatch is not None:  # a snapshot not to use keeps only why
        return {"format": SNAPSHOT_FORMAT, "ok": False, "reason": mismatch}
    snapshot["ok"] = True
    return snapshot


def first_mismatch(reference: Any, ours: Tokenizer) -> str | None:
    """The first probe on which `ours` differs from `reference` (mlx-lm's wrapper), or None."""
    if set(reference.eos_token_ids) != set(ours.eos_token_ids):
        return "eos ids"
    if len(reference) != len(ours) or reference.vocab_size != ours.vocab_size:
        return "vocabulary size"
    for text in PROBE_TEXTS:
        for special in (True, False):
            ids = list(reference.encode(text, add_special_tokens=special))
            if ours.encode(text, add_special_tokens=special) != ids:
                return f"encode({text[:40]!r}, add_special_tokens={special})"
            if ours.decode(ids) != reference.decode(ids):
                return f"decode of {text[:40]!r}"
            detok = ours.detokenizer
            for token in ids:
                detok.add_token(token)
            detok.finalize()
            if detok.text != reference.decode(ids):
                return f"streamed text of {text[:40]!r}"
    if reference.has_chat_template != ours.has_chat_template:
        return "whether there is a chat template"
    if not ours.has_chat_template:
        return None
    for conversation in PROBE_CONVERSATIONS:
        messages = [dict(m) for m in conversation]
        options = (
            {"continue_final_message": True}
            if messages[-1]["role"] == "assistant"
            else {"add_generation_prompt": True}
        )
        for opts in (options, {}):
            try:
                expected = list(reference.apply_chat_template(messages, tokenize=True, **opts))
            except Exception:  # the template rejects this conversation: ours must too
                expected = None
            try:
                got = ours.apply_chat_template(messages, tokenize=True, **opts)
            except Exception:
                got = None
            if got != expected:
                return f"chat template on {messages[-1]['content'][:30]!r} with {opts}"
    return None


def snapshot_path(models_dir: Path, model_dir: Path) -> Path:
    return models_dir / "tokenizers" / f"{snapshot_key(model_dir)}.json"


def read_snapshot(path: Path) -> dict[str, Any] | None:
    try:
        with open(path, encoding="utf-8") as f:
            snapshot = json.load(f)
    except (OSError, ValueError):
        return None
    return snapshot if snapshot.get("format") == SNAPSHOT_FORMAT else None


def write_snapshot(path: Path, snapshot: Mapping[str, Any]) -> None:
    """Atomically: a reader sees the whole snapshot or none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        json.dump(snapshot, f)
    os.replace(tmp, path)


def ensure_snapshot(model_dir: Path, models_dir: Path, eos_token_ids: Any = None) -> dict[str, Any]:
    """The cached snapshot of `model_dir`'s tokenizer, taking it first if there is none: in
    this process where transformers is imported already, else in a child process, so that
    transformers' memory never stays in a process that did not already pay for it."""
    path = snapshot_path(models_dir, model_dir)
    snapshot = read_snapshot(path)
    if snapshot is not None:
        return snapshot
    if "transformers" in sys.modules:
        snapshot = take_snapshot(model_dir, eos_token_ids)
        write_snapshot(path, snapshot)
    else:
        snapshot = _snapshot_in_child(model_dir, path, eos_token_ids)
    log.info(
        "tokenizer_snapshot_taken",
        model_dir=str(model_dir),
        usable=snapshot["ok"],
        reason=snapshot["reason"] or None,
    )
    return snapshot


def _snapshot_in_child(model_dir: Path, path: Path, eos_token_ids: Any) -> dict[str, Any]:
    """Take the snapshot in a child process, which writes it to `path`. A child that fails
    (killed, out of memory, timed out) leaves nothing recorded, so the next load tries again
    rather than going through transformers for good; only a finished check is recorded."""
    cmd = [sys.executable, "-m", "speclora.daemon.tokenizer", str(model_dir), str(path)]
    if eos_token_ids is not None:
        cmd.append(json.dumps(eos_token_ids))
    try:
        result = subprocess.run(
            cmd,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            check=False,
            timeout=SNAPSHOT_CHILD_TIMEOUT_S,
        )
    except subprocess.TimeoutExpired:
        reason = f"child: no snapshot after {SNAPSHOT_CHILD_TIMEOUT_S:.0f} s"
    else:
        snapshot = read_snapshot(path) if result.returncode == 0 else None
        if snapshot is not None:
            return snapshot
        detail = (result.stderr or "").strip().splitlines()[-1:] or [f"exit {result.returncode}"]
        reason = f"child: {detail[0]}"
    return {"format": SNAPSHOT_FORMAT, "ok": False, "reason": reason}


def main(argv: Sequence[str]) -> int:
    """`python -m speclora.daemon.tokenizer MODEL_DIR OUT [EOS_IDS_JSON]`: take and write one."""
    model_dir, out = Path(argv[0]), Path(argv[1])
    eos = json.loads(argv[2]) if len(argv) > 2 else None
    write_snapshot(out, take_snapshot(model_dir, eos))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
