"""The BLAS preload is what makes verification of K+1 tokens cheap on Linux CPUs."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
from speclora.daemon.blas import (
    OPENBLAS_CANDIDATES,
    blas_info,
    candidates,
    cpu_vendor,
    openblas_max_threads,
)


def _interleaved_min_seconds(rows: tuple[int, ...], trials: int = 40, repeats: int = 5):
    """Best time per product for each row count, measured alternately so that load from other
    processes on a shared machine hits every size alike; the minimum is the machine's speed."""
    import mlx.core as mx

    b = mx.random.normal((2048, 2048))
    inputs = {m: mx.random.normal((m, 2048)) for m in rows}
    mx.eval(b, *inputs.values(), *(a @ b for a in inputs.values()))
    best = dict.fromkeys(rows, float("inf"))
    for _ in range(trials):
        for m, a in inputs.items():
            start = time.perf_counter()
            for _ in range(repeats):
                mx.eval(a @ b)
            best[m] = min(best[m], (time.perf_counter() - start) / repeats)
    return best


@pytest.mark.skipif(sys.platform != "linux", reason="Linux-only preload")
def test_the_best_installed_blas_is_loaded_before_mlx() -> None:
    info = blas_info()
    assert info.fast, info
    best = candidates(cpu_vendor())
    expected = "mkl" if "libmkl" in best[0] else "openblas"  # (MKL only where speclora[mkl] is)
    assert info.name == expected, (info, best[:2])


def test_mkl_comes_first_on_intel_only(tmp_path) -> None:
    (tmp_path / "lib").mkdir()
    mkl = tmp_path / "lib" / "libmkl_rt.so.3"
    assert candidates("GenuineIntel", str(tmp_path)) == list(OPENBLAS_CANDIDATES)  # not there
    mkl.touch()
    assert candidates("GenuineIntel", str(tmp_path))[0] == str(mkl)
    assert candidates("AuthenticAMD", str(tmp_path)) == [*OPENBLAS_CANDIDATES, str(mkl)]
    assert candidates("", str(tmp_path))[-1] == str(mkl)


def test_cpu_vendor_reads_proc_cpuinfo(tmp_path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\n")
    assert cpu_vendor(info) == "AuthenticAMD"
    assert cpu_vendor(tmp_path / "missing") == ""


@pytest.mark.skipif(sys.platform != "linux", reason="Linux-only preload")
def test_batched_rows_cost_well_under_linear() -> None:
    """(5 x 2048) @ (2048 x 2048) must cost well under 3x one row (reference BLAS: ~5x)."""
    best = _interleaved_min_seconds((1, 5))
    one, five = best[1], best[5]
    assert five < 3 * one, f"M=5 took {five * 1e3:.2f} ms vs M=1 {one * 1e3:.2f} ms"


def test_late_preload_reports_unknown_instead_of_pretending() -> None:
    code = "import mlx.core\nimport speclora.daemon.blas as b\nprint(b.blas_info().name)\n"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    expected = "accelerate" if sys.platform == "darwin" else "unknown"
    assert out.stdout.startswith(expected)


@pytest.mark.skipif(blas_info().name != "mkl", reason="MKL is not the loaded BLAS here")
def test_mkl_runs_reproducibly_and_without_its_buffer_pool() -> None:
    """Without it, MKL's results may depend on array alignment, and tiny models decoded to
    other tokens; the daemon sets it unless the user did."""
    assert os.environ.get("MKL_CBWR") == "AUTO,STRICT"
    assert os.environ.get("MKL_DISABLE_FAST_MM") == "1"  # no buffer pool kept resident


def test_openblas_max_threads_comes_from_its_config_string() -> None:
    assert (
        openblas_max_threads("OpenBLAS 0.3.21 DYNAMIC_ARCH NO_AFFINITY Haswell MAX_THREADS=64")
        == 64
    )
    assert openblas_max_threads("OpenBLAS 0.3.26 MAX_THREADS=128") == 128
    assert openblas_max_threads("OpenBLAS 0.2.20 Haswell") == 64  # distributions' default
