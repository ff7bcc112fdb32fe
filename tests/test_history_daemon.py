"""The history across daemon processes: what requests taught it survives a clean restart and a
kill -9 (the next daemon loads it), and a purge from the CLI while the daemon runs really
deletes it, from the file and from the daemon's memory. Real `speclora serve` subprocesses
with tiny models."""

from __future__ import annotations

import random
import signal
import threading
from pathlib import Path

import pytest
from helpers.daemons import (
    daemon_env,
    log_events,
    run_cli,
    socket_path,
    start_daemon,
    wait_until,
)
from speclora.client.stub import SpecLoRAClient, SpecLoRAClientError
from speclora.daemon.learning.history_store import HistoryStore, encode_tokens
from speclora.shared.paths import resolve_paths

pytestmark = pytest.mark.slow


def stored(database: Path) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(prompt, completion) of every stored request, read as another process sees the file."""
    if not database.exists():
        return []
    with HistoryStore(database) as store:
        return [(r.prompt_ids, r.completion_ids) for r in store.records()]


def loaded(log: Path) -> list[int]:
    """The documents each daemon start loaded into its index, in order."""
    return [e["documents"] for e in log_events(log, "history_loaded")]


def test_history_survives_restart_and_kill_9(tiny_target_path: Path, tmp_path: Path) -> None:
    home = tmp_path / "home"
    env = daemon_env(home, tiny_target_path)
    database = resolve_paths(env).history_database
    log = tmp_path / "serve.log"
    proc = start_daemon(env, home, log)
    with SpecLoRAClient(str(socket_path(home))) as client:
        for i in range(4):
            client.generate_text(f"Say something about the number {i}.", max_tokens=10)
        client.generate_text("Do not keep this one.", max_tokens=10, record=False)
    wait_until(lambda: len(stored(database)) == 4, what="4 requests committed")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    before = stored(database)
    assert loaded(log) == [0]

    # Clean restart: the next daemon loads all four.
    proc = start_daemon(env, home, log)
    assert loaded(log) == [0, 4]

    # kill -9 while requests are being served and recorded.
    stop = threading.Event()

    def traffic(seed: int) -> None:
        rng = random.Random(seed)
        try:
            with SpecLoRAClient(str(socket_path(home))) as client:
                while not stop.is_set():
                    client.generate_text(
                        f"Count to {rng.randint(2, 9)}.", max_tokens=rng.randint(4, 16)
                    )
        except SpecLoRAClientError:
            return  # killed under us

    threads = [threading.Thread(target=traffic, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    wait_until(lambda: len(stored(database)) >= 10, timeout=60, what="more requests committed")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    stop.set()
    for t in threads:
        t.join(30)
    after_kill = stored(database)
    assert after_kill[:4] == before and len(after_kill) >= 10
    with HistoryStore(database) as store:
        assert store.integrity_check() == "ok"

    # Every committed request is loaded by the daemon after the crash.
    proc = start_daemon(env, home, log)
    assert loaded(log)[-1] == len(after_kill)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0


@pytest.mark.parametrize("command", [("history", "purge"), ("failures", "purge")])
def test_purge_from_the_cli_deletes_it_from_file_and_daemon(
    command: tuple[str, str], tiny_target_path: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = daemon_env(home, tiny_target_path)
    database = resolve_paths(env).history_database
    log = tmp_path / "serve.log"
    proc = start_daemon(env, home, log)
    try:
        with SpecLoRAClient(str(socket_path(home))) as client:
            client.generate_text(
                "The secret plan is to meet at noon by the old mill.", max_tokens=8
            )
        wait_until(lambda: len(stored(database)) == 1, what="the request committed")
        [(prompt, _)] = stored(database)
        secret = encode_tokens(prompt)
        files = (database, Path(f"{database}-wal"))
        assert any(secret in p.read_bytes() for p in files if p.exists())

        result = run_cli(env, *command, "--yes")
        assert result.returncode == 0, result.stderr
        assert "Deleted 1 past request" in result.stdout
        assert stored(database) == []
        assert not any(secret in p.read_bytes() for p in files if p.exists())
        # The running daemon forgot it too (the purge ran in it, through its RPC).
        with SpecLoRAClient(str(socket_path(home))) as client:
            assert client.stats().history_documents == 0
        stats = run_cli(env, "history", "stats")
        assert stats.returncode == 0 and "requests           0" in stats.stdout
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    # And the next start loads nothing.
    proc = start_daemon(env, home, log)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert loaded(log)[-1] == 0
