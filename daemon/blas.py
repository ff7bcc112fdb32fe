"""Load a fast BLAS into the process before MLX on Linux.

The mlx-cpu wheel bundles netlib's reference BLAS: a (5 x 2048) @ (2048 x 2048) product costs
five single-row products, so verifying K+1 draft tokens costs K+1 target passes and speculative
decoding can never win. Loading a real BLAS with RTLD_GLOBAL before `import mlx` makes MLX's
sgemm calls resolve to it (OpenBLAS: ~6 -> ~150 GFLOP/s on 2 cores). This must run before the
first `import mlx` anywhere in the process; importing this module does it.

Which one. On Intel CPUs, Intel's MKL (the `mkl` wheel, `pip install 'speclora[mkl]'`) streams
weights faster than Debian's OpenBLAS 0.3.21 in the one-row products that decoding is made of:
the embedded model decodes at ~16.5 tok/s against ~12.5 on a 2-core Xeon (Ice Lake), in MKL's
reproducible mode (see _before_loading). So it comes first there when installed. On other CPUs
OpenBLAS comes first: MKL's speed on AMD was not measured here. `SPECLORA_BLAS_PATH` overrides
both.

In front of it, on x86-64 CPUs with AVX2, sits SpecLoRA's own cblas_sgemm for the products
decoding is made of (native/skinny_sgemm.c): a few rows of activations (the tokens of one
pass) against a weight matrix. OpenBLAS packs the whole weight matrix for every such product,
so a pass over K + 1 tokens cost ~1.2-1.7 one-token passes on this project's 2-core AMD CPU;
the skinny kernel reads each weight row once for all rows, with threads that stay awake
between a pass's back-to-back products. Everything else it hands to the BLAS above.
`SPECLORA_SKINNY_SGEMM=0` turns it off.
"""

from __future__ import annotations

import ctypes
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import structlog

NATIVE_DIR = Path(__file__).parent
SKINNY_GLOB = "_skinny_sgemm*.so"
# Products of up to this many rows go to the skinny kernel: a verify of a long history proposal,
# or a batched step. On the embedded model's shapes (2-core AMD EPYC, all of one pass's weight
# products) it beat OpenBLAS 0.3.21 up to 24 rows (45 against 72 ms) and tied at 32 (58 ms).
SKINNY_MAX_ROWS = 32

log = structlog.get_logger(__name__)

# Debian/Ubuntu package libopenblas0-pthread, then generic names.
OPENBLAS_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/x86_64-linux-gnu/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
    "/usr/lib/libopenblas.so.0",
    "libopenblas.so.0",
)
# The `mkl` wheel puts its libraries in the environment's lib/ (it finds its threading layer and
# libiomp5 there by itself).
MKL_NAMES = ("libmkl_rt.so.3", "libmkl_rt.so.2")
# OpenBLAS's threaded level-3 driver (driver/level3/level3_thread.c) mallocs, and frees again,
# a job table of MAX_THREADS x MAX_THREADS x 128 bytes (CACHE_LINE_SIZE 8 x DIVIDE_RATE 2
# longs) inside every product it splits across threads: 512 KiB in Debian's build
# (MAX_THREADS=64), hundreds of times per decoding step.
OPENBLAS_JOB_BYTES_PER_THREAD_PAIR = 128
# Distributions' NUM_THREADS, for an OpenBLAS whose config string does not say.
OPENBLAS_DEFAULT_MAX_THREADS = 64


@dataclass(frozen=True)
class BlasInfo:
    name: str  # "accelerate", "mkl", "openblas" or "reference"
    path: str | None
    fast: bool
    skinny_rows: int = 0  # products of up to this many rows run in the skinny kernel; 0: off

    @property
    def label(self) -> str:
        return f"{self.name}+skinny" if self.skinny_rows else self.name


