"""Faults: kill -9 while recording, kill -9 during adapter promotion, a full disk while recording,
and damaged adapter files, all through a real daemon with tiny models.

"Recorded" means what the daemon told the client: a summary with failure_recorded=True. The
daemon sends that summary only after the case is committed, so no such case may be lost to a
kill -9 at any moment. Run with -s to see the figures.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import mlx.core as mx
import pytest
from helpers.daemons import (
    SERVING,
    LocalDaemon,
    daemon_env,
    local_daemon,
    socket_path,
    start_daemon,
    wait_until,
)
from speclora.client.stub import (
    GenerationSummary,
    SpecLoRAClient,
    SpecLoRAClientError,
    TrainResult,
)
from speclora.daemon.learning.store import FailureStore
from speclora.shared.paths import resolve_paths
from speclora.shared.pb import speclora_pb2 as pb
from structlog.testing import capture_logs

# A random tiny draft against the tiny target: acceptance near 0, so every request with a
# proposal is a failure case.
RECORDING = {"learning": {"failure_threshold": 0.99}}
KILL_ROUNDS = 2
DISK_FULL_REQUESTS = 4


def recorded_ids(database: Path) -> set[str]:
    """Request ids in the failure store, read through a connection of our own (as another
    process would see the file)."""
    with FailureStore(database) as store:
        return {case.request_id for case in store.iter_all()}


def failing_request(**fields: object) -> pb.GenerateRequest:
    fields.setdefault("prompt", "Explain quantum computing simply.")
    fields.setdefault("max_tokens", 8)
    return pb.GenerateRequest(draft_tokens=4, **fields)


@pytest.fixture
def recording_daemon(tiny_paths: tuple[Path, Path], tmp_path: Path) -> Iterator[LocalDaemon]:
    d = local_daemon(
        tmp_path / "home",
        {"models": {"target": str(tiny_paths[0]), "draft": str(tiny_paths[1])}, **RECORDING},
    )
    yield d
    d.close()


def test_failure_recorded_is_sent_only_once_the_case_is_committed(
    recording_daemon: LocalDaemon, monkeypatch: pytest.MonkeyPatch
) -> None:
    d = recording_daemon
    assert d.runtime is not None
    store = d.runtime.learning.store
    gate = threading.Event()
    write = store.add_many

    def slow_disk(cases: list) -> list[int]:
        gate.wait(30)
        return write(cases)

    monkeypatch.setattr(store, "add_many", slow_disk)
    seen: list[tuple[pb.GenerationSummary, bool]] = []

    def client() -> None:
        for event in d.stub.Generate(failing_request(), timeout=60):
            if event.HasField("summary"):
                # At the instant the client learns "recorded", the case must be on disk.
                committed = event.summary.request_id in recorded_ids(store.path)
                seen.append((event.summary, committed))

    reader = threading.Thread(target=client)
    reader.start()
    wait_until(lambda: d.worker.stats.snapshot().requests_total >= 1, what="generation done")
    # The slow disk holds back only that summary, never the engine: others are served meanwhile.
    quick = list(d.stub.Generate(failing_request(record=False), timeout=30))
    assert quick[-1].HasField("summary") and not quick[-1].summary.failure_recorded
    gate.set()
    reader.join(30)
    [(summary, committed)] = seen
    assert summary.failure_recorded, "a failure case was not reported as recorded"
    assert committed, "failure_recorded=True reached the client before the case was committed"


# ---------------------------------------------------------------------- kill -9 while recording


def _generate_until_error(client: SpecLoRAClient, reported: list[str], rng: random.Random) -> None:
    """Generate failure cases in a loop; keep the ids the daemon reported as recorded."""
    try:
        while True:
            for event in client.generate(
                "Explain quantum computing simply.",
                max_tokens=rng.randint(4, 24),
                draft_tokens=4,
                temperature=rng.choice([0.0, 0.8]),
            ):
                if isinstance(event, GenerationSummary) and event.failure_recorded:
                    reported.append(event.request_id)
    except SpecLoRAClientError:
        return  # the daemon was killed under us


@pytest.mark.slow
def test_kill_9_while_recording_loses_no_reported_case(
    tiny_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = daemon_env(
        home, tiny_paths[0], draft=str(tiny_paths[1]), SPECLORA_LEARNING_FAILURE_THRESHOLD="0.99"
    )
    log = tmp_path / "serve.log"
    database = resolve_paths(env).database
    rng = random.Random(11)
    reported: list[str] = []
    proc = start_daemon(env, home, log)
    for _ in range(KILL_ROUNDS):
        before = len(reported)
        clients = [SpecLoRAClient(str(socket_path(home))) for _ in range(3)]
        threads = [
            threading.Thread(target=_generate_until_error, args=(c, reported, random.Random(i)))
            for i, c in enumerate(clients)
        ]
        for t in threads:
            t.start()
        wait_until(lambda b=before: len(reported) >= b + 5, timeout=60, what="cases recorded")
        time.sleep(rng.uniform(0.0, 0.5))  # kill at an arbitrary point, mid-stream
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        for t in threads:
            t.join(30)
        for c in clients:
            c.close()
        with FailureStore(database) as store:
            assert store.integrity_check() == "ok"
        lost = set(reported) - recorded_ids(database)
        assert not lost, f"{len(lost)} of {len(reported)} reported cases lost after kill -9"
        # Restart on the same files: the stale socket and lock do not stop it.
        proc = start_daemon(env, home, log)
        with SpecLoRAClient(str(socket_path(home))) as client:
            assert client.stats().failure_cases >= len(set(reported))
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    print(
        f"\nkill -9 while recording: {KILL_ROUNDS} kills, {len(reported)} cases reported "
        f"recorded before the kills, 0 lost"
    )


# ---------------------------------------------------------------------- kill -9 during promotion

KILLPOINT_SERVE = Path(__file__).parent / "helpers" / "killpoint_serve.py"
KILL_POINTS = ("version_files", "before_pointer", "pointer_replace")


def _record_and_train(client: SpecLoRAClient, cases: int = 6) -> TrainResult:
    for i in range(cases):
        list(client.generate(f"Write about the number {i}.", max_tokens=12, draft_tokens=4))
    events = list(client.train(force_promote=True))
    assert isinstance(events[-1], TrainResult), events
    return events[-1]


@pytest.mark.slow
def test_kill_9_during_promotion_leaves_the_previous_adapter_loadable(
    tiny_target_path: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    env = daemon_env(
        home,
        tiny_target_path,
        draft="self:2",
        SPECLORA_LEARNING_FAILURE_THRESHOLD="0.99",
        SPECLORA_LEARNING_MIN_CASES="4",
        SPECLORA_LEARNING_AUTO_TRAIN="false",  # the test trains by hand
        SPECLORA_LORA_STEPS="2",
        SPECLORA_LORA_BATCH_SIZE="2",
    )
    log = tmp_path / "serve.log"
    adapters_dir = resolve_paths(env).adapters_dir
    proc = start_daemon(env, home, log)
    with SpecLoRAClient(str(socket_path(home))) as client:
        good = _record_and_train(client)
    assert good.promoted and good.adapter_version == "v0001"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0

    for point in KILL_POINTS:
        command = (sys.executable, str(KILLPOINT_SERVE), point)
        proc = start_daemon(env, home, log, command=command)
        with SpecLoRAClient(str(socket_path(home))) as client:
            # What the last crash (or the clean stop) left is loadable: v0001 serves.
            assert client.stats().adapter_version == "v0001"
            with pytest.raises(SpecLoRAClientError):
                _record_and_train(client, cases=2)
        assert proc.wait(30) == -signal.SIGKILL, f"{point}: the kill point was not reached"

    proc = start_daemon(env, home, log)
    with SpecLoRAClient(str(socket_path(home))) as client:
        assert client.stats().adapter_version == "v0001"
        assert client.activate_adapter("v0001").active
        summary = list(client.generate("Hello", max_tokens=4))[-1]
        assert isinstance(summary, GenerationSummary) and summary.adapter_version == "v0001"
    assert not list(adapters_dir.glob(".tmp-*")), "a half-written version was left behind"
    # The version killed mid-write never appeared; the two killed later are whole, not active.
    assert sorted(p.name for p in adapters_dir.glob("v*")) == ["v0001", "v0002", "v0003"]
    assert json.loads((adapters_dir / "active.json").read_text())["version"] == "v0001"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    print(f"\nkill -9 during promotion: {len(KILL_POINTS)} kills, previous adapter kept each time")


# ---------------------------------------------------------------------- disk full while recording


class FullDisk:
    """Makes the failure store's disk full and frees it again: a real tmpfs filled to the last
    byte where we may mount one (root), else sqlite's own disk-full error injected."""

    def __init__(self, kind: str, data_dir: Path) -> None:
        self.kind = kind
        self.data_dir = data_dir
        self.filler = data_dir / "filler"
        self.mounted = False
        self._restore: list[tuple[object, object]] = []

    def mount(self) -> bool:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if os.geteuid() != 0 or shutil.which("mount") is None:
            return False
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(self.data_dir)],
            capture_output=True,
        )
        self.mounted = done.returncode == 0
        return self.mounted

    def fill(self, store: FailureStore) -> None:
        if self.kind == "injected":
            write = store.add_many

            def full(cases: object) -> list[int]:
                raise sqlite3.OperationalError("database or disk is full")

            store.add_many = full  # type: ignore[method-assign]
            self._restore.append((store, write))
            return
        with open(self.filler, "wb", buffering=0) as f:
            for block in (1 << 16, 1 << 12, 1):
                try:
                    while True:
                        f.write(b"\0" * block)
                except OSError as exc:
                    assert exc.errno == errno.ENOSPC
        assert shutil.disk_usage(self.data_dir).free == 0

    def free(self) -> None:
        for store, write in self._restore:
            store.add_many = write  # type: ignore[attr-defined]
        self.filler.unlink(missing_ok=True)

    def unmount(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.data_dir)], check=True)


