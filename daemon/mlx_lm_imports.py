"""Import mlx-lm's modules without running its package `__init__`, which imports transformers.

`mlx_lm/__init__.py` imports `convert`, `generate` and `utils`, and each of those imports
transformers (and through it huggingface_hub): ~26 MiB of RSS in every process that so much as
imports `mlx_lm.models.cache`, kept for the daemon's lifetime. The daemon needs only the model,
cache and LoRA modules, which import none of that. `install` registers `mlx_lm` (and
`mlx_lm.tuner`, whose `__init__` imports its trainer) as packages whose `__init__` runs on the
first attribute it would define (`from mlx_lm import load` still works, and then pays the
import), so importing a submodule no longer runs it.
"""

from __future__ import annotations

import importlib.util
import sys
from typing import Any

LAZY_PACKAGES = ("mlx_lm", "mlx_lm.tuner")


def _install_one(name: str) -> None:
    if name in sys.modules:
        return  # imported already (its __init__ has run, or it is lazy already)
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None or spec.submodule_search_locations is None:
        return
    module = importlib.util.module_from_spec(spec)

    def __getattr__(attr: str) -> Any:  # noqa: N807  (PEP 562's name)
        # A submodule being imported is found through __path__, never here; anything else is
        # a name __init__ defines (or none), so run __init__ once and look again.
        del module.__dict__["__getattr__"]
        spec.loader.exec_module(module)  # type: ignore[union-attr]
        return getattr(module, attr)

    module.__dict__["__getattr__"] = __getattr__
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent:
        setattr(sys.modules[parent], child, module)


def install() -> None:
    """Make `import mlx_lm.<module>` skip mlx-lm's package __init__ (idempotent)."""
    for name in LAZY_PACKAGES:
        _install_one(name)
