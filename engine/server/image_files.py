"""Hosted images for OpenAI's `url` answers: PNGs in one server-chosen folder, under unguessable names, expiring.

`ImageStore.save` writes each PNG atomically (a dot-named temp file, then `os.replace`) as
`<folder>/<secrets.token_urlsafe(24)>.png` (192 random bits; nothing of the request reaches the name or the
folder) and `read` serves only names of that exact form, so no request can name another file. An image is
gone `ttl_s` after it was written: `read` refuses an older one (and deletes it) whatever the sweeper has done,
and `sweep` (after every save and periodically, see `ServerState`) deletes expired images, temp files a killed
writer left behind, and, while the images together pass `max_bytes`, the oldest ones. The images of the save
that triggered a sweep are kept even when they alone pass the cap (their URLs were just handed out). Files of
other names in the folder are never touched or counted. Several processes may share the folder (Ray replicas
on one node): the folder is the only record, and a file deleted by another process is simply gone.
"""
from __future__ import annotations

import errno
import logging
import os
import re
import secrets
import threading
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("engine.serve")

NAME_BYTES = 24  # secrets.token_urlsafe(24): 32 characters, 192 random bits
NAME_RE = re.compile(r"[A-Za-z0-9_-]{32}\.png")
TEMP_RE = re.compile(r"\.[A-Za-z0-9_-]{32}\.png\.tmp")
ROUTE = "/v1/images/files/"  # GET ROUTE + name; the API key is not asked there (the name is the capability)


@dataclass(frozen=True)
class Swept:
    """What one sweep did and left: files deleted by reason, and the hosted images left."""

    expired: int = 0
    over_size: int = 0
    files: int = 0
    total_bytes: int = 0


def folder_problem(folder: Path) -> str | None:
    """Why `folder` could not be created or written (without creating it), or None."""
    existing = folder
    while not existing.exists():
        if existing.parent == existing:
            break
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is not a directory"
    if not os.access(existing, os.W_OK | os.X_OK):
        return f"{existing} is not writable"
    return None


class ImageStore:
    """One folder of hosted PNGs (see the module docstring). Blocking calls: run them off the event loop."""

    def __init__(self, folder: Path, ttl_s: float, max_bytes: int, metrics=None):
        self.folder, self.ttl_s, self.max_bytes, self.metrics = Path(folder), ttl_s, max_bytes, metrics
        self._sweeping = threading.Lock()

    def open(self) -> Swept:
        """Create the folder (owner-only when new) and sweep what earlier runs left; OSError if it cannot be used."""
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not os.access(self.folder, os.W_OK | os.X_OK):
            raise PermissionError(errno.EACCES, "the folder is not writable", str(self.folder))
        return self.sweep()

    def save(self, pngs: list[bytes]) -> list[str]:
        """The new names of `pngs`, each written atomically; then a sweep that keeps them. OSError if a write
        fails (the temp file is removed; images already written stay until they expire)."""
        names = []
        for data in pngs:
            name = secrets.token_urlsafe(NAME_BYTES) + ".png"
            temp = self.folder / f".{name}.tmp"
            try:
                with open(temp, "xb") as f:
                    f.write(data)
                os.replace(temp, self.folder / name)
            except OSError:
                temp.unlink(missing_ok=True)
                raise
            names.append(name)
        try:
            self.sweep(keep=frozenset(names))
        except OSError as exc:  # the images are written and their URLs valid; the next sweep retries
            log.warning("image sweep after a save failed: %s", exc)
        return names

    def read(self, name: str) -> tuple[bytes, float] | None:
        """(PNG bytes, seconds left) of a hosted image; None for a name not of ours, missing or expired."""
        if not NAME_RE.fullmatch(name):
            return None
        path = self.folder / name
        try:
            age = time.time() - path.stat().st_mtime
            if age >= self.ttl_s:
                path.unlink(missing_ok=True)
                return None
            return path.read_bytes(), self.ttl_s - age
        except FileNotFoundError:
            return None

    def sweep(self, keep: frozenset[str] = frozenset()) -> Swept:
        """Delete expired images and stale temp files, then the oldest images (but `keep`) while the rest pass
        max_bytes. One pass over one listing of the folder; a file that vanishes meanwhile is skipped."""
        with self._sweeping:
            now = time.time()
            expired, images = 0, []  # images: (mtime_ns, name, size) of those still valid
            with os.scandir(self.folder) as entries:
                for entry in entries:
                    ours, temp = NAME_RE.fullmatch(entry.name), TEMP_RE.fullmatch(entry.name)
                    if not (ours or temp):
                        continue
                    try:
                        st = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if now - st.st_mtime < self.ttl_s:
                        if ours:
                            images.append((st.st_mtime_ns, entry.name, st.st_size))
                    elif ours:
                        expired += self._remove(entry.name, "expired")
                    else:  # a temp file its writer (a killed process) never renamed
                        self._remove(entry.name, None)
            total = sum(size for _, _, size in images)
            over = gone = 0  # deleted by this sweep; gone also counts those another process deleted first
            for _, name, size in sorted(images):  # oldest first
                if total <= self.max_bytes:
                    break
                if name not in keep:
                    over += self._remove(name, "over_size")
                    gone, total = gone + 1, total - size
            left = Swept(expired, over, len(images) - gone, total)
            if self.metrics is not None:
                self.metrics.hosted_files.set(left.files)
                self.metrics.hosted_bytes.set(left.total_bytes)
            return left

    def _remove(self, name: str, reason: str | None) -> int:
        """1 if this call deleted the file (counted under `reason` in the metrics), 0 if it was already gone."""
        try:
            (self.folder / name).unlink()
        except FileNotFoundError:
            return 0
        if reason is not None and self.metrics is not None:
            self.metrics.hosted_removed.labels(reason).inc()
        return 1
