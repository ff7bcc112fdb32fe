"""The skinny cblas_sgemm (native/skinny_sgemm.c) that sits in front of the BLAS on Linux
x86-64: right results for the products it takes, everything else handed to the BLAS, safe from
several threads and after a fork, and in use by MLX."""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import threading

import numpy as np
import pytest
from speclora.daemon import blas

ON_X86_LINUX = sys.platform == "linux" and platform.machine() == "x86_64"
pytestmark = pytest.mark.skipif(
    blas._skinny is None, reason="the skinny kernel is not loaded (not Linux x86-64 with AVX2)"
)
ROW_MAJOR, NO_TRANS, TRANS = 101, 111, 112
_FLOATS = np.ctypeslib.ndpointer(np.float32, flags="C_CONTIGUOUS")


@pytest.mark.skipif(not ON_X86_LINUX, reason="built on Linux x86-64 only")
def test_the_kernel_is_built_and_in_front_of_the_blas_on_linux_x86() -> None:
    # `make setup` builds it (setup.py); a build that silently failed would land here.
    assert blas.skinny_library() is not None
    assert blas.blas_info().skinny_rows == blas.SKINNY_MAX_ROWS
    assert blas.blas_info().label.endswith("+skinny")


def _sgemm():
    fn = blas._skinny.cblas_sgemm
    fn.restype = None
    fn.argtypes = [ctypes.c_int] * 6 + [
        ctypes.c_float,
        _FLOATS,
        ctypes.c_int,
        _FLOATS,
        ctypes.c_int,
        ctypes.c_float,
        _FLOATS,
        ctypes.c_int,
    ]
    return fn


def _counts() -> tuple[int, int]:
    lib = blas._skinny
    lib.skinny_fast_calls.restype = lib.skinny_fallback_calls.restype = ctypes.c_long
    return lib.skinny_fast_calls(), lib.skinny_fallback_calls()


def _a_times_b_transposed(a: np.ndarray, b: np.ndarray, n: int, k: int, ldc: int) -> np.ndarray:
    """C = A[:, :k] @ B[:n, :k]^T through the kernel's cblas_sgemm, with lda/ldb/ldc as given
    by the arrays' widths (padding beyond k and n must be left alone)."""
    m = a.shape[0]
    c = np.full((m, ldc), 7.0, np.float32)
    _sgemm()(ROW_MAJOR, NO_TRANS, TRANS, m, n, k, 1.0, a, a.shape[1], b, b.shape[1], 0.0, c, ldc)
    return c


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 8, 10, 17, 32])
@pytest.mark.parametrize(("n", "k", "pad"), [(1536, 576, 0), (577, 1001, 3), (4099, 33, 5)])
def test_skinny_products_match_a_float64_reference(m: int, n: int, k: int, pad: int) -> None:
    rng = np.random.default_rng(m * 1000 + k)
    a = rng.standard_normal((m, k + pad), dtype=np.float32)
    b = rng.standard_normal((n + pad, k + pad), dtype=np.float32)
    fast_before, _ = _counts()
    c = _a_times_b_transposed(a, b, n, k, ldc=n + pad)
    assert _counts()[0] == fast_before + 1  # the kernel took it
    want = a[:, :k].astype(np.float64) @ b[:n, :k].astype(np.float64).T
    np.testing.assert_allclose(c[:, :n], want, rtol=1e-4, atol=1e-4 * np.sqrt(k))
    assert (c[:, n:] == 7.0).all()  # nothing written past N in a padded C


def test_a_row_gets_the_same_bits_alone_as_among_others() -> None:
    """Each (row, column) sums in an order fixed by K: batching rows, or a verify's width,
    never changes a row's logits."""
    rng = np.random.default_rng(1)
    rows = blas.SKINNY_MAX_ROWS
    a = rng.standard_normal((rows, 577), dtype=np.float32)  # K = 577: a tail past the lanes too
    b = rng.standard_normal((2048, 577), dtype=np.float32)
    together = _a_times_b_transposed(a, b, 2048, 577, 2048)
    for row in (0, 4, rows - 1):
        alone = _a_times_b_transposed(np.ascontiguousarray(a[row : row + 1]), b, 2048, 577, 2048)
        assert np.array_equal(alone[0], together[row])


def _blas_sgemm():
    fn = blas._handle.cblas_sgemm  # the BLAS's own, looked up in its handle
    fn.restype, fn.argtypes = None, _sgemm().argtypes
    return fn


