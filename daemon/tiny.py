"""Tiny random models in mlx-lm layout, with a real (small) BPE tokenizer.

Tests, the demo's fast mode and benchmarks of the machinery use these: they load through the
same code path as real models (config.json + model.safetensors + tokenizer.json) and build in
well under a second. Weights are random, so a draft that *is* the target accepts everything at
temperature 0 and an independently seeded draft accepts almost nothing (~2%).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")

# Enough varied English, digits and punctuation for a byte-level BPE to learn real merges.
_CORPUS = """
The quick brown fox jumps over the lazy dog. Speculative decoding lets a small draft model
propose tokens that a large target model verifies in one pass. When the draft is right the
target accepts several tokens at once; when it is wrong only one token is produced.
Paris is the capital of France. Berlin is the capital of Germany. Rome is the capital of Italy.
def add(a, b):\n    return a + b\nfor i in range(10):\n    print(i * 2)
1 2 3 4 5 6 7 8 9 10 100 1000 3.14159 2026-11-28 42 is the answer.
Explain quantum computing simply. A qubit can be zero, one, or both at the same time.
Write a haiku about the sea. Waves fold into foam; the tide remembers the moon.
Low-rank adaptation trains small matrices beside frozen weights. Acceptance rises.
café naïve résumé — “quotes” ‘single’ … emoji 🙂 and CJK 漢字 かな.
"""


@dataclass(frozen=True)
class TinyModelSpec:
    num_layers: int = 4
    hidden_size: int = 64
    intermediate_size: int = 128
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 384
    seed: int = 0
    max_position_embeddings: int = 2048
    # Tied like SmolLM2 (covers that loading path); random tied models only repeat themselves.
    tie_embeddings: bool = False


def build_tokenizer_json(vocab_size: int) -> str:
    """Train a byte-level BPE on the built-in corpus; returns tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    return tokenizer.to_str()


def write_tokenizer(path: Path, vocab_size: int) -> int:
    """Write tokenizer files into `path`; returns the real vocabulary size."""
    from tokenizers import Tokenizer

    text = build_tokenizer_json(vocab_size)
    (path / "tokenizer.json").write_text(text)
    size = Tokenizer.from_str(text).get_vocab_size()
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "bos_token": None,
                "eos_token": "<|im_end|>",
                "pad_token": "<|endoftext|>",
                "unk_token": None,
                "chat_template": CHATML_TEMPLATE,
                "model_max_length": 2048,
                "clean_up_tokenization_spaces": False,
            },
            indent=2,
        )
    )
    (path / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
    )
    return size


def write_tiny_model(path: Path, spec: TinyModelSpec = TinyModelSpec()) -> Path:
    """Write a random llama-architecture model in mlx-lm layout to `path`."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    path.mkdir(parents=True, exist_ok=True)
    vocab = write_tokenizer(path, spec.vocab_size)
    config = {
        "model_type": "llama",
        "hidden_size": spec.hidden_size,
        "num_hidden_layers": spec.num_layers,
        "intermediate_size": spec.intermediate_size,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "rope_theta": 10000.0,
        "tie_word_embeddings": spec.tie_embeddings,
        "max_position_embeddings": spec.max_position_embeddings,
        "eos_token_id": 2,
        "torch_dtype": "float32",
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    mx.random.seed(spec.seed)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    # Untied, with a small random head: with tied embeddings a random model just repeats its
    # last input token (e_x . e_x dominates), so any two random models would "agree". Untied,
    # predictions depend on the context and two independently seeded models rarely agree
    # (~2% of greedy tokens), while max next-token probabilities stay around 0.2-0.4.
    embed_key, head_key = mx.random.split(mx.random.key(spec.seed))
    model.model.embed_tokens.weight = mx.random.normal((vocab, spec.hidden_size), key=embed_key)
    if not spec.tie_embeddings:
        model.lm_head.weight = 0.5 * mx.random.normal((vocab, spec.hidden_size), key=head_key)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    return path


def write_tiny_pair(root: Path, seed: int = 0) -> tuple[Path, Path]:
    """A 4-layer target and an independently random 2-layer draft sharing one tokenizer."""
    target = write_tiny_model(root / "tiny-target", TinyModelSpec(num_layers=4, seed=seed))
    draft = write_tiny_model(root / "tiny-draft", TinyModelSpec(num_layers=2, seed=seed + 1000))
    return target, draft
