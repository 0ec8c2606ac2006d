"""Content-addressed artifact cache: keys, atomic writes, manifests, integrity checks.

Every artifact directory holds its files and a `manifest.json` that records the key's inputs and the
sha256 of every file. A directory is published by renaming a finished temp directory, so readers
never see half-written artifacts; a truncated or altered file is caught by `verify`.

Layout under the engine dir:
    <engine_dir>/<model_id>/onnx/<component>-<key>/      exported + optimized ONNX (+ external data)
    <engine_dir>/<model_id>/<backend>/<component>-<key>/ backend artifact (engine plan, ORT model, ...)
    <engine_dir>/<model_id>/build.json                   the last build: which artifact per component
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

MANIFEST = "manifest.json"
BUILD_RECORD = "build.json"
HASH_MEMO = "file-hashes.json"  # under the cache root: stat-keyed sha256 of weight files
KEY_LEN = 16


class CorruptArtifact(RuntimeError):
    """An artifact on disk does not match its manifest."""


def canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def content_key(parts: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(parts).encode()).hexdigest()[:KEY_LEN]


def hash_file(path: Path, chunk: int = 1 << 22) -> str:
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
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True, default=str)
        f.write("\n")
    os.replace(tmp, path)


def read_json(path: Path) -> Any:
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


def write_manifest(art_dir: Path, key: str, key_parts: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    files = {
        p.relative_to(art_dir).as_posix(): {"sha256": hash_file(p), **_stamp(p)}
        for p in sorted(art_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"key": key, "key_parts": key_parts, "files": files, "created": time.time(), **extra}
    write_json_atomic(art_dir / MANIFEST, manifest)
    return manifest


def _stamp(p: Path) -> dict[str, int]:
    st = p.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def verify(art_dir: Path, full: bool = False) -> dict[str, Any]:
    """Return the manifest if every listed file is intact; else raise CorruptArtifact.

    A file must have its recorded size; its sha256 is recomputed when its mtime changed since the
    build (an in-place edit) or when `full` is set, so an untouched multi-GB artifact loads without
    being re-read."""
    mpath = art_dir / MANIFEST
    if not mpath.is_file():
        raise CorruptArtifact(f"{art_dir}: no {MANIFEST} (interrupted build?); rebuild with --force-rebuild")
    try:
        manifest = read_json(mpath)
        files = manifest["files"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise CorruptArtifact(f"{mpath}: unreadable manifest ({e!r}); rebuild with --force-rebuild") from e
    for rel, rec in files.items():
        p = art_dir / rel
        if not p.is_file():
            raise CorruptArtifact(f"{p}: missing; rebuild with --force-rebuild")
        stamp = _stamp(p)
        if stamp["size"] != rec["size"]:
            raise CorruptArtifact(f"{p}: {stamp['size']} bytes, the manifest says {rec['size']} (truncated?); "
                                  "rebuild with --force-rebuild")
        if (full or stamp["mtime_ns"] != rec["mtime_ns"]) and hash_file(p) != rec["sha256"]:
            raise CorruptArtifact(f"{p}: content does not match its manifest hash (altered); "
                                  "rebuild with --force-rebuild")
    return manifest


def artifact_dir(engine_dir: Path, model_id: str, kind: str, component: str, key: str) -> Path:
    return engine_dir / model_id / kind / f"{component}-{key}"


def lookup(art_dir: Path) -> dict[str, Any] | None:
    """The manifest of a valid cached artifact, or None when it must be (re)built."""
    if not art_dir.exists():
        return None
    try:
        return verify(art_dir)
    except CorruptArtifact:
        return None
