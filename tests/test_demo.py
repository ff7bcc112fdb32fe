"""The demo runs end to end (tiny models), so it cannot silently break, and never claims a
speedup its own repeats do not support."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers.daemons import local_daemon
from speclora.client.commands.demo import http_links


@pytest.mark.slow
def test_demo_tiny_runs_every_step_and_leaves_nothing_running() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "speclora", "demo", "--tiny"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    for step in (
        "1. History",
        "the first function again",
        "2. LoRA: training the draft",
        "held-out acceptance before",
        "held-out acceptance after",
        "3. Before / after",
        "repeat 3/3 done",
        "Tokens/s, median (min-max) of the repeats",
        "All functions pooled",
        "Where the tokens came from",
        "4. Where things are",
        "demo finished",
    ):
        assert step in out, f"missing {step!r} in demo output:\n{out}"
    # Every recorded request reports its history and draft share, and the history's size.
    shares = re.findall(r"from history +(\d+)% +from draft +(\d+)% +history now (\d+) tokens", out)
    assert len(shares) == 6, out
    assert re.search(r"^ +after +history +\d+% of tokens, acceptance", out, flags=re.MULTILINE)
    # Held-out prompts ran with record = false: nothing of them entered the history.
    assert "history grew by 0 tokens during these runs" in out
    # A speedup is printed only where the repeats do not overlap, per function and pooled.
    spread = r"([\d.]+) \(([\d.]+)-([\d.]+)\)"
    rows = re.findall(rf"^  (\w+\(\)) +{spread} +{spread} +{spread} +(.+)$", out, re.MULTILINE)
    assert len(rows) == 2, out
    for row in rows:
        after, target, verdict = _range(row[4:7]), _range(row[7:10]), row[10]
        _check_claim(after, target, verdict)
    pooled = {
        m[0]: _range(m[1:])
        for m in re.findall(rf"^    (before|after|target) +[█▒·]+ {spread}$", out, re.MULTILINE)
    }
    assert set(pooled) == {"before", "after", "target"}, out
    verdicts = re.findall(r"^    (\w+) vs (\w+) +(.+)$", out, re.MULTILINE)
    assert len(verdicts) == 3, out
    for a, b, verdict in verdicts:
        _check_claim(pooled[a], pooled[b], verdict)
    pid = int(re.search(r"daemon started \(pid (\d+)\)", out + result.stderr).group(1))
    deadline = time.monotonic() + 10  # the lock is released just before the process exits
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), f"the demo left its daemon (pid {pid}) running"


def _range(cells: tuple[str, ...]) -> tuple[float, float]:
    """(min, max) from a printed "median (min-max)"."""
    return float(cells[1]), float(cells[2])


def _check_claim(a: tuple[float, float], b: tuple[float, float], verdict: str) -> None:
    if a[0] < b[1] and b[0] < a[1]:  # the printed ranges overlap: no claim either way
        assert verdict.startswith("within noise"), (a, b, verdict)
    if "faster" in verdict:
        assert a[0] >= b[1], (a, b, verdict)
    if "slower" in verdict:
        assert a[1] <= b[0], (a, b, verdict)


def _alive(pid: int) -> bool:
    """Running, not merely a zombie nobody reaped (containers' init may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_http_links_come_from_the_daemon_itself(
    tiny_paths: tuple[Path, Path], tmp_path: Path
) -> None:
    """The demo names the HTTP API only where a daemon answers there: never for a server that
    is off, on a port chosen at start, or gone."""
    d = local_daemon(tmp_path, {"models": {"target": str(tiny_paths[0])}}, learning=False)
    try:
        address = d.server.http_address
        links = dict(http_links(address))
        assert links["OpenAI API"] == f"http://{address}/v1"
        assert links["web page"] == f"http://{address}/"  # what `make demo` prints
    finally:
        d.close()
    assert http_links(address) == []
    assert http_links(None) == [] and http_links("127.0.0.1:0") == []
