"""CLI behaviour without a daemon, rendering helpers, and the client's independence from MLX."""

from __future__ import annotations

import subprocess
import sys

import click
import pytest
from click.testing import CliRunner
from speclora.client.cli import main
from speclora.client.render import chunk_text, human_bytes, human_duration, sparkline
from speclora.client.stub import DaemonNotRunning, InvalidRequest, SpecLoRAClient, TextChunk


@pytest.mark.parametrize(
    "args",
    [
        ["generate", "hello"],
        ["interactive"],
        ["stats"],
        ["stats", "--watch"],
        ["train"],
        ["daemon", "status"],
    ],
)
def test_not_running_is_one_line_and_exit_2(args: list[str]) -> None:
    result = CliRunner().invoke(main, args, input="")
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "not running" in lines[0] and "speclora daemon start" in lines[0]
    assert "Traceback" not in result.output


def test_daemon_stop_when_not_running_is_fine() -> None:
    result = CliRunner().invoke(main, ["daemon", "stop"])
    assert result.exit_code == 0 and "not running" in result.output


def test_not_running_names_the_socket(tmp_path) -> None:  # type: ignore[no-untyped-def]
    client = SpecLoRAClient(str(tmp_path / "x.sock"))
    with pytest.raises(DaemonNotRunning) as err:
        client.stats()
    assert err.value.socket_path == str(tmp_path / "x.sock")
    assert str(tmp_path / "x.sock") in str(err.value)


def test_address_forms() -> None:
    assert SpecLoRAClient("/tmp/a.sock").address == "unix:/tmp/a.sock"
    assert SpecLoRAClient("unix:/tmp/b.sock").address == "unix:/tmp/b.sock"
    assert SpecLoRAClient("127.0.0.1:5000").address == "127.0.0.1:5000"
    assert SpecLoRAClient().address.endswith("/state/run/speclora.sock")


def test_invalid_request_keeps_the_field() -> None:
    assert InvalidRequest("top_p: 0.0 is outside (0.0, 1.0]").field == "top_p"


def test_sparkline_and_units() -> None:
    assert sparkline([0.0, 0.5, 1.0]) == "▁▅█"
    assert len(sparkline([0.3] * 100, width=40)) == 40
    assert human_bytes(512) == "512 B" and human_bytes(3 * 2**20) == "3.0 MiB"
    assert human_duration(3725) == "1h 2m" and human_duration(59) == "59s"


def test_draft_text_is_coloured_only_on_request() -> None:
    drafted = TextChunk("abc", (1, 2, 3), (True, True, False))
    own = TextChunk("xyz", (4, 5), (False, False))
    assert chunk_text(drafted, colour=False) == "abc"
    assert chunk_text(drafted, colour=True) == click.style("abc", fg="cyan")
    assert chunk_text(own, colour=True) == "xyz"


def test_client_never_imports_mlx() -> None:
    code = (
        "import sys\n"
        "from click.testing import CliRunner\n"
        "from speclora.client.cli import main\n"
        "import speclora.client.stub, speclora.client.render\n"
        "for cmd in ('generate', 'interactive', 'stats', 'train', 'daemon', 'service', 'serve'):\n"
        "    assert CliRunner().invoke(main, [cmd, '--help']).exit_code == 0, cmd\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('mlx', 'mlx_lm'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
