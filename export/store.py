"""Generic on-disk helpers shared by export/ and engine/: the cache root, content keys, file hashes
(memoised by stat), checksummed atomic JSON writes, atomically published directories, per-target file
locks and the removal of what killed writers left behind.

This module imports nothing from the project, so both layers can use it: export/ never imports
engine/, and engine/cache.py re-exports these names beside its manifest and artifact code.

Modes: mkdtemp/mkstemp create 0700 dirs and 0600 files; what is published here gets the modes an
ordinary mkdir/open would give instead (0o777 / 0o666 minus the umask), so a service running as
another user can read the engines. The umask is read from /proc/self/status (no race); where that
is missing it is read by setting a strict one and putting it back (os.umask twice), which races only
with another thread creating a file in that instant (that file would get 0o077-masked modes).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

HASH_MEMO = "file-hashes.json"  # under the cache root: stat-keyed sha256 of weight files
KEY_LEN = 16
CHECKSUM = "_sha256"  # key of the self-checksum in JSON written with checksum=True
LOCK_SUFFIX = ".lock"  # lock files end so; remove_stale keeps them


class DamagedFile(ValueError):
    """A JSON file that cannot be parsed or fails its own checksum (truncated, altered); names the file."""


def cache_root() -> Path:
    """Where presets, conversions, the hash memo and the export store live: $SD_ENGINE_CACHE, else
    ~/.cache/sd_engine."""
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


def _is_sha256(value: Any) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _read_memo(memo: Path) -> dict[str, Any]:
    """The memo's entries; {} (and a warning naming the file) when it is damaged or unreadable."""
    try:
        known = read_json(memo)
    except FileNotFoundError:
        return {}
    except (DamagedFile, OSError) as e:
        warnings.warn(f"{memo}: ignored ({e}); weight files are re-hashed and the memo rewritten", stacklevel=3)
        return {}
    if not isinstance(known, dict):
        warnings.warn(f"{memo}: ignored (not a JSON object); weight files are re-hashed and the memo rewritten",
                      stacklevel=3)
        return {}
    return known


def hash_file_memo(path: Path, memo: Path) -> str:
    """sha256 of a file, remembered in `memo` (JSON) by resolved path, size and mtime: an unchanged
    multi-GB weight file is read once, not on every build or start-up. A damaged memo is ignored and
    rewritten, one that cannot be written (read-only cache) only costs a re-hash next time: both warn."""
    key, st = str(path.resolve()), path.stat()
    stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    known = _read_memo(memo)
    rec = known.get(key)
    if isinstance(rec, dict) and {k: rec.get(k) for k in stamp} == stamp and _is_sha256(rec.get("sha256")):
        return rec["sha256"]
    digest = hash_file(path)
    known[key] = {**stamp, "sha256": digest}
    try:
        write_json_atomic(memo, known, checksum=True)
    except OSError as e:
        warnings.warn(f"{memo}: cannot save weight hashes ({e}); they are re-computed on the next run "
                      "(make the cache writable or set SD_ENGINE_CACHE to a writable folder)", stacklevel=2)
    return digest