@pytest.mark.parametrize(
    "case", ["too many rows", "beta", "alpha", "column major", "b not transposed", "small"]
)
def test_other_products_go_to_the_blas_unchanged(case: str) -> None:
    rng = np.random.default_rng(2)
    m, n, k = (blas.SKINNY_MAX_ROWS + 6 if case == "too many rows" else 4), 512, 256
    if case == "small":
        n, k = 64, 64  # too small to be worth waking threads for
    order = 102 if case == "column major" else ROW_MAJOR
    tb = NO_TRANS if case == "b not transposed" else TRANS
    alpha, beta = (0.5 if case == "alpha" else 1.0), (2.0 if case == "beta" else 0.0)
    a = rng.standard_normal((max(m, k), max(m, k)), dtype=np.float32)
    b = rng.standard_normal((max(n, k), max(n, k)), dtype=np.float32)
    c = rng.standard_normal((max(m, n), max(m, n)), dtype=np.float32)
    args = (order, NO_TRANS, tb, m, n, k, alpha, a, a.shape[1], b, b.shape[1], beta)
    want = c.copy()
    _blas_sgemm()(*args, want, c.shape[1])
    before = _counts()
    _sgemm()(*args, c, c.shape[1])
    assert _counts() == (before[0], before[1] + 1)
    assert np.array_equal(c, want)


def test_products_from_several_threads_at_once_are_all_right() -> None:
    """The daemon can multiply on two threads at once (a request and the learner): one gets the
    helper threads, the other runs on its own thread, neither sees the other's rows."""
    rng = np.random.default_rng(3)
    b = rng.standard_normal((3000, 512), dtype=np.float32)
    inputs = [rng.standard_normal((1 + i % 6, 512), dtype=np.float32) for i in range(8)]
    want = [a.astype(np.float64) @ b.astype(np.float64).T for a in inputs]
    errors: list[str] = []

    def work(i: int) -> None:
        for _ in range(30):
            got = _a_times_b_transposed(inputs[i], b, 3000, 512, 3000)
            if not np.allclose(got, want[i], rtol=1e-4, atol=1e-2):
                errors.append(f"thread {i}")
                return

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(inputs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(thread.is_alive() for thread in threads), "a product hung"
    assert not errors, errors


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork")
def test_a_forked_child_multiplies_without_its_parents_threads() -> None:
    rng = np.random.default_rng(4)
    a = rng.standard_normal((3, 576), dtype=np.float32)
    b = rng.standard_normal((2048, 576), dtype=np.float32)
    want = _a_times_b_transposed(a, b, 2048, 576, 2048)  # the parent's helpers are running
    pid = os.fork()
    if pid == 0:  # the child: a product must not wait for helper threads it does not have
        ok = np.array_equal(_a_times_b_transposed(a, b, 2048, 576, 2048), want)
        os._exit(0 if ok else 1)
    import time

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            assert os.waitstatus_to_exitcode(status) == 0
            return
        time.sleep(0.05)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    pytest.fail("the forked child's product hung")


def test_mlx_linear_layers_run_in_the_kernel() -> None:
    import mlx.core as mx
    import mlx.nn as nn

    layer = nn.Linear(576, 1536, bias=False)
    x = mx.random.normal((1, 5, 576))
    fast_before, _ = _counts()
    y = layer(x)
    mx.eval(y)
    assert _counts()[0] == fast_before + 1
    want = np.array(x, np.float64)[0] @ np.array(layer.weight, np.float64).T
    np.testing.assert_allclose(np.array(y)[0], want, rtol=1e-4, atol=1e-3)


def test_more_helper_threads_than_cores_still_finish_every_product() -> None:
    """The BLAS's thread count can exceed the cores the daemon gets (a busy machine, a CPU
    quota): helpers the OS does not schedule must not hold a product up or lose its rows."""
    import subprocess
    import time

    code = (
        "import numpy as np, speclora.daemon.blas as b, mlx.core as mx\n"
        "assert b.blas_info().skinny_rows\n"
        "rng = np.random.default_rng(5)\n"
        "w = rng.standard_normal((4096, 576), dtype=np.float32)\n"
        "for m in (1, 3, 5, 8, 10, 17, 32) * 15:\n"
        "    x = rng.standard_normal((m, 576), dtype=np.float32)\n"
        "    y = np.array(mx.array(x) @ mx.array(w).T)\n"
        "    assert np.allclose(y, x.astype(np.float64) @ w.T.astype(np.float64), atol=1e-2), m\n"
        "print('ok')\n"
    )
    env = {**os.environ, "OPENBLAS_NUM_THREADS": str(4 * (os.cpu_count() or 1))}
    start = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]
    assert time.monotonic() - start < 60


def test_turned_off_the_blas_runs_alone() -> None:
    import subprocess

    code = (
        "import numpy as np, speclora.daemon.blas as b, mlx.core as mx\n"
        "x = np.ones((5, 576), np.float32); w = np.ones((1536, 576), np.float32)\n"
        "y = np.array(mx.array(x) @ mx.array(w).T)\n"
        "print(b.blas_info().label, b._skinny is None, float(y.max()))\n"
    )
    env = {**os.environ, "SPECLORA_SKINNY_SGEMM": "0"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == [blas.blas_info().name, "True", "576.0"]
