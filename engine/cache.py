"""Content-addressed artifact cache: manifests, integrity checks, artifact paths.

Keys, file hashes, atomic JSON writes and staging directories are generic (export/store.py) and
re-exported here, so `cache.content_key`, `cache.staging_dir`, ... keep working for engine code.

Every artifact directory holds its files and a `manifest.json` that records the key's inputs and the
sha256 of every file. A directory is published by renaming a finished temp directory, so readers
never see half-written artifacts; a truncated or altered file is caught by `verify`.

Layout under the engine dir:
    <engine_dir>/<model_id>/onnx/<component>-<key>/      exported + optimized ONNX (+ external data)
    <engine_dir>/<model_id>/<backend>/<component>-<key>/ backend artifact (engine plan, ORT model, ...)
    <engine_dir>/<model_id>/build.json                   the last build: which artifact per component
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from export.store import (  # re-exported: engine code and tests use them as cache.<name>
    HASH_MEMO,
    KEY_LEN,
    canonical,
    content_key,
    hash_file,
    hash_file_memo,
    hash_files,
    read_json,
    staging_dir,
    write_json_atomic,
)

__all__ = [
    "BUILD_RECORD", "RECORD_FORMAT", "HASH_MEMO", "KEY_LEN", "MANIFEST", "CorruptArtifact", "artifact_dir", "canonical",
    "content_key", "hash_file", "hash_file_memo", "hash_files", "lookup", "read_json", "staging_dir", "verify",
    "write_json_atomic", "write_manifest",
]

MANIFEST = "manifest.json"
BUILD_RECORD = "build.json"
RECORD_FORMAT = 2  # build.json layout: paths relative to <engine_dir>/<model_id>, model files copied in


class CorruptArtifact(RuntimeError):
    """An artifact on disk does not match its manifest."""


def write_manifest(art_dir: Path, key: str, key_parts: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Record the key's inputs and every file's sha256, size and mtime in `art_dir`/manifest.json."""
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


def read_record(path: Path) -> dict[str, Any]:
    """A build.json of this format; ValueError naming the file (and the command that remakes it) otherwise."""
    try:
        record = read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is damaged ({e}); run python -m engine.build again to rewrite it") from e
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path} was written by another version of engine.build (format "
                         f"{record.get('format') if isinstance(record, dict) else '?'}, this one reads "
                         f"{RECORD_FORMAT}); run python -m engine.build again")
    return record