@pytest.mark.parametrize("kind", ["tmpfs", "injected"])
def test_disk_full_while_recording(
    tiny_paths: tuple[Path, Path], tmp_path: Path, kind: str
) -> None:
    home = tmp_path / "home"
    disk = FullDisk(kind, resolve_paths({"SPECLORA_HOME": str(home)}).data_dir)
    if kind == "tmpfs" and not disk.mount():
        pytest.skip("cannot mount a tmpfs here (needs root); the injected variant covers it")
    d = local_daemon(
        home, {"models": {"target": str(tiny_paths[0]), "draft": str(tiny_paths[1])}, **RECORDING}
    )
    try:
        assert d.runtime is not None
        store = d.runtime.learning.store
        disk.fill(store)
        with capture_logs() as logs:
            summaries = []
            for i in range(DISK_FULL_REQUESTS):
                events = list(d.stub.Generate(failing_request(seed=i), timeout=60))
                assert events[-1].HasField("summary"), "the stream did not complete"
                summaries.append(events[-1].summary)
            assert d.health() == SERVING
            disk.free()
            recovered = list(d.stub.Generate(failing_request(), timeout=60))[-1].summary
        assert not any(s.failure_recorded for s in summaries), "claimed recorded on a full disk"
        failed = [e for e in logs if e["event"] == "failure_store_write_failed"]
        assert len(failed) == 1, f"logged {len(failed)} times, want once per streak"
        assert "full" in failed[0]["error"]
        assert any(e["event"] == "failure_store_write_recovered" for e in logs)
        assert recovered.failure_recorded
        assert recovered.request_id in recorded_ids(store.path)
        assert store.integrity_check() == "ok"
    finally:
        d.close()
        disk.unmount()
    print(f"\ndisk full ({kind}): {DISK_FULL_REQUESTS} streams completed, error logged once")


