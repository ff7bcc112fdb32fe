"""The CPU attention path (daemon/cpu_attention.py): the same attention as MLX's, on the calls it
takes; MLX's own on the rest; the JIT's g++ with the CPU's vector flags."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from speclora.daemon import cpu_attention
from speclora.daemon.cpu_attention import (
    JIT_FLAGS,
    cpu_flags,
    folded_attention,
    install_jit_flags,
    scaled_dot_product_attention,
)

ORIGINAL = cpu_attention._original


def _qkv(hq: int, hkv: int, length: int, keys: int, dim: int = 16, seed: int = 0, dtype=mx.float32):
    rng = np.random.default_rng(seed)
    q = mx.array(rng.standard_normal((1, hq, length, dim)).astype(np.float32)).astype(dtype)
    k = mx.array(rng.standard_normal((1, hkv, keys, dim)).astype(np.float32)).astype(dtype)
    v = mx.array(rng.standard_normal((1, hkv, keys, dim)).astype(np.float32)).astype(dtype)
    return q, k, v


def test_installed_for_the_process_on_this_cpu() -> None:
    # conftest imports speclora.daemon.blas, which installs it before any model runs.
    info = cpu_attention.attention_info()
    assert info.folded and ORIGINAL is not None
    assert mx.fast.scaled_dot_product_attention is scaled_dot_product_attention
    assert cpu_attention.install() is info  # idempotent


@pytest.mark.parametrize(
    ("hq", "hkv", "length", "keys", "mask"),
    [
        (9, 3, 1, 40, None),  # a decode step, grouped-query heads
        (9, 3, 5, 40, "causal"),  # a verify pass over cached context
        (4, 4, 7, 7, "causal"),  # a prefill chunk, one key/value head per query head
        (6, 1, 3, 20, "causal"),  # multi-query
        (9, 3, 4, 30, "bool"),
        (9, 3, 4, 30, "additive"),
        (9, 3, 4, 30, "bool4d"),
    ],
)
def test_folded_attention_is_mlx_attention(hq, hkv, length, keys, mask) -> None:
    q, k, v = _qkv(hq, hkv, length, keys)
    scale = q.shape[-1] ** -0.5
    if mask in ("bool", "additive", "bool4d"):
        rng = np.random.default_rng(1)
        allowed = rng.random((length, keys)) < 0.6
        allowed[:, 0] = True  # every query sees a key
        if mask == "additive":
            mask = mx.array(np.where(allowed, 0.0, -1e9).astype(np.float32))
        elif mask == "bool4d":
            mask = mx.array(allowed)[None, None]
        else:
            mask = mx.array(allowed)
    ours = scaled_dot_product_attention(q, k, v, scale=scale, mask=mask)
    theirs = ORIGINAL(q, k, v, scale=scale, mask=mask)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-5, atol=1e-5)


def test_shape_changes_between_calls_do_not_reuse_a_stale_kernel() -> None:
    # The exp is compiled shapeless: growing contexts and widths must each be right.
    for keys, length in ((10, 1), (11, 1), (300, 5), (301, 9), (12, 3)):
        q, k, v = _qkv(9, 3, length, keys, seed=keys)
        mask = "causal" if length > 1 else None
        ours = folded_attention(q, k, v, 0.25, mask)
        theirs = ORIGINAL(q, k, v, scale=0.25, mask=mask)
        np.testing.assert_allclose(np.array(ours), np.array(theirs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["float16", "bfloat16", "sinks", "per_head_mask"])
def test_what_it_does_not_take_goes_to_mlx(case: str) -> None:
    dtype = {"float16": mx.float16, "bfloat16": mx.bfloat16}.get(case, mx.float32)
    q, k, v = _qkv(4, 2, 3, 12, dtype=dtype)
    kwargs: dict = {"scale": 0.25, "mask": "causal"}
    if case == "sinks":
        kwargs["sinks"] = mx.zeros((4,))
    if case == "per_head_mask":
        kwargs["mask"] = mx.ones((1, 4, 3, 12), dtype=mx.bool_)
    assert mx.array_equal(
        scaled_dot_product_attention(q, k, v, **kwargs), ORIGINAL(q, k, v, **kwargs)
    )


def test_gradients_match_mlx_attention() -> None:
    # The LoRA trainer differentiates through the draft's attention.
    q, k, v = _qkv(6, 2, 5, 5)

    def loss(fn, q, k, v):
        return (fn(q, k, v, scale=0.3, mask="causal") ** 2).sum()

    ours = mx.grad(lambda *a: loss(scaled_dot_product_attention, *a), argnums=(0, 1, 2))(q, k, v)
    theirs = mx.grad(lambda *a: loss(ORIGINAL, *a), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, theirs, strict=True):
        np.testing.assert_allclose(np.array(a), np.array(b), rtol=1e-4, atol=1e-5)


needs_avx2 = pytest.mark.skipif(
    not {"avx2", "fma", "f16c"} <= cpu_flags(), reason="the JIT flags are for AVX2 CPUs"
)


@needs_avx2
def test_jit_compiler_shim_adds_the_flags_and_a_private_kernel_cache(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", os.environ["PATH"])
    monkeypatch.setenv("TMPDIR", os.environ.get("TMPDIR", "/tmp"))
    assert install_jit_flags(tmp_path / "jit") == JIT_FLAGS
    shim = tmp_path / "jit" / "bin" / "g++"
    assert os.environ["PATH"].split(os.pathsep)[0] == str(shim.parent)
    assert os.environ["TMPDIR"] == str(tmp_path / "jit" / "tmp")
    assert shim.stat().st_mode & 0o777 == 0o700
    # What MLX's JIT runs (`g++ ...` through the shell) now compiles for AVX2.
    out = subprocess.run(
        "echo | g++ -E -dM -x c++ -", shell=True, capture_output=True, text=True, check=True
    ).stdout
    assert "#define __AVX2__ 1" in out and "#define __FMA__ 1" in out
    # Installing again neither nests the shim nor lists its directory twice.
    assert install_jit_flags(tmp_path / "jit") == JIT_FLAGS
    assert os.environ["PATH"].split(os.pathsep).count(str(shim.parent)) == 1
    real = shim.read_text().split("exec", 1)[1].split()[0].strip('"')
    assert cpu_attention.SHIM_MARK not in Path(real).read_text(errors="replace")


def test_no_compiler_means_no_shim(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", os.environ["PATH"])
    assert install_jit_flags(tmp_path / "jit", path_env=str(tmp_path / "empty")) == ()
    assert not (tmp_path / "jit" / "bin" / "g++").exists()


@needs_avx2
def test_compiled_kernels_run_with_the_flags_and_the_same_exp() -> None:
    # A compiled exp (the one folded_attention uses) gives MLX's exp bit for bit: the
    # polynomial is MLX's and an FMA is exact with or without the flags.
    x = mx.array(np.random.default_rng(3).standard_normal((45, 300)).astype(np.float32)) * 20
    top = mx.max(x, axis=-1, keepdims=True)
    assert mx.array_equal(cpu_attention._exp_shift_fn()(x, top), mx.exp(x - top))
    kernels = Path(os.environ["TMPDIR"]) / "mlx"
    assert kernels.is_dir() and any(kernels.rglob("*.so"))
