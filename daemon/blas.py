"""Load a fast BLAS into the process before MLX on Linux.

The mlx-cpu wheel bundles netlib's reference BLAS: a (5 x 2048) @ (2048 x 2048) product costs
five single-row products, so verifying K+1 draft tokens costs K+1 target passes and speculative
decoding can never win. Loading the system OpenBLAS with RTLD_GLOBAL before `import mlx` makes
MLX's sgemm calls resolve to it (measured: ~6 -> ~150 GFLOP/s on 2 cores). This must run before
the first `import mlx` anywhere in the process; importing this module does it.
"""

from __future__ import annotations

import ctypes
import os
import sys
from dataclasses import dataclass

import structlog

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


@dataclass(frozen=True)
class BlasInfo:
    name: str  # "accelerate", "openblas" or "reference"
    path: str | None
    fast: bool


_info: BlasInfo | None = None
_handle: ctypes.CDLL | None = None


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
    override = os.environ.get("SPECLORA_BLAS_PATH")
    candidates = (override,) if override else OPENBLAS_CANDIDATES
    for path in candidates:
        try:
            _handle = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
        except OSError:
            continue
        _info = BlasInfo("openblas", path, True)
        return _info
    _info = BlasInfo("reference", None, False)
    return _info


def blas_info() -> BlasInfo:
    return preload_blas()


def log_blas() -> BlasInfo:
    """Log which BLAS is active; loudly when only the slow reference BLAS is there."""
    info = preload_blas()
    if info.fast:
        log.info("blas_loaded", blas=info.name, path=info.path)
    else:
        log.warning(
            "blas_slow",
            blas=info.name,
            hint="install libopenblas0-pthread (apt) or set SPECLORA_BLAS_PATH; "
            "speculative decoding will be slower than plain decoding without it",
        )
    return info


preload_blas()
