"""Content-addressed artifact cache: manifests, integrity checks, artifact paths, the per-model lock.

Keys, file hashes, atomic JSON writes and staging directories are generic (export/store.py) and
re-exported here, so `cache.content_key`, `cache.staging_dir`, ... keep working for engine code.

Every artifact directory holds its files and a `manifest.json` that records the key's inputs and the
sha256 of every file (and a checksum of itself). A directory is published by renaming a finished temp
directory, so readers never see half-written artifacts; a truncated or altered file is caught by
`verify` (sizes always; hashes when a file's mtime changed, or every hash with full=True).

Layout under the engine dir:
    <engine_dir>/<model_id>/.lock                        flock held by the build of this model
    <engine_dir>/<model_id>/onnx/<component>-<key>/      exported + optimized ONNX (+ external data)
    <engine_dir>/<model_id>/<backend>/<component>-<key>/ backend artifact (engine plan, ORT model, ...)
    <engine_dir>/<model_id>/build.json                   the last build: which artifact per component
and under the cache root (export/store.py), shared by every engine dir:
    <cache root>/exports/<key>/                         each ONNX export once, copied into the engine dirs
                                                        that build it (a new engine dir exports nothing twice)
Dot-entries besides `.lock` (staging dirs, temp files) belong to a build in progress: the build that
holds the lock removes those a killed build left (remove_orphans).
"""
from __future__ import annotations

import shutil
import time
import warnings
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

from export.store import (  # re-exported: engine code and tests use them as cache.<name>
    HASH_MEMO,
    KEY_LEN,
    DamagedFile,
    cache_root,
    canonical,
    check_json,
    content_key,
    exclusive,
    file_lock,
    hash_file,
    hash_file_memo,
    hash_files,
    read_json,
    remove_stale,
    staging_dir,
    write_json_atomic,
)

__all__ = [
    "BUILD_RECORD", "RECORD_FORMAT", "HASH_MEMO", "KEY_LEN", "LOCK", "MANIFEST", "CorruptArtifact", "DamagedFile",
    "artifact_dir", "canonical", "content_key", "hash_file", "hash_file_memo", "hash_files", "lookup", "model_lock",
    "problems", "read_json", "read_record", "remove_orphans", "staging_dir", "verify", "write_json_atomic",
    "write_manifest",
]

MANIFEST = "manifest.json"
BUILD_RECORD = "build.json"
LOCK = ".lock"  # <engine_dir>/<model_id>/.lock
RECORD_FORMAT = 2  # build.json layout: paths relative to <engine_dir>/<model_id>, model files copied in
EXPORTS = "exports"  # <cache root>/exports/<key>/: every engine dir's ONNX exports, by content key (shared)
REPAIR = "repair with python -m engine.build --verify (and the options of the original build)"


class CorruptArtifact(RuntimeError):
    """An artifact on disk does not match its manifest: `path` names the file, `problem` says how."""

    def __init__(self, path: Path, problem: str):
        super().__init__(f"{path}: {problem}; {REPAIR}")
        self.path, self.problem = path, problem


