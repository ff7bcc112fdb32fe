"""Versioned adapter directories and the active-version pointer (files only, no MLX).

Layout under `paths.adapters_dir`:

    v0001/adapters.safetensors   LoRA weights, mlx-lm's adapter format
    v0001/adapter_config.json    mlx-lm's adapter config (`mlx_lm.generate --adapter-path`)
    v0001/draft_extras.safetensors  self-drafts only: the trained final-norm copy
    v0001/metadata.json          version, parent, status, reason, cases, acceptance, checksums
    active.json                  {"version": "v0001", "history": [...]}; "" = base draft

Why this shape: a version is written into a hidden temp directory, every file fsynced, then
renamed into place in one step, so a crash leaves either no version or a whole one. The
pointer is a small file replaced with os.replace, so it always names a complete version.
Checksums in metadata.json catch a file damaged after the fact; such a version is refused with
a clear error and the daemon falls back to the last good one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from speclora.daemon.errors import AdapterError, AdapterNotFoundError

log = structlog.get_logger(__name__)

WEIGHTS_FILE = "adapters.safetensors"
CONFIG_FILE = "adapter_config.json"
EXTRAS_FILE = "draft_extras.safetensors"
METADATA_FILE = "metadata.json"
POINTER_FILE = "active.json"
_VERSION_RE = re.compile(r"^v(\d{4,})$")
_TMP_PREFIX = ".tmp-"

PROMOTED = "promoted"
REJECTED = "rejected"
NONE_VERSIONS = ("", "none", "base")  # ways to say "no adapter"


@dataclass(frozen=True)
class AdapterInfo:
    """What `adapters list/show` print and the ActivateAdapter RPC returns."""

    version: str
    status: str  # "promoted" | "rejected" | "corrupt"
    parent: str = ""
    reason: str = ""
    acceptance_before: float = 0.0
    acceptance_after: float = 0.0
    created_at: float = 0.0
    active: bool = False
    path: Path | None = None
    metadata: dict[str, Any] = field(default_factory=dict)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _version_number(name: str) -> int | None:
    match = _VERSION_RE.match(name)
    return int(match.group(1)) if match else None


class AdapterStore:
    """Create, list, verify and (de)activate adapter versions in one directory."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    # -- writing ------------------------------------------------------------------------

    def create(self, write_files: Callable[[Path], None], metadata: dict[str, Any]) -> AdapterInfo:
        """Write a new version atomically and return it (not activated).

        `write_files(tmp_dir)` writes adapters.safetensors, adapter_config.json and, for a
        self-draft, draft_extras.safetensors; this adds metadata.json with their checksums.
        """
        tmp = Path(tempfile.mkdtemp(prefix=_TMP_PREFIX, dir=self.root))
        try:
            write_files(tmp)
            for required in (WEIGHTS_FILE, CONFIG_FILE):
                if not (tmp / required).is_file():
                    raise AdapterError(f"adapter writer did not produce {required}")
            files = sorted(p.name for p in tmp.iterdir() if p.is_file())
            version = self._next_version()
            meta = dict(metadata)
            meta.update(
                version=version,
                created_at=meta.get("created_at", time.time()),
                files={name: _sha256(tmp / name) for name in files},
            )
            (tmp / METADATA_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            for name in (*files, METADATA_FILE):
                _fsync_file(tmp / name)
            _fsync_dir(tmp)
            final = self.root / version
            os.rename(tmp, final)  # atomic; fails rather than overwrite an existing version
            _fsync_dir(self.root)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info("adapter_written", version=version, status=meta.get("status"))
        return self.get(version)

    def set_status(self, version: str, status: str, reason: str) -> None:
        """Rewrite a version's metadata.json atomically (e.g. force-promoted later)."""
        path = self._dir(version) / METADATA_FILE
        meta = self._read_metadata(version)
        meta.update(status=status, reason=reason)
        self._atomic_write(path, json.dumps(meta, indent=2, sort_keys=True))

    # -- reading ------------------------------------------------------------------------

    def versions(self) -> list[str]:
        names = [p.name for p in self.root.iterdir() if p.is_dir() and _version_number(p.name)]
        return sorted(names, key=lambda n: _version_number(n) or 0)

    def list(self) -> list[AdapterInfo]:
        """Every version, oldest first; damaged ones appear with status "corrupt"."""
        active = self.active_version()
        out = []
        for version in self.versions():
            try:
                out.append(self.get(version, active=active))
            except AdapterError as exc:
                out.append(
                    AdapterInfo(
                        version=version,
                        status="corrupt",
                        reason=str(exc),
                        active=version == active,
                        path=self.root / version,
                    )
                )
        return out

    def get(self, version: str, *, active: str | None = None) -> AdapterInfo:
        meta = self._read_metadata(version)
        if active is None:
            active = self.active_version()
        return AdapterInfo(
            version=version,
            status=str(meta.get("status", "")),
            parent=str(meta.get("parent", "")),
            reason=str(meta.get("reason", "")),
            acceptance_before=float(meta.get("acceptance_before", 0.0)),
            acceptance_after=float(meta.get("acceptance_after", 0.0)),
            created_at=float(meta.get("created_at", 0.0)),
            active=version == active,
            path=self.root / version,
            metadata=meta,
        )

    def verify(self, version: str) -> AdapterInfo:
        """Check that every file is present and matches its checksum; AdapterError if not."""
        info = self.get(version)
        files = info.metadata.get("files")
        if not isinstance(files, dict) or WEIGHTS_FILE not in files or CONFIG_FILE not in files:
            raise AdapterError(f"adapter {version}: metadata.json lists no weight files")
        for name, digest in files.items():
            path = self._dir(version) / name
            if not path.is_file():
                raise AdapterError(f"adapter {version}: {name} is missing")
            if _sha256(path) != digest:
                raise AdapterError(
                    f"adapter {version}: {name} is corrupt (checksum mismatch); "
                    f"roll back or delete {self._dir(version)}"
                )
        try:
            json.loads((self._dir(version) / CONFIG_FILE).read_text())
        except (OSError, ValueError) as exc:
            raise AdapterError(f"adapter {version}: {CONFIG_FILE} is unreadable: {exc}") from None
        return info

    def path(self, version: str) -> Path:
        return self._dir(version)

    # -- the active pointer -------------------------------------------------------------

    def pointer(self) -> dict[str, Any]:
        """{"version": str, "history": [str, ...]}; a missing or damaged file means none."""
        path = self.root / POINTER_FILE
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            return {"version": "", "history": []}
        except (OSError, ValueError) as exc:
            log.error("adapter_pointer_unreadable", path=str(path), error=str(exc))
            return {"version": "", "history": []}
        version = data.get("version", "") if isinstance(data, dict) else ""
        history = data.get("history", []) if isinstance(data, dict) else []
        if not isinstance(version, str) or not isinstance(history, list):
            return {"version": "", "history": []}
        return {"version": version, "history": [h for h in history if isinstance(h, str)]}

    def active_version(self) -> str:
        return str(self.pointer()["version"])

    def activate(self, version: str, *, force: bool = False) -> AdapterInfo | None:
        """Make `version` active (None for "none"); the previous one goes on the history."""
        if version in NONE_VERSIONS:
            self._set_active("")
            return None
        info = self.verify(version)
        if info.status != PROMOTED and not force:
            raise AdapterError(
                f"adapter {version} was {info.status or 'not promoted'} ({info.reason}); "
                "pass --force to activate it anyway"
            )
        self._set_active(version)
        return self.get(version)

    def rollback(self) -> str:
        """Go back to the version active before the current one; returns it ("" = base)."""
        pointer = self.pointer()
        if not pointer["version"] and not pointer["history"]:
            raise AdapterError("nothing to roll back: no adapter is active and there is no history")
        history = list(pointer["history"])
        previous = history.pop() if history else ""
        self._write_pointer({"version": previous, "history": history})
        log.info("adapter_rolled_back", from_version=pointer["version"], to_version=previous)
        return previous

    def fallback_candidates(self) -> list[str]:
        """Versions to try at start, best first: the active one, then earlier active ones."""
        pointer = self.pointer()
        seen: list[str] = []
        for version in [pointer["version"], *reversed(pointer["history"])]:
            if version and version not in seen:
                seen.append(version)
        return seen

    def settle_active(self, version: str) -> None:
        """Record what the daemon actually loaded at start (after a fallback), dropping the
        versions that failed from the top of the history."""
        pointer = self.pointer()
        if pointer["version"] == version:
            return
        history = list(pointer["history"])
        while history and history[-1] != version:
            history.pop()
        if history and history[-1] == version:
            history.pop()
        self._write_pointer({"version": version, "history": history})

    def _set_active(self, version: str) -> None:
        pointer = self.pointer()
        current = pointer["version"]
        if current == version:
            return
        history = [h for h in pointer["history"] if h != version]
        history.append(current)  # "" too: rolling back can return to the base draft
        self._write_pointer({"version": version, "history": history[-50:]})
        log.info("adapter_activated", version=version or "none", previous=current or "none")

    def _write_pointer(self, data: dict[str, Any]) -> None:
        self._atomic_write(self.root / POINTER_FILE, json.dumps(data))

    # -- helpers ------------------------------------------------------------------------

    def _dir(self, version: str) -> Path:
        if _version_number(version) is None:
            raise AdapterNotFoundError(
                f"{version!r} is not an adapter version (expected e.g. v0001)"
            )
        path = self.root / version
        if not path.is_dir():
            raise AdapterNotFoundError(f"adapter {version} does not exist in {self.root}")
        return path

    def _read_metadata(self, version: str) -> dict[str, Any]:
        path = self._dir(version) / METADATA_FILE
        try:
            meta = json.loads(path.read_text())
        except FileNotFoundError:
            raise AdapterError(f"adapter {version}: {METADATA_FILE} is missing") from None
        except (OSError, ValueError) as exc:
            raise AdapterError(f"adapter {version}: {METADATA_FILE} is corrupt: {exc}") from None
        if not isinstance(meta, dict):
            raise AdapterError(f"adapter {version}: {METADATA_FILE} is not an object")
        return meta

    def _next_version(self) -> str:
        numbers = [_version_number(v) or 0 for v in self.versions()]
        return f"v{max(numbers, default=0) + 1:04d}"

    def _atomic_write(self, path: Path, text: str) -> None:
        fd, tmp = tempfile.mkstemp(prefix=_TMP_PREFIX, dir=path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
            _fsync_dir(path.parent)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def remove_leftovers(self, min_age_s: float = 0.0) -> int:
        """Remove temp files a crash mid-write left behind (never a finished version).

        The daemon calls this at start; another process (the CLI) must not, or pass an age,
        since it could delete a write in progress."""
        now = time.time()
        removed = 0
        for p in self.root.glob(f"{_TMP_PREFIX}*"):
            try:
                if now - p.stat().st_mtime < min_age_s:
                    continue
            except FileNotFoundError:
                continue
            removed += 1
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        if removed:
            log.info("adapter_leftovers_removed", count=removed)
        return removed
