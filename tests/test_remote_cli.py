"""Every CLI command that talks to the daemon works from another SPECLORA_HOME over TCP with
the token exactly as it does locally, and the CLI never imports the daemon side.

Two daemons are built from identical state (tiny models, the same failure cases and adapter
versions). One is driven locally, on its Unix socket from its own home; the other over TCP
from a second, empty home, in a subprocess where `speclora.daemon` and MLX cannot be imported
and the environment holds a mistyped daemon variable and a config file with a key from the
future. Both runs go through the same commands, and their outputs must be the same once
timings, paths and the in-process daemon's log lines are set aside.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from helpers.adapters import make_adapter
from helpers.daemons import LocalDaemon, local_daemon
from speclora.client.cli import main
from speclora.daemon.learning.adapters import REJECTED
from speclora.daemon.learning.store import FailureCase
from structlog.testing import capture_logs

pytestmark = pytest.mark.slow

# (arguments, stdin): every command that talks to a daemon, mutating ones included, in an order
# whose effects the two runs share.
SEQUENCE: list[tuple[list[str], str | None]] = [
    (["generate", "Hello there", "--max-tokens", "6", "--json"], None),
    (["generate", "Hi", "--max-tokens", "6", "--draft-tokens", "1", "--no-record"], None),
    (["interactive", "--max-tokens", "4", "--temperature", "0"], "Hi\n/stats\n/exit\n"),
    (["stats", "--json"], None),
    (["stats"], None),
    (["daemon", "status", "--json"], None),
    (["adapters", "list"], None),
    (["adapters", "list", "--json"], None),
    (["adapters", "show", "v0001", "--json"], None),
    (["adapters", "show", "v0099"], None),
    (["adapters", "activate", "v0001"], None),
    (["adapters", "activate", "v0002"], None),  # refused by the daemon's gate
    (["adapters", "activate", "v0002", "--force"], None),
    (["adapters", "show"], None),
    (["adapters", "rollback"], None),
    (["failures", "list"], None),
    (["failures", "list", "--json", "-n", "3"], None),
    (["failures", "show", "2"], None),
    (["failures", "show", "2", "--json"], None),
    (["failures", "show", "999"], None),
    (["failures", "stats", "--json"], None),
    (["failures", "export", "-"], None),
    (["train", "--steps", "2", "--json"], None),
    (["adapters", "list"], None),
    (["failures", "purge", "--yes"], None),
    (["failures", "stats"], None),
]
# Figures that differ between two runs of the same thing (clocks, memory, ids, this process).
VOLATILE = {
    "request_id",
    "tokens_per_second",
    "time_to_first_token_s",
    "total_time_s",
    "uptime_s",
    "idle_s",
    "training_slice_max_s",
    "finished_at",
    "tokens_per_second_recent",
    "rss_bytes",
    "peak_rss_bytes",
    "pid",
    "log",
    "address",  # where each run dials, by design
    "duration_s",
    "file_bytes",
    "newest",  # the case the first generate recorded
    "created_at",  # a training run's new adapter
}
OVERRIDES = {
    "models": {"draft": "self:2"},
    # A fixed K and no history drafter: adaptive K and the history's proposal lengths follow
    # step prices each daemon measured on its own at start.
    "speculation": {"draft_tokens": 2},
    "history": {"enabled": False},
    "learning": {"min_cases": 4, "failure_threshold": 0.99, "auto_train": False},
    "lora": {"batch_size": 2, "rank": 4},
}

# The remote side: no daemon code, no MLX; run the sequence with click's runner, print results.
REMOTE = r"""
import json, sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("mlx", "mlx_lm") or name.startswith("speclora.daemon"):
            raise ImportError(f"{name} is blocked: the client must not need it")
sys.meta_path.insert(0, Block())
from click.testing import CliRunner
from speclora.client.cli import main
results = []
for args, stdin in json.loads(sys.argv[1]):
    r = CliRunner().invoke(main, args, input=stdin)
    results.append([r.exit_code, r.output, repr(r.exception) if r.exit_code not in (0, 1, 2) else ""])