def hash_files(paths: list[Path], memo: Path | None = None) -> str:
    """One hash over several files, in the given order (names included)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode())
        h.update((hash_file_memo(p, memo) if memo else hash_file(p)).encode())
    return h.hexdigest()


def current_umask() -> int:
    """The process umask, read without changing it where /proc is mounted (see the module doc)."""
    with suppress(OSError, ValueError):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    mask = os.umask(0o077)  # strict while it is out: a file made by another thread now is private, not open
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, obj: Any, checksum: bool = False) -> None:
    """Write `obj` as JSON to `path` through a temp file and a rename: readers never see half of it.
    The file gets the umask's ordinary mode (0o666 & ~umask), not mkstemp's 0600. With `checksum`, a
    dict also carries the sha256 of its own content (CHECKSUM), which read_json checks."""
    if checksum and isinstance(obj, dict):
        obj = {**{k: v for k, v in obj.items() if k != CHECKSUM}, CHECKSUM: _checksum(obj)}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            os.fchmod(f.fileno(), 0o666 & ~current_umask())
            json.dump(obj, f, indent=2, sort_keys=True, default=str)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.unlink(tmp)
        raise


def _checksum(obj: dict[str, Any]) -> str:
    """sha256 of the canonical JSON of `obj` without its CHECKSUM entry (what was written, as JSON reads it back)."""
    body = json.loads(json.dumps({k: v for k, v in obj.items() if k != CHECKSUM}, default=str))
    return hashlib.sha256(canonical(body).encode()).hexdigest()


def read_json(path: Path, check: bool = True) -> Any:
    """The parsed JSON content of `path`; DamagedFile naming it when it is not JSON (truncated, altered).
    A dict that carries a CHECKSUM is checked against it (unless `check` is off) and returned without it."""
    try:
        with open(path, "rb") as f:
            obj = json.loads(f.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DamagedFile(f"{path} is damaged (not valid JSON: {e})") from e
    return check_json(path, obj) if check else obj


def check_json(path: Path, obj: Any) -> Any:
    """`obj` (read from `path`) without its CHECKSUM entry; DamagedFile naming `path` when it does not match."""
    if not isinstance(obj, dict) or CHECKSUM not in obj:
        return obj  # written without a checksum (other files, older versions)
    if obj[CHECKSUM] != _checksum(obj):
        raise DamagedFile(f"{path} is damaged (its content does not match its checksum: altered)")
    return {k: v for k, v in obj.items() if k != CHECKSUM}


@contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) for the block; when another process holds
    it, print one line ("waiting for another build of <what> (lock <path>)") and wait. The kernel drops
    an flock when its holder exits or is killed, so a crashed build never leaves it stuck."""
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY | os.O_CREAT, 0o666)  # read access suffices for flock
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another build of {what} (lock {path})", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def lock_path(final: Path) -> Path:
    """The lock file that guards publishing `final`: .<name>.lock beside it."""
    return final.with_name(f".{final.name}{LOCK_SUFFIX}")


def remove_stale(parent: Path, name: str | None = None) -> list[Path]:
    """Remove what killed writers left in `parent` and return it: staging dirs (.<name>.<random>), set-aside
    dirs (.<name>.old.<pid>) and temp files (.<name>.<random>.tmp); only those of `name` when given, else
    every dot-entry. Lock files stay. Call it only while holding the lock every writer there holds."""
    prefix = f".{name}." if name else "."
    if not parent.is_dir():
        return []
    stale = [p for p in sorted(parent.iterdir()) if p.name.startswith(prefix) and not p.name.endswith(LOCK_SUFFIX)]
    for p in stale:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with suppress(FileNotFoundError):
                p.unlink()
    return stale


@contextmanager
def exclusive(final: Path) -> Iterator[None]:
    """Hold the lock of `final` (lock_path) and clear the leftovers of killed attempts to publish it."""
    with file_lock(lock_path(final), final.name):
        remove_stale(final.parent, final.name)
        yield


@contextmanager
def staging_dir(final: Path) -> Iterator[Path]:
    """Yield a temp dir beside `final`; on success publish it as `final` in one rename. The dir gets
    the umask's ordinary mode (0o777 & ~umask), not mkdtemp's 0700. A writer killed meanwhile leaves
    .<name>.<random> (or .<name>.old.<pid>) behind: remove_stale clears it under the writers' lock."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}."))
    try:
        os.chmod(tmp, 0o777 & ~current_umask())
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


def linked_folder(base: Path, extra: dict[str, Path], root: Path) -> Path:
    """One folder that is the model folder `base` with the sub-folders `extra` (name -> folder) added or replaced:
    links, made once (atomically) under `root`, keyed by the resolved paths (what export and the backends read as
    one model: ControlNets, a tiny VAE)."""
    parts = {"base": str(base.resolve()), "extra": {k: str(v.resolve()) for k, v in sorted(extra.items())}}
    folder = root / f"{base.name}-{hashlib.sha256(canonical(parts).encode()).hexdigest()[:16]}"
    if (folder / "model_index.json").exists():
        return folder
    with exclusive(folder):
        if not (folder / "model_index.json").exists():  # unless another build made it meanwhile
            with staging_dir(folder) as tmp:
                for entry in sorted(base.resolve().iterdir()):
                    if entry.name not in extra:
                        os.symlink(entry, tmp / entry.name)
                for name, path in extra.items():
                    os.symlink(path.resolve(), tmp / name)
    return folder