# ---------------------------------------------------------------------- damaged adapter files

LEARNING = {
    "learning": {"failure_threshold": 0.99, "min_cases": 4},
    "lora": {"steps": 2, "batch_size": 2},
}


@pytest.fixture(scope="module")
def two_adapters(
    tiny_target_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, dict[str, object]]:
    """A data dir where v0001 and then v0002 were trained and promoted (v0002 active), and the
    config that made them."""
    home = tmp_path_factory.mktemp("two-adapters")
    overrides = {"models": {"target": str(tiny_target_path), "draft": "self:2"}, **LEARNING}
    d = local_daemon(home, overrides)
    try:
        for i in range(6):
            request = failing_request(prompt=f"Write about the number {i}.", max_tokens=12)
            list(d.stub.Generate(request, timeout=60))
        for version in ("v0001", "v0002"):
            events = list(d.stub.Train(pb.TrainRequest(force_promote=True), timeout=120))
            assert events[-1].result.adapter_version == version and events[-1].result.promoted
    finally:
        d.close()
    return resolve_paths({"SPECLORA_HOME": str(home)}).data_dir, overrides


def _rewrite_checksums(version_dir: Path) -> None:
    """Make metadata.json agree with the files again, so the damage gets past the checksums."""
    meta = json.loads((version_dir / "metadata.json").read_text())
    for name in meta["files"]:
        path = version_dir / name
        meta["files"][name] = hashlib.sha256(path.read_bytes()).hexdigest()
    (version_dir / "metadata.json").write_text(json.dumps(meta))


