"""Generic on-disk helpers shared by export/ and engine/: the cache root, content keys, file hashes
(memoised by stat), atomic JSON writes and atomically published directories.

This module imports nothing from the project, so both layers can use it: export/ never imports
engine/, and engine/cache.py re-exports these names beside its manifest and artifact code.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

HASH_MEMO = "file-hashes.json"  # under the cache root: stat-keyed sha256 of weight files
KEY_LEN = 16


def cache_root() -> Path:
    """Where presets, conversions and the hash memo live: $SD_ENGINE_CACHE, else ~/.cache/sd_engine."""
    return Path(os.environ.get("SD_ENGINE_CACHE", Path.home() / ".cache" / "sd_engine"))


def canonical(obj: Any) -> str:
    """A stable JSON text for `obj` (sorted keys, no spaces; unknown types as str)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_key(parts: dict[str, Any]) -> str:
    """A short sha256 key of the canonical JSON of `parts`."""
    return hashlib.sha256(canonical(parts).encode()).hexdigest()[:KEY_LEN]


def hash_file(path: Path, chunk: int = 1 << 22) -> str:
    """sha256 of a file's bytes, read in chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def hash_file_memo(path: Path, memo: Path) -> str:
    """sha256 of a file, remembered in `memo` (JSON) by resolved path, size and mtime: an unchanged
    multi-GB weight file is read once, not on every build or start-up."""
    key, st = str(path.resolve()), path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        known = read_json(memo) if memo.is_file() else {}
    except (json.JSONDecodeError, UnicodeDecodeError):
        known = {}  # a damaged memo only costs a re-hash
    rec = known.get(key)
    if isinstance(rec, dict) and {k: rec.get(k) for k in stamp} == stamp and "sha256" in rec:
        return rec["sha256"]
    digest = hash_file(path)
    known[key] = {**stamp, "sha256": digest}
    write_json_atomic(memo, known)
    return digest


def hash_files(paths: list[Path], memo: Path | None = None) -> str:
    """One hash over several files, in the given order (names included)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update((hash_file_memo(p, memo) if memo else hash_file(p)).encode())
    return h.hexdigest()


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as JSON to `path` through a temp file and a rename: readers never see half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
    """The parsed JSON content of `path`."""
    with open(path) as f:
        return json.load(f)


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success publish it as `final` in one rename."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        old = final.with_name(f".{final.name}.old.{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