bad = sorted(m for m in sys.modules if m.startswith("speclora.daemon") or m.split(".")[0] == "mlx")
print(json.dumps({"results": results, "daemon_modules": bad}))
"""


def _seed(daemon: LocalDaemon) -> None:
    learning = daemon.runtime.learning  # type: ignore[union-attr]
    learning.store.add_many(
        [
            FailureCase(
                (5, 17, 42, i, 7),
                (3, 4, 5, 6, 7, 8),
                from_draft=(False,) * 6,
                rejection_positions=(0, 2),
                proposed=6,
                accepted=1,
                request_id=f"seed-{i}",
                created_at=1_700_000_000.0 + i,
            )
            for i in range(8)
        ]
    )
    for seed, status in ((1, "promoted"), (2, REJECTED)):
        daemon.worker.call(
            "seed_adapter",
            lambda hub, s=seed, st=status: make_adapter(
                learning.adapters, hub, s, status=st, created_at=1_700_000_100.0 + s
            ),
            30,
        )


@pytest.fixture(scope="module")
def daemons(
    tiny_target_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LocalDaemon, LocalDaemon]]:
    base = {**OVERRIDES, "models": {**OVERRIDES["models"], "target": str(tiny_target_path)}}
    local = local_daemon(tmp_path_factory.mktemp("local"), base)
    remote = local_daemon(
        tmp_path_factory.mktemp("remote"), {**base, "server": {"tcp_address": "127.0.0.1:0"}}
    )
    for d in (local, remote):
        _seed(d)
    yield local, remote
    local.close()
    remote.close()


def _normalise(args: list[str], output: str, homes: list[Path]) -> Any:
    text = output
    for home in homes:
        text = text.replace(str(home), "<home>")
    if "--json" in args or args[:2] == ["failures", "export"]:
        try:
            return _drop_volatile(json.loads(text))
        except ValueError:
            return [_drop_volatile(json.loads(line)) for line in text.splitlines() if line]
    return re.sub(r"\d+(\.\d+)?", "#", text)  # timings in human output


def _drop_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _drop_volatile(v) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_drop_volatile(v) for v in value]
    return value


def test_every_command_over_tcp_from_another_home_matches_local(
    daemons: tuple[LocalDaemon, LocalDaemon], tmp_path: Path
) -> None:
    local, remote = daemons
    assert remote.server.tcp_address
    token = remote.paths.token_file.read_text().strip()

    local_results = []
    # The in-process daemons log to the same stdout as the local CLI: hold their lines back.
    with capture_logs():
        for args, stdin in SEQUENCE:
            r = CliRunner().invoke(
                main, args, input=stdin, env={"SPECLORA_HOME": str(local.paths.config_dir)}
            )
            local_results.append((r.exit_code, r.output))

    second_home = tmp_path / "second-home"
    second_home.mkdir()
    # Keys the client must ignore: a daemon key from a newer version, a mistyped variable.
    (second_home / "config.yaml").write_text("server:\n  key_from_the_future: 1\nfuture: {}\n")
    env = {k: v for k, v in __import__("os").environ.items() if not k.startswith("SPECLORA_")}
    env.update(
        SPECLORA_HOME=str(second_home),
        SPECLORA_ADDRESS=remote.server.tcp_address,
        SPECLORA_TOKEN=token,
        SPECLORA_SERVER_SOCKET_PTH="/mistyped",
        SPECLORA_GENERATION_TOP_Q="0.5",
    )
    proc = subprocess.run(
        [sys.executable, "-c", REMOTE, json.dumps(SEQUENCE)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    remote_run = json.loads(proc.stdout.strip().splitlines()[-1])
    assert remote_run["daemon_modules"] == []

    homes = [local.paths.config_dir, remote.paths.config_dir]
    for (args, _), (code, out), (rcode, rout, crash) in zip(
        SEQUENCE, local_results, remote_run["results"], strict=True
    ):
        assert not crash, (args, crash, rout)
        assert rcode == code, (args, code, out, rcode, rout)
        assert _normalise(args, rout, homes) == _normalise(args, out, homes), args
    # And they did what they say: the same state on both daemons at the end.
    assert remote.worker.hub.adapter_version == local.worker.hub.adapter_version
    assert remote.runtime.learning.store.count() == local.runtime.learning.store.count() == 0  # type: ignore[union-attr]
    assert sorted(remote.runtime.learning.adapters.versions()) == sorted(  # type: ignore[union-attr]
        local.runtime.learning.adapters.versions()  # type: ignore[union-attr]
    )


def test_tcp_without_the_token_is_refused_by_the_cli(
    daemons: tuple[LocalDaemon, LocalDaemon], tmp_path: Path
) -> None:
    _, remote = daemons
    r = CliRunner().invoke(
        main,
        ["adapters", "list", "--address", remote.server.tcp_address or ""],
        env={"SPECLORA_HOME": str(tmp_path), "SPECLORA_TOKEN": "wrong"},
    )
    assert r.exit_code == 1 and "token" in r.output