def _map_weights(version_dir: Path, fn: Callable[[mx.array], mx.array]) -> None:
    path = version_dir / "adapters.safetensors"
    weights = {k: fn(v) for k, v in mx.load(str(path)).items()}
    mx.save_safetensors(str(path), weights)
    _rewrite_checksums(version_dir)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _truncate_keeping_checksums(version_dir: Path) -> None:
    _truncate(version_dir / "adapters.safetensors")
    _rewrite_checksums(version_dir)


DAMAGE: dict[str, tuple[Callable[[Path], None], str]] = {
    "truncated weights": (lambda v: _truncate(v / "adapters.safetensors"), "checksum mismatch"),
    "one flipped byte": (lambda v: _flip(v / "adapters.safetensors"), "checksum mismatch"),
    "config deleted": (lambda v: (v / "adapter_config.json").unlink(), "is missing"),
    "metadata garbage": (
        lambda v: (v / "metadata.json").write_text("{not json"),
        "metadata.json is corrupt",
    ),
    "truncated, checksums rewritten": (_truncate_keeping_checksums, "cannot read weights"),
    "wrong shapes, checksums rewritten": (
        lambda v: _map_weights(v, lambda w: w.T),
        "does not fit this draft",
    ),
    "NaN weights, checksums rewritten": (
        lambda v: _map_weights(v, lambda w: w * float("nan")),
        "not finite",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("damage", [*DAMAGE, "every version damaged"])
def test_damaged_adapter_is_refused_at_start_with_fallback(
    two_adapters: tuple[Path, dict[str, object]], tmp_path: Path, damage: str
) -> None:
    pristine, overrides = two_adapters
    home = tmp_path / "home"
    data_dir = resolve_paths({"SPECLORA_HOME": str(home)}).data_dir
    shutil.copytree(pristine, data_dir)
    adapters = data_dir / "adapters"
    if damage == "every version damaged":
        hurt, message = DAMAGE["truncated weights"]
        for version in ("v0002", "v0001"):
            hurt(adapters / version)
        expected = ""
    else:
        hurt, message = DAMAGE[damage]
        hurt(adapters / "v0002")
        expected = "v0001"

    with capture_logs() as logs:
        d = local_daemon(home, overrides)  # a restart on the damaged files
    try:
        refused = [e for e in logs if e["event"] == "adapter_refused"]
        assert refused and refused[0]["version"] == "v0002"
        assert message in refused[0]["error"], refused[0]["error"]
        assert d.worker.hub.adapter_version == expected
        assert json.loads((adapters / "active.json").read_text())["version"] == expected
        events = list(d.stub.Generate(pb.GenerateRequest(prompt="Hello", max_tokens=4), timeout=60))
        assert events[-1].summary.adapter_version == expected
        # Asking for it over the RPC is refused just as clearly, and the draft stays as it was.
        with pytest.raises(grpc.RpcError) as err:
            list(d.stub.ActivateAdapter(pb.ActivateAdapterRequest(version="v0002"), timeout=60))
        assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "v0002" in err.value.details() and message in err.value.details()
        assert d.worker.hub.adapter_version == expected
        assert d.health() == SERVING
    finally:
        d.close()
    print(f"\ndamaged adapter ({damage}): refused, fell back to {expected or 'the base draft'}")
