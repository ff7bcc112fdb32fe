"""Adapter versions: atomic writes, the active pointer, corruption, hot swap into the draft."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import mlx.core as mx
import pytest
from helpers.adapters import make_adapter
from mlx.utils import tree_flatten
from speclora.daemon import models
from speclora.daemon.errors import AdapterError
from speclora.daemon.learning.adapters import (
    CONFIG_FILE,
    PROMOTED,
    REJECTED,
    WEIGHTS_FILE,
    AdapterStore,
)
from speclora.daemon.learning.swap import (
    activate_version,
    apply_adapter,
    load_active_adapter,
    remove_adapter,
)
from speclora.daemon.state import ModelHub

PROBE = mx.array([[5, 17, 42, 99, 7, 3, 250, 11]])


def _hub(target: models.LoadedModel, draft: models.LoadedModel, spec: str) -> ModelHub:
    return ModelHub.from_loaded(target, draft, spec)


@pytest.fixture
def separate_hub(tiny_paths: tuple[Path, Path]) -> ModelHub:
    target = models.load_model(str(tiny_paths[0]))
    draft = models.load_model(str(tiny_paths[1]))
    return _hub(target, draft, str(tiny_paths[1]))


@pytest.fixture
def self_hub(tiny_target_path: Path) -> ModelHub:
    target = models.load_model(str(tiny_target_path))
    return _hub(target, models.make_self_draft(target, 2), "self:2")


@pytest.fixture
def store(tmp_path: Path) -> AdapterStore:
    return AdapterStore(tmp_path / "adapters")


def logits(model: object) -> mx.array:
    out = model(PROBE)  # type: ignore[operator]
    mx.eval(out)
    return out


# -- the pointer and versions (files only) --------------------------------------------------


def _dummy_version(store: AdapterStore, status: str = PROMOTED) -> str:
    def write(tmp: Path) -> None:
        (tmp / WEIGHTS_FILE).write_bytes(b"weights")
        (tmp / CONFIG_FILE).write_text("{}")

    return store.create(write, {"status": status, "reason": "r"}).version


def test_versions_activate_and_rollback(store: AdapterStore) -> None:
    v1, v2, v3 = (_dummy_version(store) for _ in range(3))
    assert (v1, v2, v3) == ("v0001", "v0002", "v0003")
    assert store.active_version() == ""
    store.activate(v1)
    store.activate(v3)
    store.activate(v2)
    assert store.active_version() == v2
    assert [i.version for i in store.list() if i.active] == [v2]
    assert store.rollback() == v3
    assert store.rollback() == v1
    assert store.rollback() == ""  # back to the base draft
    with pytest.raises(AdapterError, match="nothing to roll back"):
        store.rollback()
    store.activate(v1)
    store.activate("none")
    assert store.active_version() == ""
    assert store.rollback() == v1


def test_rejected_version_needs_force(store: AdapterStore) -> None:
    v = _dummy_version(store, status=REJECTED)
    with pytest.raises(AdapterError, match="--force"):
        store.activate(v)
    store.activate(v, force=True)
    assert store.active_version() == v


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "metadata"])
def test_damaged_version_is_refused_clearly(store: AdapterStore, damage: str) -> None:
    v = _dummy_version(store)
    path = store.path(v)
    if damage == "flip":
        (path / WEIGHTS_FILE).write_bytes(b"weightz")
    elif damage == "truncate":
        (path / WEIGHTS_FILE).write_bytes(b"wei")
    elif damage == "delete":
        (path / WEIGHTS_FILE).unlink()
    else:
        (path / "metadata.json").write_text("{not json")
    with pytest.raises(AdapterError, match=rf"adapter {v}: .*(corrupt|missing)"):
        store.verify(v)
    with pytest.raises(AdapterError):
        store.activate(v)
    assert [i.status for i in store.list()] == (["corrupt"] if damage == "metadata" else [PROMOTED])


def test_bad_version_names(store: AdapterStore) -> None:
    with pytest.raises(AdapterError, match="not an adapter version"):
        store.get("../etc")
    with pytest.raises(AdapterError, match="does not exist"):
        store.get("v0042")


_CRASHER = textwrap.dedent(
    """
    import os, signal, sys
    from pathlib import Path
    from speclora.daemon.learning.adapters import AdapterStore

    store = AdapterStore(sys.argv[1])
    when = sys.argv[2]

    def write(tmp: Path) -> None:
        (tmp / "adapters.safetensors").write_bytes(b"new weights")
        (tmp / "adapter_config.json").write_text("{}")
        if when == "before_rename":
            os.kill(os.getpid(), signal.SIGKILL)

    if when == "before_pointer":
        info = store.create(write, {"status": "promoted"})
        store._write_pointer = lambda data: os.kill(os.getpid(), signal.SIGKILL)
        store.activate(info.version)
    else:
        store.create(write, {"status": "promoted"})
    """
)


@pytest.mark.parametrize("when", ["before_rename", "before_pointer"])
def test_crash_during_promotion_leaves_previous_adapter_loadable(
    tmp_path: Path, self_hub: ModelHub, when: str
) -> None:
    store = AdapterStore(tmp_path / "adapters")
    v1 = make_adapter(store, self_hub, seed=1)
    activate_version(self_hub, store, v1)
    expected = logits(self_hub.draft)
    script = tmp_path / "crash.py"
    script.write_text(_CRASHER)
    proc = subprocess.run([sys.executable, str(script), str(store.root), when], timeout=60)
    assert proc.returncode == -signal.SIGKILL

    store = AdapterStore(store.root)  # as the restarted daemon sees it
    assert store.active_version() == v1
    assert store.versions() == ([v1] if when == "before_rename" else [v1, "v0002"])
    remove_adapter(self_hub)
    assert load_active_adapter(self_hub, store) == v1
    assert mx.allclose(logits(self_hub.draft), expected).item()
    assert not list(store.root.glob(".tmp-*"))  # the half-written version was cleaned up


# -- hot swap into the draft ---------------------------------------------------------------


def test_separate_draft_adapter_matches_mlx_lm_adapter_path(
    separate_hub: ModelHub, store: AdapterStore, tiny_draft_path: Path
) -> None:
    from mlx_lm import load

    base = logits(separate_hub.draft)
    v = make_adapter(store, separate_hub, seed=3)
    assert apply_adapter(separate_hub, store, v) is not None
    ours = logits(separate_hub.draft)
    assert not mx.allclose(ours, base, atol=1e-4).item()
    reference, _ = load(str(tiny_draft_path), adapter_path=str(store.path(v)))
    assert mx.allclose(ours, logits(reference), atol=1e-5).item()
    assert separate_hub.adapter_version == v
    remove_adapter(separate_hub)
    assert mx.allclose(logits(separate_hub.draft), base, atol=1e-6).item()
    assert separate_hub.adapter_version == ""


def test_weights_are_recounted_at_every_swap(self_hub: ModelHub, store: AdapterStore) -> None:
    """Stats reports the pair's weights: an adapter's LoRA layers are in it while applied."""
    base = self_hub.weight_bytes
    assert base == models.unique_weight_bytes(self_hub.target, self_hub.draft)
    apply_adapter(self_hub, store, make_adapter(store, self_hub, seed=1))
    lora_bytes = sum(
        array.nbytes
        for name, array in tree_flatten(self_hub.draft.parameters())
        if name.endswith(("lora_a", "lora_b"))
    )
    assert lora_bytes > 0 and self_hub.weight_bytes == base + lora_bytes
    assert self_hub.resident_weight_bytes() == self_hub.weight_bytes  # no restricted head here
    remove_adapter(self_hub)
    assert self_hub.weight_bytes == base


def test_self_draft_swap_never_touches_the_target(self_hub: ModelHub, store: AdapterStore) -> None:
    target_before = logits(self_hub.target)
    norm_before = self_hub.target.model.norm.weight
    base = logits(self_hub.draft)
    v1, v2 = make_adapter(store, self_hub, seed=1), make_adapter(store, self_hub, seed=2)
    apply_adapter(self_hub, store, v1)
    with_v1 = logits(self_hub.draft)
    apply_adapter(self_hub, store, v2)  # swap to another version in place
    with_v2 = logits(self_hub.draft)
    assert not mx.allclose(with_v1, with_v2, atol=1e-4).item()
    apply_adapter(self_hub, store, v1)
    assert mx.allclose(logits(self_hub.draft), with_v1, atol=1e-6).item()
    assert self_hub.target.model.norm.weight is norm_before
    assert mx.array_equal(logits(self_hub.target), target_before).item()
    remove_adapter(self_hub)
    assert mx.allclose(logits(self_hub.draft), base, atol=1e-6).item()
    # The self-draft still shares the target's layer weights: LoRA is not fused into them.
    q_target = self_hub.target.model.layers[0].self_attn.q_proj.weight
    assert self_hub.draft.model.layers[0].self_attn.q_proj.weight is q_target


def test_corrupt_adapter_is_refused_and_the_draft_keeps_serving(
    self_hub: ModelHub, store: AdapterStore
) -> None:
    v1 = make_adapter(store, self_hub, seed=1)
    v2 = make_adapter(store, self_hub, seed=2)
    activate_version(self_hub, store, v1)
    serving = logits(self_hub.draft)
    weights = store.path(v2) / WEIGHTS_FILE
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    with pytest.raises(AdapterError, match=f"adapter {v2}: adapters.safetensors is corrupt"):
        activate_version(self_hub, store, v2)
    assert self_hub.adapter_version == v1
    assert store.active_version() == v1
    assert mx.allclose(logits(self_hub.draft), serving).item()


def test_start_falls_back_to_the_last_good_adapter(self_hub: ModelHub, store: AdapterStore) -> None:
    v1 = make_adapter(store, self_hub, seed=1)
    v2 = make_adapter(store, self_hub, seed=2)
    store.activate(v1)
    store.activate(v2)
    (store.path(v2) / WEIGHTS_FILE).write_bytes(b"garbage")
    assert load_active_adapter(self_hub, store) == v1
    assert self_hub.adapter_version == v1
    assert store.active_version() == v1
    (store.path(v1) / CONFIG_FILE).unlink()
    assert load_active_adapter(self_hub, store) == ""
    assert self_hub.adapter_version == ""
    assert store.active_version() == ""


def test_adapter_for_another_draft_is_refused(
    self_hub: ModelHub, separate_hub: ModelHub, store: AdapterStore, tiny_target_path: Path
) -> None:
    v = make_adapter(store, separate_hub, seed=1)
    with pytest.raises(AdapterError, match="trained for draft"):
        apply_adapter(self_hub, store, v)
    assert self_hub.adapter_version == ""
    # A draft of another shape under the same name (the config changed): shapes catch it.
    target = models.load_model(str(tiny_target_path))
    deeper = _hub(target, models.make_self_draft(target, 3), "self:3")
    deeper.draft_name = self_hub.draft_name
    v2 = make_adapter(store, self_hub, seed=2)
    before = logits(deeper.draft)
    with pytest.raises(AdapterError, match="does not fit this draft"):
        apply_adapter(deeper, store, v2)
    assert deeper.adapter_version == ""
    assert mx.array_equal(logits(deeper.draft), before).item()


def test_rollback_through_the_rpc_helper(self_hub: ModelHub, store: AdapterStore) -> None:
    base = logits(self_hub.draft)
    v1 = make_adapter(store, self_hub, seed=1)
    v2 = make_adapter(store, self_hub, seed=2)
    activate_version(self_hub, store, v1)
    with_v1 = logits(self_hub.draft)
    info = activate_version(self_hub, store, v2)
    assert info is not None and info.active and info.version == v2
    info = activate_version(self_hub, store, rollback=True)
    assert info is not None and info.version == v1 and self_hub.adapter_version == v1
    assert mx.allclose(logits(self_hub.draft), with_v1, atol=1e-6).item()
    assert activate_version(self_hub, store, rollback=True) is None
    assert mx.allclose(logits(self_hub.draft), base, atol=1e-6).item()
    assert os.path.exists(store.root / "active.json")
