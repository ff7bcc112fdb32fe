"""RoPE on the CPU (daemon/cpu_rope.py): bit for bit MLX's own, its tables shared between
calls, MLX's own wherever it does not apply."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from speclora.daemon import cpu_rope
from speclora.daemon.engine.batch import batched_forward
from speclora.daemon.engine.events import ForwardPass

MLX_ROPE = cpu_rope._original


def _x(shape: tuple[int, ...], dtype=mx.float32, seed: int = 0) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array(rng.standard_normal(shape).astype(np.float32)).astype(dtype)


def _both(x, dims, **kw):
    kw.setdefault("traditional", False)
    kw.setdefault("base", 10000.0)
    kw.setdefault("scale", 1.0)
    kw.setdefault("offset", 0)
    return MLX_ROPE(x, dims, **kw), cpu_rope.rope(x, dims, **kw)


def test_installed_for_the_process_on_this_cpu() -> None:
    # conftest imports speclora.daemon.blas, which installs it before any model runs.
    assert cpu_rope.installed() and MLX_ROPE is not None
    assert mx.fast.rope is cpu_rope.rope
    assert cpu_rope.install() is True  # idempotent


@pytest.mark.parametrize(
    ("dtype", "shape", "half_dims", "traditional"),
    list(
        itertools.product(
            (mx.float32, mx.float16, mx.bfloat16),
            ((1, 9, 5, 64), (3, 7, 16), (1, 2, 3, 4, 32), (6, 3, 1, 64)),
            (False, True),
            (False, True),
        )
    ),
)
def test_bit_identical_to_mlx_rope(dtype, shape, half_dims, traditional) -> None:
    x = _x(shape, dtype)
    dims = shape[-1] // 2 if half_dims else shape[-1]
    offsets = [0, 7, 4096, mx.array(5), mx.array([3], mx.int64)]
    offsets.append(mx.arange(shape[0], dtype=mx.int32) * 13 + 2)  # one per batch row
    for (base, freqs), scale, offset in itertools.product(
        ((10000.0, None), (1e6, None), (None, mx.linspace(1.0, 40.0, dims // 2))),
        (1.0, 0.25),
        offsets,
    ):
        want, got = _both(
            x, dims, traditional=traditional, base=base, scale=scale, offset=offset, freqs=freqs
        )
        assert got.shape == want.shape and got.dtype == want.dtype
        assert mx.array_equal(got, want).item(), (base, scale, offset)


@pytest.mark.parametrize("traditional", [False, True])
def test_gradients_are_mlx_ropes(traditional: bool) -> None:
    x, weights = _x((1, 9, 5, 64)), _x((1, 9, 5, 64), seed=1)
    grads = [
        mx.grad(
            lambda a, fn=fn: (
                fn(a, 64, traditional=traditional, base=10000.0, scale=1.0, offset=11) * weights
            ).sum()
        )(x)
        for fn in (MLX_ROPE, cpu_rope.rope)
    ]
    assert mx.array_equal(grads[0], grads[1]).item()


def test_tables_are_made_once_per_positions_and_bounded() -> None:
    cpu_rope._tables.clear()
    q, k = _x((1, 9, 3, 64)), _x((1, 3, 3, 64), seed=1)
    for _ in range(30):  # a pass: every layer's queries and keys at the same positions
        cpu_rope.rope(q, 64, traditional=False, base=10000.0, scale=1.0, offset=40)
        cpu_rope.rope(k, 64, traditional=False, base=10000.0, scale=1.0, offset=40)
    assert len(cpu_rope._tables) == 1
    positions = cpu_rope.positions(list(range(40, 46)))
    for _ in range(3):
        cpu_rope.rope(_x((6, 3, 1, 64)), 64, traditional=False, base=10000.0, scale=1.0,
                      offset=positions)  # fmt: skip
    assert len(cpu_rope._tables) == 2
    for offset in range(3 * cpu_rope._TABLES_KEPT):  # a long generation's passes
        want, got = _both(q, 64, offset=offset)
        assert mx.array_equal(got, want).item()
    assert len(cpu_rope._tables) <= cpu_rope._TABLES_KEPT


def test_inside_compile_it_is_what_mlx_rope_compiles_to() -> None:
    x = _x((1, 9, 5, 64))
    kw = {"traditional": False, "base": 10000.0, "scale": 1.0, "offset": 3}
    ours = mx.compile(lambda a: cpu_rope.rope(a, 64, **kw))
    theirs = mx.compile(lambda a: MLX_ROPE(a, 64, **kw))
    for seed in range(3):  # the tables a traced call made serve later calls, traced or not
        x = _x((1, 9, 5, 64), seed=seed)
        assert mx.array_equal(ours(x), theirs(x)).item()
        assert mx.array_equal(cpu_rope.rope(x, 64, **kw), MLX_ROPE(x, 64, **kw)).item()


@pytest.mark.parametrize(
    "kw",
    [
        {"dims": 63},  # odd
        {"dims": 128},  # wider than the input
        {"offset": mx.zeros((2, 2), mx.int32)},  # more than one dimension
        {"offset": mx.arange(3)},  # neither one nor one per batch row
        {"offset": mx.array(1.5)},  # not an integer
        {"freqs": mx.ones((32,))},  # with a base too
        {"base": None},  # neither
    ],
)
def test_what_mlx_refuses_it_refuses_the_same_way(kw) -> None:
    args = {"traditional": False, "base": 10000.0, "scale": 1.0, "offset": 0} | kw
    dims = args.pop("dims", 64)
    x = _x((2, 9, 5, 64))
    errors = []
    for fn in (MLX_ROPE, cpu_rope.rope):
        with pytest.raises((ValueError, TypeError)) as caught:
            mx.eval(fn(x, dims, **args))
        errors.append((type(caught.value), str(caught.value)))
    assert errors[0] == errors[1]


def test_a_model_pass_and_a_batched_forward_are_unchanged(tiny_loaded) -> None:
    target = tiny_loaded[0]
    rng = np.random.default_rng(0)
    prefixes = [rng.integers(0, 300, n).tolist() for n in (3, 40, 17)]
    rows = [mx.array(rng.integers(0, 300, w), mx.uint32) for w in (1, 5, 3)]
    results = []
    for fn in (MLX_ROPE, cpu_rope.rope):
        mx.fast.rope = fn
        try:
            caches = [make_prompt_cache(target) for _ in prefixes]
            for prefix, cache in zip(prefixes, caches, strict=True):
                target(mx.array(prefix, mx.uint32)[None], cache=cache)
            alone = target(rows[0][None], cache=caches[0])
            shared = batched_forward(
                target,
                [ForwardPass(target, r, c) for r, c in zip(rows[1:], caches[1:], strict=True)],
            )
            mx.eval(alone, shared)
            results.append([alone, *shared])
        finally:
            mx.fast.rope = cpu_rope.rope
    for want, got in zip(*results, strict=True):
        assert mx.array_equal(got, want).item()


def test_off_with_the_environment_variable() -> None:
    code = (
        "import speclora.daemon.blas, mlx.core as mx\n"
        "from speclora.daemon import cpu_rope, cpu_attention\n"
        "print(cpu_rope.installed(), mx.fast.rope is cpu_rope.rope,"
        " cpu_attention.attention_info().label)\n"
    )
    env = os.environ | {"SPECLORA_CPU_ROPE": "0"}
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[:2] == ["False", "False"]
    assert "rope" not in " ".join(out[2:])


def test_making_tables_does_not_wait_for_work_queued_before_it() -> None:
    # mlx-lm's generate_step queues a pass (async_eval) and builds the next one meanwhile; an
    # eval of the tables on the caller's stream would wait for the queued pass first.
    import time

    a = _x((1536, 1536))
    mx.eval(a)

    def queued_work():
        y = a
        for _ in range(8):
            y = y @ a
        return y

    start = time.perf_counter()
    mx.eval(queued_work())
    alone = time.perf_counter() - start
    work = queued_work()
    mx.async_eval(work)
    x = _x((1, 9, 1, 64))
    start = time.perf_counter()
    cpu_rope.rope(x, 64, traditional=False, base=10000.0, scale=1.0, offset=123_457)  # new tables
    made = time.perf_counter() - start
    mx.eval(work)
    assert made < 0.25 * alone, (made, alone)


def test_an_offset_updated_in_place_gets_its_new_value() -> None:
    # mlx-lm's BatchKVCache does `offset += n`: the same array object, a new value. Only arrays
    # positions() made are keyed by identity; any other array offset gets tables of its value.
    cpu_rope._tables.clear()
    x = _x((2, 4, 1, 64))
    offset = mx.array([3, 5])
    for _ in range(3):
        want, got = _both(x, 64, offset=offset)
        assert mx.array_equal(got, want).item()
        offset += 7
    assert not cpu_rope._tables  # nothing kept under an identity that may change value