def write_manifest(art_dir: Path, key: str, key_parts: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Record the key's inputs and every file's sha256, size and mtime in `art_dir`/manifest.json."""
    files = {
        p.relative_to(art_dir).as_posix(): {"sha256": hash_file(p), **_stamp(p)}
        for p in sorted(art_dir.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {"key": key, "key_parts": key_parts, "files": files, "created": time.time(), **extra}
    write_json_atomic(art_dir / MANIFEST, manifest, checksum=True)
    return manifest


def _stamp(p: Path) -> dict[str, int]:
    st = p.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _read_manifest(art_dir: Path) -> dict[str, Any]:
    """The manifest of `art_dir`, its file table checked for shape; CorruptArtifact naming it otherwise."""
    mpath = art_dir / MANIFEST
    if not mpath.is_file():
        raise CorruptArtifact(art_dir, f"no {MANIFEST} (interrupted build?)")
    try:
        manifest = read_json(mpath)
    except DamagedFile as e:
        raise CorruptArtifact(mpath, f"unreadable manifest ({e})") from e
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(files, dict) or not all(_is_file_record(r) for r in files.values()):
        raise CorruptArtifact(mpath, "unreadable manifest (no valid 'files' table)")
    return manifest


def _is_file_record(rec: Any) -> bool:
    return (isinstance(rec, dict) and isinstance(rec.get("size"), int) and isinstance(rec.get("mtime_ns"), int)
            and isinstance(rec.get("sha256"), str))


def _file_problem(p: Path, rec: dict[str, Any], full: bool) -> str | None:
    """What is wrong with one listed file, or None when it is intact."""
    if not p.is_file():
        return "missing"
    stamp = _stamp(p)
    if stamp["size"] != rec["size"]:
        return f"{stamp['size']} bytes, the manifest says {rec['size']} (truncated?)"
    if (full or stamp["mtime_ns"] != rec["mtime_ns"]) and hash_file(p) != rec["sha256"]:
        return "content does not match its manifest hash (altered)"
    return None


def _check(art_dir: Path, full: bool) -> tuple[dict[str, Any] | None, list[CorruptArtifact]]:
    """(the manifest or None, every defect found), each defect naming its file."""
    try:
        manifest = _read_manifest(art_dir)
    except CorruptArtifact as e:
        return None, [e]
    found = []
    for rel, rec in manifest["files"].items():
        problem = _file_problem(art_dir / rel, rec, full)
        if problem:
            found.append(CorruptArtifact(art_dir / rel, problem))
    return manifest, found


def problems(art_dir: Path, full: bool = False) -> list[CorruptArtifact]:
    """Every defect of an artifact dir (an unreadable manifest is one), each naming its file; [] if intact."""
    return _check(art_dir, full)[1]


def verify(art_dir: Path, full: bool = False) -> dict[str, Any]:
    """Return the manifest if every listed file is intact; else raise CorruptArtifact naming the first bad file.

    A file must have its recorded size; its sha256 is recomputed when its mtime changed since the
    build (an in-place edit) or when `full` is set, so an untouched multi-GB artifact loads without
    being re-read. The trade-off: bytes altered with the mtime put back are found only with `full`."""
    manifest, found = _check(art_dir, full)
    if found or manifest is None:
        raise found[0]
    return manifest


def artifact_dir(engine_dir: Path, model_id: str, kind: str, component: str, key: str) -> Path:
    return engine_dir / model_id / kind / f"{component}-{key}"


def lookup(art_dir: Path, full: bool = False) -> dict[str, Any] | None:
    """The manifest of a valid cached artifact, or None when it must be (re)built."""
    if not art_dir.exists():
        return None
    try:
        return verify(art_dir, full)
    except CorruptArtifact:
        return None


def fetch_export(key: str, dst: Path) -> bool:
    """Copy the export store's ONNX artifact `key` into the empty dir `dst`, every file's hash checked first; False
    when the store has no valid one. Copies, not hard links: ONNX refuses external data with several links."""
    src = cache_root() / EXPORTS / key
    if lookup(src, full=True) is None:
        return False
    for f in sorted(src.iterdir()):
        shutil.copy2(f, dst / f.name)  # the mtime too: the manifest's stamps stay valid
    return True


def publish_export(key: str, src: Path) -> None:
    """Copy the files of a finished ONNX artifact dir into the export store under `key` (atomically), unless a
    valid entry is there already."""
    final = cache_root() / EXPORTS / key
    if lookup(final, full=True) is not None:  # full: an entry fetch would refuse is replaced
        return
    try:
        with exclusive(final):
            if lookup(final, full=True) is None:
                with staging_dir(final) as tmp:
                    for f in sorted(src.iterdir()):
                        shutil.copy2(f, tmp / f.name)
    except OSError as e:  # a read-only or full cache costs the next engine dir an export, never this build
        warnings.warn(f"{final}: cannot keep this export in the store ({e}); another engine dir will export it "
                      "again (make the cache writable or set SD_ENGINE_CACHE to a writable folder)", stacklevel=2)


def model_lock(model_dir: Path, model_id: str) -> AbstractContextManager[None]:
    """The build lock of one model (flock on <model_dir>/.lock): a second build waits, then finds the first's work."""
    return file_lock(model_dir / LOCK, model_id)


def remove_orphans(model_dir: Path) -> list[Path]:
    """Remove the staging dirs and temp files killed builds left in <model_dir> and its kind dirs (onnx/,
    <backend>/, model/); only while holding model_lock, when no other build can be using them."""
    if not model_dir.is_dir():
        return []
    kinds = [p for p in sorted(model_dir.iterdir()) if p.is_dir() and not p.name.startswith(".")]
    return remove_stale(model_dir) + [p for kind in kinds for p in remove_stale(kind)]


def read_record(path: Path) -> dict[str, Any]:
    """A build.json of this format; ValueError naming the file (and the command that remakes it) otherwise."""
    try:
        record = read_json(path, check=False)
    except DamagedFile as e:
        raise ValueError(f"{e}; run python -m engine.build again to rewrite it") from e
    if not isinstance(record, dict) or record.get("format") != RECORD_FORMAT:
        raise ValueError(f"{path} was written by another version of engine.build (format "
                         f"{record.get('format') if isinstance(record, dict) else '?'}, this one reads "
                         f"{RECORD_FORMAT}); run python -m engine.build again")
    try:
        return check_json(path, record)
    except DamagedFile as e:
        raise ValueError(f"{e}; run python -m engine.build again to rewrite it") from e


def find_model_dir(engine_dir: Path, model: str | None) -> Path:
    """<engine_dir>/<model_id> for a model id, the name or path given to build, or the only model there."""
    found = {p.parent.name: p.parent for p in sorted(engine_dir.glob(f"*/{BUILD_RECORD}"))}
    hint = f"run python -m engine.build --engine-dir {engine_dir}" + (f" --model {model}" if model else "")
    if not found:
        raise ValueError(f"no engines in {engine_dir}: {hint}")
    if model is None:
        if len(found) > 1:
            raise ValueError(f"{engine_dir} holds several models ({', '.join(found)}): pass --model with one of them")
        return next(iter(found.values()))
    if model in found:
        return found[model]
    wanted = str(Path(model).expanduser().resolve())
    for model_dir in found.values():
        record = read_record(model_dir / BUILD_RECORD)
        if model in (record.get("model"), record.get("model_id")) or wanted == record.get("source"):
            return model_dir
    raise ValueError(f"no engines for model {model!r} in {engine_dir} (it holds {', '.join(found)}): {hint}")


def find_family_dir(engine_dir: Path, family: str) -> Path:
    """<engine_dir>/<model_id> of the one model of `family` there (an SDXL base's refiner); LookupError naming what
    the dir holds when it has none or several."""
    held = {p.parent.name: read_record(p).get("family") for p in sorted(engine_dir.glob(f"*/{BUILD_RECORD}"))}
    found = [name for name, fam in held.items() if fam == family]
    if len(found) == 1:
        return engine_dir / found[0]
    have = ", ".join(f"{name} ({fam})" for name, fam in held.items()) or "nothing"
    if found:
        raise LookupError(f"{engine_dir} holds several {family} models ({', '.join(found)}): keep one there")
    raise LookupError(f"{engine_dir} holds no {family} model (it holds {have}): build one there with python -m "
                      f"engine.build --model <its folder or preset> --engine-dir {engine_dir}")