def cpuinfo_field(name: str, cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The first CPU's `name` field in /proc/cpuinfo, or "" where there is none."""
    try:
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def cpu_vendor(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's vendor id ("GenuineIntel", "AuthenticAMD", ...), or "" if unknown."""
    return cpuinfo_field("vendor_id", cpuinfo)


def candidates(vendor: str, prefix: str = sys.prefix) -> list[str]:
    """BLAS libraries to try, best first, for a CPU of `vendor` in the environment at `prefix`."""
    mkl = [str(Path(prefix) / "lib" / name) for name in MKL_NAMES]
    mkl = [path for path in mkl if Path(path).exists()]
    if vendor == "GenuineIntel":
        return mkl + list(OPENBLAS_CANDIDATES)
    return list(OPENBLAS_CANDIDATES) + mkl


def _name_of(path: str) -> str:
    return "mkl" if "libmkl" in Path(path).name else "openblas"


def _before_loading(path: str) -> None:
    if _name_of(path) == "mkl":
        # Bitwise the same results whatever the arrays' alignment, so a prompt decodes to the
        # same tokens every run (MKL's default may not: tiny models' outputs moved with it).
        # Costs ~15% of MKL's decoding speed, which stays ~1.3x OpenBLAS's.
        os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")
        # MKL's per-thread buffer pool keeps the packing buffers it used: ~23 MiB of the
        # embedded model's RSS after passes of each verify width, for no speed measured
        # (bench/blas.py, "mkl, its own buffer pool"). MKL takes any value as "off".
        os.environ.setdefault("MKL_DISABLE_FAST_MM", "1")


_info: BlasInfo | None = None
_handle: ctypes.CDLL | None = None
_skinny: ctypes.CDLL | None = None


def skinny_library() -> Path | None:
    """The built skinny kernel (setup.py builds it on Linux x86-64), or None."""
    found = sorted(NATIVE_DIR.glob(SKINNY_GLOB))
    return found[0] if found else None


def _blas_threads(handle: ctypes.CDLL) -> int:
    """How many threads the loaded BLAS runs a product on: the skinny kernel uses as many."""
    for getter in ("openblas_get_num_threads", "mkl_get_max_threads"):
        fn = getattr(handle, getter, None)
        if fn is not None:
            fn.restype = ctypes.c_int
            return max(1, int(fn()))
    return max(1, len(os.sched_getaffinity(0)))


def _load_skinny() -> ctypes.CDLL | None:
    """Load the skinny kernel with RTLD_GLOBAL, so that its cblas_sgemm comes before the
    BLAS's; None where it is off, not built or the CPU lacks AVX2/FMA."""
    if os.environ.get("SPECLORA_SKINNY_SGEMM", "1") == "0":
        return None
    path = skinny_library()
    if path is None:
        return None
    try:
        # Asked locally first: once global, its cblas_sgemm is the one MLX calls, so it goes
        # there only on a CPU that can run it.
        if not ctypes.CDLL(str(path), mode=ctypes.RTLD_LOCAL).skinny_supported():
            return None
        return ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        log.warning("skinny_sgemm_unloadable", path=str(path), error=str(exc))
        return None


def _enable_skinny(lib: ctypes.CDLL, blas: ctypes.CDLL) -> int:
    """Hand the kernel the BLAS's own cblas_sgemm (looked up in the BLAS's handle, not the
    global scope, where the kernel's wins) for everything it does not take."""
    lib.skinny_enable.argtypes = (ctypes.c_void_p, ctypes.c_int, ctypes.c_int)
    lib.skinny_enable(
        ctypes.cast(blas.cblas_sgemm, ctypes.c_void_p), SKINNY_MAX_ROWS, _blas_threads(blas)
    )
    return SKINNY_MAX_ROWS


def preload_blas() -> BlasInfo:
    """Load the best BLAS available; idempotent. Returns what is in use."""
    global _info, _handle
    if _info is not None:
        return _info
    if sys.platform == "darwin":
        _info = BlasInfo("accelerate", None, True)
        return _info
    if "mlx.core" in sys.modules:
        # Too late: MLX already bound its BLAS symbols. Say so rather than pretend.
        _info = BlasInfo("unknown (mlx imported before blas preload)", None, False)
        return _info
    global _skinny
    override = os.environ.get("SPECLORA_BLAS_PATH")
    for path in [override] if override else candidates(cpu_vendor()):
        _before_loading(path)
        try:
            # Locally first: the skinny kernel goes into the global scope only in front of a
            # BLAS that loads, since it forwards what it does not take to that BLAS.
            ctypes.CDLL(path, mode=ctypes.RTLD_LOCAL)
        except OSError:
            continue
        _skinny = _load_skinny()
        _handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        rows = _enable_skinny(_skinny, _handle) if _skinny is not None else 0
        _info = BlasInfo(_name_of(path), path, True, skinny_rows=rows)
        return _info
    _info = BlasInfo("reference", None, False)
    return _info


def blas_info() -> BlasInfo:
    return preload_blas()


def openblas_max_threads(config: str) -> int:
    """MAX_THREADS from openblas_get_config()'s string ("OpenBLAS 0.3.21 ... MAX_THREADS=64")."""
    match = re.search(r"MAX_THREADS=(\d+)", config)
    return int(match.group(1)) if match else OPENBLAS_DEFAULT_MAX_THREADS


def per_product_scratch_bytes() -> int:
    """The largest buffer the loaded BLAS mallocs and frees inside each matrix product, so that
    the C heap can keep it (memory.tune_malloc); 0 where none is known (MKL and Accelerate
    reuse their own buffers)."""
    info = preload_blas()
    if info.name != "openblas" or _handle is None:
        return 0
    try:
        get_config = _handle.openblas_get_config
    except AttributeError:
        config = ""
    else:
        get_config.restype = ctypes.c_char_p
        config = (get_config() or b"").decode(errors="replace")
    threads = openblas_max_threads(config)
    return threads * threads * OPENBLAS_JOB_BYTES_PER_THREAD_PAIR


def log_blas() -> BlasInfo:
    """Log which BLAS is active; loudly when only the slow reference BLAS is there."""
    info = preload_blas()
    if info.fast:
        log.info(
            "blas_loaded",
            blas=info.name,
            path=info.path,
            skinny_rows=info.skinny_rows,
            attention=cpu_attention.attention_info().label,
        )
    else:
        log.warning(
            "blas_slow",
            blas=info.name,
            hint="install libopenblas0-pthread (apt), or speclora[mkl] (pip) on Intel, or set "
            "SPECLORA_BLAS_PATH; speculative decoding is slower than plain decoding without one",
        )
    return info


preload_blas()
# MLX's CPU attention and its JIT's vector flags, now that the BLAS is in (cpu_attention.py),
# and its RoPE with the tables shared between calls (cpu_rope.py).
from speclora.daemon import cpu_attention, cpu_rope  # noqa: E402

cpu_attention.install()
cpu_rope.install()
