"""State locations and structured logging."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import structlog
from speclora.shared.logging import configure_logging
from speclora.shared.paths import ensure_private_dir, resolve_paths


def test_speclora_home_holds_all_state(tmp_path: Path) -> None:
    paths = resolve_paths({"SPECLORA_HOME": str(tmp_path)})
    for p in (
        paths.socket_path,
        paths.database,
        paths.adapters_dir,
        paths.models_dir,
        paths.daemon_log,
        paths.token_file,
        paths.lock_file,
        paths.config_file,
    ):
        assert tmp_path in p.parents, p


def test_platform_dirs_without_home(tmp_path: Path) -> None:
    paths = resolve_paths({"HOME": str(tmp_path)})
    if sys.platform == "darwin":
        assert "Application Support/SpecLoRA" in str(paths.data_dir)
    else:
        assert paths.data_dir == tmp_path / ".local/share/speclora"
        assert paths.config_file == tmp_path / ".config/speclora/config.yaml"
        xdg = resolve_paths({"HOME": str(tmp_path), "XDG_STATE_HOME": str(tmp_path / "st")})
        assert xdg.socket_path == tmp_path / "st/speclora/run/speclora.sock"


def test_private_dir_mode(tmp_path: Path) -> None:
    d = ensure_private_dir(tmp_path / "a" / "run")
    assert d.stat().st_mode & 0o777 == 0o700


def test_json_logs_when_not_a_tty() -> None:
    stream = io.StringIO()
    configure_logging("info", stream=stream)
    structlog.contextvars.bind_contextvars(request_id="r1")
    try:
        structlog.get_logger("t").info("generation_finished", tokens=3)
        structlog.get_logger("t").debug("hidden_at_info")
    finally:
        structlog.contextvars.clear_contextvars()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 1
    event = lines[0]
    assert event["event"] == "generation_finished"
    assert event["tokens"] == 3 and event["request_id"] == "r1" and event["level"] == "info"
    assert event["timestamp"].endswith("Z")
