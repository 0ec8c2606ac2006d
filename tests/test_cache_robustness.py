"""Cache robustness: damaged JSON, orphans of killed builds, concurrent builds, unwritable caches,
altered bytes with the mtime put back (--verify), published modes, artifacts other tools can open.

Real onnxruntime builds of `tiny`: one module-scoped engine dir, copied for every destructive test.
"""
from __future__ import annotations

import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine import cache
from engine.build import build_all, parse_args
from engine.build import main as build_main
from engine.config import BuildConfig
from engine.pipeline import Pipeline
from export import store

ROOT = Path(__file__).resolve().parents[1]


def _cfg(engines: Path, **kw) -> BuildConfig:
    return BuildConfig(**{"model": "tiny", "backend": "onnxruntime", "precision": "fp32", "engine_dir": engines,
                          "height": 64, "width": 64, **kw})


def _cli_args(engines: Path, *extra: str) -> list[str]:
    return ["--model", "tiny", "--backend", "onnxruntime", "--precision", "fp32", "--height", "64", "--width", "64",
            "--engine-dir", str(engines), *extra]


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_folder) -> Path:
    """tiny (clip, unet, vae_decoder) for ONNX Runtime, built under umask 022."""
    engines = tmp_path_factory.mktemp("robust") / "engines"
    old = os.umask(0o022)
    try:
        build_all(_cfg(engines), progress=False)
    finally:
        os.umask(old)
    return engines


@pytest.fixture
def engines(built, tmp_path) -> Path:
    """A private copy of the module's engine dir (mtimes kept: still fully cached)."""
    copy = tmp_path / "engines"
    shutil.copytree(built, copy)
    return copy


def _artifact(engines: Path, component: str) -> Path:
    record = cache.read_record(engines / "tiny" / cache.BUILD_RECORD)
    return engines / "tiny" / record["components"][component]["dir"]


def _flip_keeping_mtime(path: Path, at: int | None = None) -> None:
    """Flip the low bit of one byte (the middle one by default), then put the old mtime back."""
    st = path.stat()
    data = bytearray(path.read_bytes())
    i = len(data) // 2 if at is None else at
    data[i] ^= 1
    path.write_bytes(bytes(data))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))


def _env() -> dict[str, str]:
    return dict(os.environ, PYTHONPATH=str(ROOT))


