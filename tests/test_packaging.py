"""The wheel carries every package and module, and the client imports without MLX."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FOLDERS = {
    "speclora": "speclora",
    "shared": "speclora/shared",
    "daemon": "speclora/daemon",
    "client": "speclora/client",
}


def _source_modules() -> set[str]:
    names = set()
    for folder, prefix in FOLDERS.items():
        for path in (REPO / folder).rglob("*.py"):
            rel = path.relative_to(REPO / folder)
            names.add(f"{prefix}/{rel.as_posix()}")
    return names


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Build from a copy of the files git knows, so a stale build/ dir can't leak into it."""
    src = tmp_path_factory.mktemp("src")
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    for name in listed:
        if (REPO / name).is_file():
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, src / name)
    out = tmp_path_factory.mktemp("wheel")
    command = [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation"]
    subprocess.run([*command, "-q", "-w", str(out), str(src)], check=True, capture_output=True)
    return next(out.glob("speclora-*.whl"))


@pytest.mark.slow
def test_wheel_contains_every_module_and_marker(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = _source_modules() - names
    assert not missing, f"modules missing from the wheel: {sorted(missing)}"
    for typed in ("speclora/py.typed", "speclora/daemon/py.typed", "speclora/client/py.typed"):
        assert typed in names
    assert not any(n.startswith("daemon/") for n in names), "bare top-level daemon package"
    for page in ("index.html", "page.js", "page.css"):  # GET / serves them from the package
        assert f"speclora/daemon/http/page/{page}" in names


@pytest.mark.slow
def test_every_module_imports_from_the_wheel(wheel: Path, tmp_path: Path) -> None:
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        zf.extractall(target)
    modules = sorted(
        n[:-3].replace("/", ".").removesuffix(".__init__")
        for n in zipfile.ZipFile(wheel).namelist()
        if n.endswith(".py") and n.startswith("speclora/")
    )
    code = (
        "import sys; sys.path.insert(0, sys.argv[1]); import importlib\n"
        "import speclora.daemon.blas\n"
        "for m in sys.argv[2:]:\n"
        "    mod = importlib.import_module(m)\n"
        "    assert mod.__file__.startswith(sys.argv[1]), (m, mod.__file__)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(target), *modules],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr


def test_client_imports_without_mlx(tmp_path: Path) -> None:
    """Block mlx entirely; the client package, its stub and the CLI must still import."""
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'mlx' or name.startswith(('mlx.', 'mlx_lm')):\n"
        "            raise ImportError('mlx blocked for this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import speclora.client, speclora.client.cli\n"
        "from speclora.client.cli import main\n"
        "import pkgutil, importlib, speclora.client.commands as c\n"
        "for m in pkgutil.iter_modules(c.__path__):\n"
        "    importlib.import_module('speclora.client.commands.' + m.name)\n"
        "try:\n"
        "    import speclora.client.stub\n"
        "except ModuleNotFoundError as e:\n"
        "    if e.name != 'speclora.client.stub': raise\n"
        "assert not any(k == 'mlx' or k.startswith('mlx.') for k in sys.modules)\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "speclora", "--help"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert "Usage:" in result.stdout


@pytest.mark.slow
def test_the_base_wheel_is_a_client_without_mlx(
    wheel: Path, tmp_path: Path, tiny_target_path: Path
) -> None:
    """`pip install speclora` (no extras) in a fresh venv: no MLX, and its CLI generates and
    lists adapters against a running daemon; `serve` says which extra it needs."""
    from helpers.daemons import local_daemon

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    installed = subprocess.run([*pip, str(wheel)], capture_output=True, text=True, timeout=600)
    assert installed.returncode == 0, installed.stderr
    python = str(venv / "bin" / "python")
    for missing in ("mlx", "mlx_lm", "structlog", "gguf"):
        probe = subprocess.run([python, "-c", f"import {missing}"], capture_output=True)
        assert probe.returncode != 0, f"{missing} came with the base install"

    daemon = local_daemon(
        tmp_path / "home", {"models": {"target": str(tiny_target_path), "draft": "self:2"}}
    )
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPECLORA_")}
        env.update(SPECLORA_HOME=str(tmp_path / "client-home"), SPECLORA_ADDRESS=daemon.address)
        cli = str(venv / "bin" / "speclora")

        def run(*args: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [cli, *args], env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path
            )

        generated = run("generate", "Hello", "--max-tokens", "5", "--json")
        assert generated.returncode == 0, generated.stderr
        assert json.loads(generated.stdout)["completion_tokens"] == 5
        listed = run("adapters", "list")
        assert listed.returncode == 0, listed.stderr
        assert "No adapters yet" in listed.stdout
        serve = run("serve")
        assert serve.returncode == 1
        assert "pip install 'speclora[daemon]'" in serve.stderr, serve.stderr
    finally:
        daemon.close()
