"""The daemon side: models, speculative engine, worker, gRPC server, learning loop."""

from speclora.daemon import mlx_lm_imports as _mlx_lm_imports

# Before any daemon module imports mlx-lm: its model modules, without transformers.
_mlx_lm_imports.install()
