"""`speclora serve`, except that the process kills itself (SIGKILL, no cleanup) at one point of
writing or promoting an adapter. Faults tests run it as a script:

    python tests/helpers/killpoint_serve.py POINT

POINT:
  version_files    the new version's weights and config are in its temp dir, nothing else yet
  before_pointer   the version is complete and swapped into the draft; active.json not yet moved
  pointer_replace  the new active.json is written and fsynced beside the old, not yet renamed
"""

from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path
from typing import Any

import speclora.daemon.blas  # noqa: F401  (before anything imports mlx)
from speclora.daemon.learning import adapters

POINTS = ("version_files", "before_pointer", "pointer_replace")


def die(*_: object) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class _OsDyingOnReplace:
    """The `os` module as adapters.py sees it, except that `replace` is where we die."""

    def __getattr__(self, name: str) -> Any:
        return die if name == "replace" else getattr(os, name)


def arm(point: str) -> None:
    if point == "version_files":
        create = adapters.AdapterStore.create

        def dying_create(self: adapters.AdapterStore, write_files: Any, metadata: Any) -> Any:
            def write(tmp: Path) -> None:
                write_files(tmp)
                die()

            return create(self, write, metadata)

        adapters.AdapterStore.create = dying_create  # type: ignore[method-assign]
    elif point == "before_pointer":
        adapters.AdapterStore._write_pointer = die  # type: ignore[method-assign]
    elif point == "pointer_replace":
        adapters.os = _OsDyingOnReplace()  # type: ignore[assignment]
    else:
        raise SystemExit(f"unknown kill point {point!r}; one of {', '.join(POINTS)}")


if __name__ == "__main__":
    arm(sys.argv[1])
    sys.argv = ["speclora", "serve"]
    runpy.run_module("speclora", run_name="__main__", alter_sys=True)
