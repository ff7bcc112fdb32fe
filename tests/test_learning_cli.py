"""`speclora failures ...` and `speclora adapters ...`: files read directly, no MLX."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from speclora.client.cli import main
from speclora.daemon.learning.adapters import CONFIG_FILE, WEIGHTS_FILE, AdapterStore
from speclora.daemon.learning.store import FailureCase, FailureStore
from speclora.shared.paths import resolve_paths


def run(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


@pytest.fixture
def cases() -> list[int]:
    with FailureStore(resolve_paths().database) as store:
        return store.add_many(
            [
                FailureCase(
                    (1, 2, i),
                    (3, 4, 5),
                    rejection_positions=(1,),
                    proposed=4,
                    accepted=1,
                    request_id=f"req-{i}",
                )
                for i in range(3)
            ]
        )


def test_client_commands_do_not_import_mlx() -> None:
    code = (
        "import sys\n"
        "import speclora.client.commands.failures, speclora.client.commands.adapters\n"
        "bad = [m for m in sys.modules if m == 'mlx' or m.startswith(('mlx.', 'mlx_lm'))]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_failures_on_a_fresh_install() -> None:
    result = run("failures", "list")
    assert result.exit_code == 0
    assert "No failure cases recorded yet" in result.output
    assert not resolve_paths().database.exists()  # listing creates nothing


def test_failures_list_show_stats(cases: list[int]) -> None:
    listing = run("failures", "list")
    assert listing.exit_code == 0
    assert [line.split()[0] for line in listing.output.splitlines()[1:]] == [
        str(i) for i in reversed(cases)
    ]
    lines = run("failures", "list", "--json", "-n", "2").output.splitlines()
    assert [json.loads(x)["id"] for x in lines] == [cases[2], cases[1]]
    shown = run("failures", "show", str(cases[0]))
    assert "req-0" in shown.output and "[3, 4, 5]" in shown.output and "0.250" in shown.output
    assert json.loads(run("failures", "show", str(cases[0]), "--json").output)["id"] == cases[0]
    missing = run("failures", "show", "999")
    assert missing.exit_code != 0 and "no case 999" in missing.output
    stats = json.loads(run("failures", "stats", "--json").output)
    assert stats["cases"] == 3 and stats["pending"] == 3


def test_failures_export_and_purge(cases: list[int], tmp_path: Path) -> None:
    out = tmp_path / "cases.jsonl"
    result = run("failures", "export", "--format", "jsonl", str(out))
    assert result.exit_code == 0
    assert [json.loads(x)["request_id"] for x in out.read_text().splitlines()] == [
        "req-0",
        "req-1",
        "req-2",
    ]
    assert run("failures", "purge", input="n\n").exit_code != 0  # declined: nothing deleted
    with FailureStore(resolve_paths().database) as store:
        assert store.count() == 3
    purged = run("failures", "purge", "--yes")
    assert purged.exit_code == 0 and "Deleted 3 cases" in purged.output
    with FailureStore(resolve_paths().database) as store:
        assert store.count() == 0


def _version(store: AdapterStore, status: str = "promoted") -> str:
    def write(tmp: Path) -> None:
        (tmp / WEIGHTS_FILE).write_bytes(b"w")
        (tmp / CONFIG_FILE).write_text("{}")

    meta = {"status": status, "reason": "r", "acceptance_before": 0.1, "acceptance_after": 0.6}
    return store.create(write, meta).version


def test_adapters_without_a_daemon() -> None:
    store = AdapterStore(resolve_paths().adapters_dir)
    assert "No adapters yet" in run("adapters", "list").output
    v1, v2 = _version(store), _version(store, status="rejected")
    result = run("adapters", "activate", v1)
    assert result.exit_code == 0 and "next start" in result.output
    assert store.active_version() == v1
    refused = run("adapters", "activate", v2)
    assert refused.exit_code != 0 and "--force" in refused.output
    assert run("adapters", "activate", v2, "--force").exit_code == 0
    listing = run("adapters", "list").output
    assert f"* {v2}" in listing and f"  {v1}" in listing
    shown = run("adapters", "show")
    assert v2 in shown.output and "integrity" in shown.output
    assert json.loads(run("adapters", "list", "--json").output)[0]["acceptance_after"] == 0.6
    back = run("adapters", "rollback")
    assert back.exit_code == 0 and v1 in back.output
    assert store.active_version() == v1
    (store.path(v1) / WEIGHTS_FILE).write_bytes(b"damaged")
    broken = run("adapters", "activate", v1)
    assert broken.exit_code != 0 and "corrupt" in broken.output
    assert "corrupt" in run("adapters", "show", v1).output


class _FakeClient:
    calls: list[tuple[str, bool]] = []

    def __init__(self, **_: Any) -> None:
        pass

    def __enter__(self) -> _FakeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def activate_adapter(self, version: str, *, rollback: bool = False) -> Any:
        self.calls.append((version, rollback))
        return type("Info", (), {"version": "" if rollback else version})()


def test_adapters_activate_goes_through_a_running_daemon(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import speclora.client.stub as stub

    monkeypatch.setattr(stub, "SpecLoRAClient", _FakeClient)
    store = AdapterStore(resolve_paths().adapters_dir)
    v1 = _version(store)
    result = run("adapters", "activate", v1)
    assert result.exit_code == 0 and "swapped into the running daemon" in result.output
    assert _FakeClient.calls == [(v1, False)]
    assert store.active_version() == ""  # the daemon owns the pointer when it is running
    store.activate(v1)
    assert run("adapters", "rollback").exit_code == 0
    assert _FakeClient.calls[-1] == ("", True)
