"""Shared fixtures. BLAS is preloaded before anything imports MLX (see speclora.daemon.blas)."""

from __future__ import annotations

from pathlib import Path

import pytest
import speclora.daemon.blas  # noqa: F401  (must precede every mlx import)
from speclora.daemon.tiny import write_tiny_pair


@pytest.fixture(autouse=True)
def isolated_home(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> Path:
    """Every test gets its own SPECLORA_HOME so nothing touches the user's real state."""
    home = tmp_path_factory.mktemp("home")
    monkeypatch.setenv("SPECLORA_HOME", str(home))
    monkeypatch.delenv("SPECLORA_CONFIG", raising=False)
    for name in list(__import__("os").environ):
        if name.startswith("SPECLORA_") and name not in ("SPECLORA_HOME", "SPECLORA_BLAS_PATH"):
            monkeypatch.delenv(name, raising=False)
    # A daemon a test starts from the environment takes a free HTTP port, never the default one.
    monkeypatch.setenv("SPECLORA_SERVER_HTTP_ADDRESS", "127.0.0.1:0")
    return home


@pytest.fixture(scope="session")
def tiny_paths(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(target_dir, draft_dir): a 4-layer target and an unrelated 2-layer draft, mlx-lm layout."""
    return write_tiny_pair(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tiny_target_path(tiny_paths: tuple[Path, Path]) -> Path:
    return tiny_paths[0]


@pytest.fixture(scope="session")
def tiny_draft_path(tiny_paths: tuple[Path, Path]) -> Path:
    return tiny_paths[1]


@pytest.fixture(scope="session")
def tiny_loaded(tiny_paths: tuple[Path, Path]):
    """(target_model, draft_model, tokenizer) loaded once per session with mlx-lm."""
    from mlx_lm import load

    target, tokenizer = load(str(tiny_paths[0]))
    draft, _ = load(str(tiny_paths[1]))
    return target, draft, tokenizer
