"""The one native part: a cblas_sgemm for decoding's skinny products on Linux x86-64 (see
native/skinny_sgemm.c and daemon/blas.py). Optional: where it cannot be built, the
daemon uses the system BLAS alone."""

import platform
import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform == "linux" and platform.machine() in ("x86_64", "AMD64"):
    ext_modules.append(
        Extension(
            # A plain shared library that daemon/blas.py loads with ctypes, not a Python module.
            "speclora.daemon._skinny_sgemm",
            sources=["native/skinny_sgemm.c"],
            # Only its kernel is AVX2/FMA code (target attributes): it loads on any x86-64 and
            # blas.py enables it only where skinny_supported() says the CPU has both.
            extra_compile_args=["-O3"],
            extra_link_args=["-lpthread"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
