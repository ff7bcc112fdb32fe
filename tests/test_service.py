"""`speclora service`: launchd plist and systemd unit content, and the launchctl/systemctl calls
made on install, uninstall, status and logs, through fake executables that record arguments."""

from __future__ import annotations

import fcntl
import os
import plistlib
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from speclora.client.cli import main
from speclora.shared.paths import resolve_paths

REPO = Path(__file__).resolve().parents[1]
FAKES = ("launchctl", "systemctl", "journalctl")


@pytest.fixture
def fake_bin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """launchctl/systemctl/journalctl that append their arguments to calls.log."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    log = tmp_path / "calls.log"
    for name in FAKES:
        script = bin_dir / name
        script.write_text(
            f'#!/bin/sh\necho "{name} $*" >> "{log}"\n'
            f'[ "$1" = print ] || [ "$2" = status ] && exit "${{FAKE_STATUS_RC:-0}}"\nexit 0\n'
        )
        script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return log


def _calls(log: Path) -> list[str]:
    return log.read_text().splitlines() if log.exists() else []


def _invoke(*args: str) -> object:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_launchd_install_writes_the_plist_and_bootstraps(fake_bin: Path) -> None:
    result = _invoke("service", "install", "--platform", "launchd")
    assert result.exit_code == 0, result.output
    plist_path = Path(os.environ["HOME"]) / "Library" / "LaunchAgents" / "com.speclora.daemon.plist"
    plist = plistlib.loads(plist_path.read_bytes())
    paths = resolve_paths()
    assert set(plist) == {
        "Label",
        "ProgramArguments",
        "RunAtLoad",
        "KeepAlive",
        "ThrottleInterval",
        "ExitTimeOut",
        "ProcessType",
        "StandardOutPath",
        "StandardErrorPath",
        "EnvironmentVariables",
    }
    assert plist["Label"] == "com.speclora.daemon"
    assert plist["ProgramArguments"] == [sys.executable, "-m", "speclora", "serve"]
    assert Path(plist["ProgramArguments"][0]).is_absolute()
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}
    assert isinstance(plist["ThrottleInterval"], int) and plist["ThrottleInterval"] >= 5
    assert isinstance(plist["ExitTimeOut"], int) and plist["ExitTimeOut"] > 10.0  # grace 10 s
    assert plist["ProcessType"] == "Interactive"
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == str(paths.daemon_log)
    env = plist["EnvironmentVariables"]
    assert set(env) == {"PATH", "SPECLORA_HOME"}
    assert env["PATH"].split(":")[0] == str(Path(sys.executable).parent)
    assert env["SPECLORA_HOME"] == os.environ["SPECLORA_HOME"]
    uid = os.getuid()
    assert _calls(fake_bin) == [
        f"launchctl bootout gui/{uid}/com.speclora.daemon",
        f"launchctl bootstrap gui/{uid} {plist_path}",
    ]

    assert _invoke("service", "status", "--platform", "launchd").exit_code == 0
    assert _calls(fake_bin)[-1] == f"launchctl print gui/{uid}/com.speclora.daemon"

    result = _invoke("service", "uninstall", "--platform", "launchd")
    assert result.exit_code == 0, result.output
    assert not plist_path.exists()
    assert _calls(fake_bin)[-1] == f"launchctl bootout gui/{uid}/com.speclora.daemon"


def test_launchd_plist_carries_the_config_and_a_longer_exit_timeout(
    fake_bin: Path, tmp_path: Path
) -> None:
    config = tmp_path / "c.yaml"
    config.write_text("server:\n  shutdown_grace_s: 42\n")
    assert (
        _invoke("--config", str(config), "service", "install", "--platform", "launchd").exit_code
        == 0
    )
    plist_path = Path(os.environ["HOME"]) / "Library" / "LaunchAgents" / "com.speclora.daemon.plist"
    plist = plistlib.loads(plist_path.read_bytes())
    assert plist["ProgramArguments"] == [
        sys.executable,
        "-m",
        "speclora",
        "--config",
        str(config),
        "serve",
    ]
    assert plist["ExitTimeOut"] == 52


def test_systemd_install_writes_the_unit_and_enables_it(fake_bin: Path) -> None:
    result = _invoke("service", "install", "--platform", "systemd")
    assert result.exit_code == 0, result.output
    unit = Path(os.environ["HOME"]) / ".config" / "systemd" / "user" / "speclora.service"
    path_env = os.pathsep.join(
        dict.fromkeys([str(Path(sys.executable).parent), *os.environ["PATH"].split(":")])
    )
    body = unit.read_text().split("[Unit]", 1)[1]
    assert body == (
        "\nDescription=SpecLoRA speculative-decoding daemon\n\n"
        "[Service]\n"
        "Type=exec\n"
        f"ExecStart={sys.executable} -m speclora serve\n"
        f"Environment=PATH={path_env}\n"
        "Environment=PYTHONUNBUFFERED=1\n"
        f"Environment=SPECLORA_HOME={os.environ['SPECLORA_HOME']}\n"
        "Restart=on-failure\n"
        "RestartSec=10\n"
        "KillSignal=SIGTERM\n"
        "TimeoutStopSec=20\n\n"
        "[Install]\n"
        "WantedBy=default.target\n"
    )
    assert _calls(fake_bin) == [
        "systemctl --user daemon-reload",
        "systemctl --user enable --now speclora.service",
    ]

    result = _invoke("service", "uninstall", "--platform", "systemd")
    assert result.exit_code == 0, result.output
    assert not unit.exists()
    assert _calls(fake_bin)[2:] == [
        "systemctl --user disable --now speclora.service",
        "systemctl --user daemon-reload",
    ]


def test_systemd_status_and_logs(fake_bin: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert _invoke("service", "status", "--platform", "systemd").exit_code == 0
    monkeypatch.setenv("FAKE_STATUS_RC", "3")
    assert _invoke("service", "status", "--platform", "systemd").exit_code == 3
    assert _invoke("service", "logs", "--platform", "systemd", "-n", "5").exit_code == 0
    assert _calls(fake_bin) == [
        "systemctl --user status speclora.service",
        "systemctl --user status speclora.service",
        "journalctl --user -u speclora.service -n 5",
    ]


def test_uninstall_when_not_installed_says_so(fake_bin: Path) -> None:
    result = _invoke("service", "uninstall", "--platform", "systemd")
    assert result.exit_code == 0 and "not installed" in result.output
    assert _calls(fake_bin) == []


def test_missing_service_manager_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    monkeypatch.setenv("HOME", str(tmp_path))
    result = _invoke("service", "install", "--platform", "systemd")
    assert result.exit_code == 1
    assert "systemctl was not found" in result.output and "speclora daemon start" in result.output


def test_install_refuses_while_a_daemon_runs(fake_bin: Path) -> None:
    lock_file = resolve_paths().lock_file
    lock_file.parent.mkdir(parents=True)
    with open(lock_file, "w") as held:  # what a running daemon holds: flock plus its pid
        fcntl.flock(held, fcntl.LOCK_EX)
        held.write(f"{os.getpid()}\n")
        held.flush()
        result = _invoke("service", "install", "--platform", "systemd")
    assert result.exit_code == 1 and f"pid {os.getpid()}" in result.output
    assert _calls(fake_bin) == []


def test_repo_launchd_dir_holds_the_packaged_templates() -> None:
    templates = REPO / "daemon" / "service_templates"
    for name in ("com.speclora.daemon.plist", "speclora.service"):
        assert (REPO / "launchd" / name).read_bytes() == (templates / name).read_bytes()
    plistlib.loads((templates / "com.speclora.daemon.plist").read_bytes())  # valid XML plist