def _wait_for(path: Path, text: str, proc: subprocess.Popen, timeout: float = 120) -> None:
    """Until `text` appears in the file `path` (a child's redirected output); fail if the child exits first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        if proc.poll() is not None:
            pytest.fail(f"process exited ({proc.returncode}) before printing {text!r}: {path.read_text()}")
        time.sleep(0.1)
    pytest.fail(f"no {text!r} in {path} after {timeout} s: {path.read_text()}")


# ----------------------------------------------------------------------------- 1. damaged JSON


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],  # truncated
    lambda text: text.replace('"text_len": 77', '"text_len": 76', 1),  # one bit flipped, still valid JSON
], ids=["truncated", "bit-flipped"])
def test_damaged_build_record_is_named_and_repaired_by_build(engines, damage, capsys):
    record = engines / "tiny" / cache.BUILD_RECORD
    text = record.read_text()
    assert damage(text) != text
    record.write_text(damage(text))
    with pytest.raises(ValueError, match=re.escape(str(record)) + ".*damaged"):
        Pipeline.load(engines, "tiny")
    assert build_main(_cli_args(engines)) == 0  # python -m engine.build: no manual step
    out = capsys.readouterr().out
    assert f"{record} is damaged" in out and "rewritten" in out
    assert "all components were already built" in out  # only the record was remade
    Pipeline.load(engines, "tiny").close()


@pytest.mark.parametrize("damage", [
    lambda text: text[:-10],  # truncated
    lambda text: text.replace('"precision": "fp32"', '"precision": "fp33"', 1),  # one bit flipped, valid JSON
], ids=["truncated", "bit-flipped"])
def test_damaged_manifest_is_named_and_rebuilt(engines, damage):
    manifest = _artifact(engines, "unet") / cache.MANIFEST
    text = manifest.read_text()
    assert damage(text) != text
    manifest.write_text(damage(text))
    with pytest.raises(cache.CorruptArtifact, match=re.escape(str(manifest)) + ": unreadable manifest"):
        cache.verify(manifest.parent)
    with pytest.raises(cache.CorruptArtifact, match=re.escape(str(manifest))):
        Pipeline.load(engines, "tiny")
    result = build_all(_cfg(engines), progress=False)
    assert result.built == ["unet:onnxruntime"]
    assert any(str(manifest) in note for note in result.notes), result.notes
    cache.verify(manifest.parent, full=True)
    Pipeline.load(engines, "tiny").close()


@pytest.mark.parametrize("damage", [
    lambda text: text[: len(text) // 2],
    lambda text: re.sub(r'"sha256": "([0-9a-f])', lambda m: f'"sha256": "{"0" if m[1] != "0" else "1"}', text, count=1),
], ids=["truncated", "hash-altered"])
def test_damaged_hash_memo_is_named_ignored_and_rewritten(tmp_path, damage):
    weights, memo = tmp_path / "w.safetensors", tmp_path / "cache" / store.HASH_MEMO
    weights.write_bytes(os.urandom(4096))
    right = store.hash_file(weights)
    assert store.hash_file_memo(weights, memo) == right
    text = memo.read_text()
    assert damage(text) != text
    memo.write_text(damage(text))
    with pytest.warns(UserWarning, match=re.escape(str(memo)) + ".*damaged"):
        assert store.hash_file_memo(weights, memo) == right  # a flipped hash in the memo is not believed
    assert store.read_json(memo)[str(weights.resolve())]["sha256"] == right  # repaired


def test_every_engine_json_names_its_file_when_not_json(tmp_path):
    bad = tmp_path / "scheduler_config.json"
    bad.write_bytes(b'{"beta_start": 0.0\xff')
    with pytest.raises(store.DamagedFile, match=re.escape(str(bad))):
        store.read_json(bad)


# ----------------------------------------------------------------------------- 2, 3. orphans, locks


def test_orphans_of_killed_builds_are_removed_by_the_next_build(engines):
    model_dir = engines / "tiny"
    orphans = [model_dir / "onnx" / ".unet-0123456789abcdef.k2j4h5", model_dir / "onnxruntime" / ".clip-x.old.4242",
               model_dir / "model" / ".files-y.abcdef"]
    for d in orphans:
        (d / "sub").mkdir(parents=True)
        (d / "sub" / "model.onnx").write_bytes(b"half")
    tmp_json = model_dir / ".build.json.q1w2e3.tmp"
    tmp_json.write_text("{")
    result = build_all(_cfg(engines), progress=False)
    assert result.built == []
    assert not [p for p in orphans + [tmp_json] if p.exists()]
    assert sorted(n for n in result.notes if "leftover" in n) == sorted(
        f"removed the leftover of an interrupted build: {p}" for p in orphans + [tmp_json])
    assert (model_dir / cache.LOCK).is_file()  # the lock file itself stays


def test_killed_build_leaves_no_stuck_lock_and_its_staging_dir_is_removed(engines, tmp_path):
    """A build killed mid-staging: while it lives, a second build waits and leaves its staging dir alone;
    once it is SIGKILLed the kernel drops its lock, and the second build removes the orphan and finishes."""
    final = cache.artifact_dir(engines, "tiny", "onnx", "unet", "f" * 16)
    holder_code = (
        "import sys, time; from pathlib import Path; from engine import cache\n"
        f"with cache.model_lock(Path({str(engines / 'tiny')!r}), 'tiny'):\n"
        f"    with cache.staging_dir(Path({str(final)!r})) as tmp:\n"
        "        (tmp / 'model.onnx').write_bytes(b'half')\n"
        "        print(tmp, flush=True); time.sleep(600)\n")
    holder = subprocess.Popen([sys.executable, "-c", holder_code], stdout=subprocess.PIPE, text=True, env=_env(),
                              cwd=ROOT)
    err = tmp_path / "build.err"
    try:
        staging = Path(holder.stdout.readline().strip())
        assert staging.is_dir() and staging.name.startswith(f".{final.name}.")
        with open(err, "w") as ferr:
            build = subprocess.Popen([sys.executable, "-m", "engine.build", *_cli_args(engines)], env=_env(), cwd=ROOT,
                                     stdout=subprocess.PIPE, stderr=ferr, text=True)
        _wait_for(err, "waiting for another build of tiny (lock ", build)
        time.sleep(1)
        assert staging.is_dir() and build.poll() is None  # the live build's staging dir is left alone
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    out, _ = build.communicate(timeout=120)  # the killed holder's lock does not block
    assert build.returncode == 0, err.read_text()
    assert not staging.exists()
    assert f"removed the leftover of an interrupted build: {staging}" in out
    assert "all components were already built" in out


def test_concurrent_builds_do_the_work_once(tmp_path, tiny_folder):
    engines = tmp_path / "engines"
    args = [sys.executable, "-m", "engine.build", *_cli_args(engines, "--components", "clip")]
    procs, outs, errs = [], [tmp_path / f"{k}.out" for k in "ab"], [tmp_path / f"{k}.err" for k in "ab"]
    with cache.model_lock(engines / "tiny", "tiny"):  # both start while the lock is taken, so both must wait
        for out, err in zip(outs, errs, strict=True):
            with open(out, "w") as fout, open(err, "w") as ferr:
                procs.append(subprocess.Popen(args, stdout=fout, stderr=ferr, env=_env(), cwd=ROOT))
        for proc, err in zip(procs, errs, strict=True):
            _wait_for(err, "waiting for another build of tiny (lock ", proc)
    for proc in procs:
        assert proc.wait(timeout=300) == 0
    texts = sorted((out.read_text() for out in outs), key=lambda t: "clip: built" not in t)
    assert "clip: built" in texts[0]
    assert "clip: cached, nothing to do" in texts[1] and "all components were already built" in texts[1]


def test_preset_staging_leftovers_are_removed(tmp_path):
    from export.models import FORMAT_VERSION, materialize_preset
    from export.presets import PRESETS

    preset = PRESETS["tiny"]
    name = f"{preset.name}-{store.content_key({'preset': repr(preset), 'format': FORMAT_VERSION})}"
    orphans = [tmp_path / f".{name}.a1b2c3", tmp_path / f".{name}.old.4242"]
    for d in orphans:
        d.mkdir()
        (d / "model_index.json").write_text("{")
    folder = materialize_preset(preset, root=tmp_path)
    assert folder.name == name and (folder / "model_index.json").is_file()
    assert not [p for p in orphans if p.exists()]


# ----------------------------------------------------------------------------- 4. unwritable hash memo


@pytest.fixture(scope="module")
def folder_engines(tmp_path_factory, tiny_folder) -> tuple[Path, Path]:
    """clip of the tiny folder given by path (so the build needs no preset from the cache root)."""
    engines = tmp_path_factory.mktemp("memo") / "engines"
    build_all(_cfg(engines, model=str(tiny_folder), components=("clip",)), progress=False)
    return engines, tiny_folder


def _memo_dir_is_a_directory(root: Path) -> Path:
    (root / store.HASH_MEMO).mkdir(parents=True)
    return root


def _cache_root_is_a_file(root: Path) -> Path:
    root.write_text("not a folder")
    return root


def _cache_root_is_read_only(root: Path) -> Path:
    if os.geteuid() == 0:
        pytest.skip("root ignores permissions: the other cases simulate an unwritable cache")
    root.mkdir()
    root.chmod(0o555)
    return root


@pytest.mark.parametrize("unwritable", [_memo_dir_is_a_directory, _cache_root_is_a_file, _cache_root_is_read_only],
                         ids=["memo-is-a-directory", "cache-root-is-a-file", "read-only"])
def test_unwritable_hash_memo_only_warns(folder_engines, tmp_path, monkeypatch, unwritable):
    built_dir, folder = folder_engines
    engines = tmp_path / "engines"
    shutil.copytree(built_dir, engines)
    root = unwritable(tmp_path / "cache")
    monkeypatch.setenv("SD_ENGINE_CACHE", str(root))
    try:
        with pytest.warns(UserWarning, match="cannot save weight hashes"):
            result = build_all(_cfg(engines, model=str(folder), components=("clip",)), progress=False)
    finally:
        if root.is_dir():
            root.chmod(0o755)
    assert result.built == [] and result.reused == ["clip"]
    if root.is_dir():
        assert sorted(p.name for p in root.iterdir()) == [store.HASH_MEMO]  # no temp file left behind


# ----------------------------------------------------------------------------- 5. --verify


def test_verify_finds_and_repairs_bytes_altered_with_mtime_restored(engines):
    model = _artifact(engines, "clip") / "model.onnx"
    _flip_keeping_mtime(model)
    Pipeline.load(engines, "tiny").close()  # documented trade-off: only sizes and mtimes are checked by default
    assert build_all(_cfg(engines), progress=False).built == []
    with pytest.raises(cache.CorruptArtifact, match=re.escape(str(model)) + ": content does not match"):
        Pipeline.load(engines, "tiny", verify=True)
    result = build_all(_cfg(engines, verify=True), progress=False)
    assert result.built == ["clip:onnxruntime"]
    assert [n for n in result.notes if str(model) in n] == [
        f"clip:onnxruntime: {model}: content does not match its manifest hash (altered); rebuilt"]
    Pipeline.load(engines, "tiny", verify=True).close()


def test_build_cli_verify_reports_each_mismatch_in_one_line(engines, capsys):
    files = cache.read_record(engines / "tiny" / cache.BUILD_RECORD)["model_files"]
    tokenizer = engines / "tiny" / files / "tokenizer" / "tokenizer.json"
    onnx_copy = _artifact(engines, "vae_decoder") / "model.onnx"
    _flip_keeping_mtime(tokenizer, at=10)
    _flip_keeping_mtime(onnx_copy)
    assert build_main(_cli_args(engines)) == 0
    assert str(tokenizer) not in capsys.readouterr().out  # without --verify: not re-hashed
    assert build_main(_cli_args(engines, "--verify")) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [ln for ln in lines if "rebuilt" in ln] == [
        f"model:files: {tokenizer}: content does not match its manifest hash (altered); rebuilt",
        f"vae_decoder:onnxruntime: {onnx_copy}: content does not match its manifest hash (altered); rebuilt"]
    assert build_main(_cli_args(engines, "--verify")) == 0
    assert "all components were already built" in capsys.readouterr().out


def test_verify_flag_defaults_off_and_says_so(capsys):
    assert parse_args([]).verify is False and parse_args(["--verify"]).verify is True
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    assert re.search(r"--verify\s+re-hash every artifact file.*\(default: False\)", " ".join(
        capsys.readouterr().out.split()))


# ----------------------------------------------------------------------------- 6. modes


def _modes(root: Path) -> tuple[set[int], set[int]]:
    paths = [root, *root.rglob("*")]
    return ({stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_dir()},
            {stat.S_IMODE(p.stat().st_mode) for p in paths if p.is_file()})


def test_published_engine_dir_has_the_umask_modes(built):
    dirs, files = _modes(built / "tiny")
    assert dirs == {0o755} and files == {0o644}, (oct_set(dirs), oct_set(files))


def oct_set(modes: set[int]) -> list[str]:
    return sorted(oct(m) for m in modes)


def test_staging_and_json_writes_follow_another_umask(tmp_path):
    old = os.umask(0o027)
    try:
        assert store.current_umask() == 0o027
        with store.staging_dir(tmp_path / "art") as tmp:
            (tmp / "sub").mkdir()
            store.write_json_atomic(tmp / "manifest.json", {"a": 1}, checksum=True)
    finally:
        os.umask(old)
    assert _modes(tmp_path / "art") == ({0o750}, {0o640})


# ----------------------------------------------------------------------------- 17. standard tools open artifacts


def _check_opens_in_onnx(engine_dir: Path) -> list[Path]:
    import onnx

    published = sorted(engine_dir.rglob("*.onnx"))
    for p in published:
        onnx.load(str(p), load_external_data=True)  # refuses hard-linked external data
    linked = [p for p in engine_dir.rglob("*") if p.is_file() and p.stat().st_nlink > 1]
    assert linked == []
    return published


def test_every_published_onnx_opens_in_onnx(built):
    assert len(_check_opens_in_onnx(built)) == 6  # 3 exported graphs + 3 onnxruntime copies


def test_external_data_artifacts_open_in_onnx_and_onnxruntime(tmp_path, tiny_folder, monkeypatch):
    import onnxruntime

    from export import onnx_export

    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_LIMIT", 0)  # force model.onnx.data on a tiny graph
    engines = tmp_path / "engines"
    build_all(_cfg(engines, components=("clip",)), progress=False)
    data = sorted(engines.rglob("model.onnx.data"))
    assert [p.parent.parent.name for p in data] == ["onnx", "onnxruntime"]
    for p in _check_opens_in_onnx(engines):
        onnxruntime.InferenceSession(str(p), providers=["CPUExecutionProvider"])
