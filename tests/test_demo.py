"""The demo runs end to end (tiny models), so it cannot silently break."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time

import pytest


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
        "1. Generating",
        "2. Training the draft",
        "held-out acceptance before",
        "held-out acceptance after",
        "3. The same held-out prompts",
        "Before / after",
        "4. Where things are",
        "demo finished",
    ):
        assert step in out, f"missing {step!r} in demo output:\n{out}"
    # Every number printed is measured: the table rows carry real rates.
    rows = re.findall(r"^\s+Explain what .*?(\d+\.\d+)x$", out, flags=re.MULTILINE)
    assert len(rows) == 2 and all(float(r) > 0 for r in rows)
    pid = int(re.search(r"daemon started \(pid (\d+)\)", out + result.stderr).group(1))
    deadline = time.monotonic() + 10  # the lock is released just before the process exits
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), f"the demo left its daemon (pid {pid}) running"


def _alive(pid: int) -> bool:
    """Running, not merely a zombie nobody reaped (containers' init may not reap orphans)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
