"""The model pair as the engine worker holds it.

Only the worker thread reads or mutates a ModelHub (MLX is not thread-safe): generations read
`target`, `draft` and `tokenizer` and feed `prompt_cache` and `acceptance`; the learning loop
swaps adapters into `draft` between engine steps by mutating it from inside the worker. The
exception is `history`, thread-safe itself: its writer thread adds what the worker records.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from speclora.daemon.models import model_identity


@dataclass
class ModelHub:
    target: Any  # mlx.nn.Module (mlx-lm model)
    draft: Any | None  # mlx.nn.Module, None = no speculation possible
    tokenizer: Any  # mlx_lm TokenizerWrapper
    target_name: str
    draft_name: str  # e.g. "self:4 of <target>" or a model name; "" when no draft
    draft_spec: str = ""  # the config value that built the draft
    adapter_version: str = ""  # "" = base draft, no adapter
    # Target + draft weights, shared arrays counted once (an adapter's LoRA layers included:
    # swap.py recounts at every hot-swap); `resident_weight_bytes` adds the draft's head rows.
    weight_bytes: int = 0
    max_context: int = 2048  # tokens the target can attend to
    extras: dict[str, Any] = field(default_factory=dict)  # e.g. the draft vocabulary table
    # What finished requests leave for later ones: their KV caches (engine.PromptCache,
    # None = off) and, per adapter version, the draft's acceptance (engine.AcceptanceMemory).
    prompt_cache: Any | None = None
    acceptance: dict[str, Any] = field(default_factory=dict)
    # The target's identity (models.model_identity) and its history of past requests
    # (learning.history_recorder.History, None = the history drafter is off).
    target_id: str = ""
    history: Any | None = None

    @classmethod
    def from_loaded(
        cls, target: Any, draft: Any | None, draft_spec: str = "", **extra: Any
    ) -> ModelHub:
        """A hub over two `models.LoadedModel`s (draft None = no speculation)."""
        return cls(
            target=target.model,
            draft=draft.model if draft else None,
            tokenizer=target.tokenizer,
            target_name=target.name,
            draft_name=draft.name if draft else "",
            draft_spec=draft_spec,
            weight_bytes=target.weight_bytes + (draft.weight_bytes if draft else 0),
            max_context=target.max_context,
            target_id=model_identity(target.name, target.path),
            **extra,
        )

    def resident_weight_bytes(self) -> int:
        """Every weight the pair keeps resident: `weight_bytes` plus the rows of the draft's
        restricted head (engine.DraftVocab), a copy of embedding rows the draft runs with. Read
        by Stats from other threads: plain ints only."""
        vocab = self.extras.get("draft_vocab")
        return self.weight_bytes + (vocab.head_bytes if vocab is not None else 0)
