"""`speclora failures ...` and `speclora adapters ...` against a running daemon, through its RPCs.

The daemon here is real (tiny models, learning loop); the test seeds its stores on the daemon's
side, then drives the CLI as a user would.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers.adapters import make_adapter
from helpers.daemons import LocalDaemon, local_daemon
from speclora.client.cli import main
from speclora.daemon.learning.adapters import REJECTED, WEIGHTS_FILE
from speclora.daemon.learning.store import FailureCase


def run(*args: str, input: str | None = None) -> Any:
    return CliRunner().invoke(main, list(args), input=input, catch_exceptions=False)


@pytest.fixture
def daemon(isolated_home: Path, tiny_target_path: Path) -> Iterator[LocalDaemon]:
    """A daemon in this test's SPECLORA_HOME, so the CLI finds it on the default socket."""
    d = local_daemon(
        isolated_home,
        {
            "models": {"target": str(tiny_target_path), "draft": "self:2"},
            "learning": {"auto_train": False},  # these tests train by hand
        },
    )
    yield d
    d.close()


@pytest.fixture
def cases(daemon: LocalDaemon) -> list[int]:
    assert daemon.runtime is not None and daemon.runtime.learning is not None
    return daemon.runtime.learning.store.add_many(
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


def test_failures_on_a_fresh_daemon(daemon: LocalDaemon) -> None:
    result = run("failures", "list")
    assert result.exit_code == 0
    assert "No failure cases recorded." in result.output


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
    assert missing.exit_code == 1 and "no failure case 999" in missing.output
    stats = json.loads(run("failures", "stats", "--json").output)
    assert stats["cases"] == 3 and stats["pending"] == 3
    assert stats["path"].endswith("failures.sqlite3")


def test_failures_export_and_purge(daemon: LocalDaemon, cases: list[int], tmp_path: Path) -> None:
    out = tmp_path / "cases.jsonl"
    result = run("failures", "export", "--format", "jsonl", str(out))
    assert result.exit_code == 0
    exported = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["request_id"] for x in exported] == ["req-0", "req-1", "req-2"]
    # The same JSON as the store's own export format (the seed's JSONL), key for key.
    store = daemon.runtime.learning.store  # type: ignore[union-attr]
    assert exported == [c.to_json() for c in store.iter_all()]
    # To stdout: the same lines (the in-process daemon logs to the same stdout; skip those).
    stdout = [x for x in run("failures", "export", "-").output.splitlines() if x.startswith("{")]
    assert stdout == out.read_text().splitlines()
    assert run("failures", "purge", input="n\n").exit_code != 0  # declined: nothing deleted
    assert store.count() == 3
    purged = run("failures", "purge", "--yes")
    assert purged.exit_code == 0 and "Deleted 3 cases" in purged.output
    assert store.count() == 0


def test_adapters_through_the_daemon(daemon: LocalDaemon) -> None:
    learning = daemon.runtime.learning  # type: ignore[union-attr]
    assert "No adapters yet" in run("adapters", "list").output
    v1 = daemon.worker.call("make", lambda hub: make_adapter(learning.adapters, hub, 1), 30)
    v2 = daemon.worker.call(
        "make", lambda hub: make_adapter(learning.adapters, hub, 2, status=REJECTED), 30
    )
    result = run("adapters", "activate", v1)
    assert result.exit_code == 0 and "swapped into the running daemon" in result.output
    assert daemon.worker.hub.adapter_version == v1 == learning.adapters.active_version()
    refused = run("adapters", "activate", v2)  # the daemon's gate, not the CLI's
    assert refused.exit_code == 1 and "--force" in refused.output and "rejected" in refused.output
    assert daemon.worker.hub.adapter_version == v1
    assert run("adapters", "activate", v2, "--force").exit_code == 0
    assert daemon.worker.hub.adapter_version == v2
    listing = run("adapters", "list").output
    assert f"* {v2}" in listing and f"  {v1}" in listing
    shown = run("adapters", "show")
    assert v2 in shown.output and "integrity          ok" in shown.output
    assert json.loads(run("adapters", "list", "--json").output)[0]["status"] == "promoted"
    back = run("adapters", "rollback")
    assert back.exit_code == 0 and v1 in back.output
    assert daemon.worker.hub.adapter_version == v1
    unknown = run("adapters", "show", "v0099")
    assert unknown.exit_code == 1 and "does not exist" in unknown.output
    (learning.adapters.path(v2) / WEIGHTS_FILE).write_bytes(b"damaged")
    broken = run("adapters", "activate", v2, "--force")
    assert broken.exit_code == 1 and "corrupt" in broken.output
    assert daemon.worker.hub.adapter_version == v1  # the refused swap changed nothing
    assert "corrupt" in run("adapters", "show", v2).output
    assert run("adapters", "activate", "none").exit_code == 0
    assert daemon.worker.hub.adapter_version == ""


@pytest.mark.parametrize(
    "args",
    [
        ["failures", "list"],
        ["failures", "stats"],
        ["failures", "purge", "--yes"],
        ["adapters", "list"],
        ["adapters", "activate", "v0001"],
        ["adapters", "rollback"],
    ],
)
def test_without_a_daemon_they_say_so_and_change_nothing(args: list[str]) -> None:
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert "not running" in result.output and "speclora daemon start" in result.output


def test_help_says_how_they_behave_without_a_daemon() -> None:
    for args in (["adapters", "list"], ["adapters", "activate"], ["failures", "export"]):
        help_text = " ".join(run(*args, "--help").output.split())  # unwrapped
        assert "with none running it says so and exits 2" in help_text, args
