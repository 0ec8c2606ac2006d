"""Bounded caches of LoRA work, and the keys they are looked up by (all in memory, all thread-safe).

- `file_key(path)`: a file as it is on disk now: its resolved path, size, mtime_ns, inode and device. A file that is
  rewritten or replaced gets a new key, so its old entry is never hit again and ages out of the LRU.
- `LoraFileCache`: parsed adapters (engine.lora.LoraWeights) by file key, least recently used first out, bounded by
  count and by tensor bytes; one parse per key even when many requests name the same new file at once.
- `Lru`: the bounded map itself; runners keep their compiled forms in one (OpenVINO compiled models, ONNX Runtime
  sessions: `variants_limit()` each), keyed by `weights_key` of the merged weights they were made with, so switching
  between a few adapter sets finds each one compiled already. Each kept form holds a copy of the component's
  weights (RAM, or GPU memory for ONNX Runtime on CUDA): $SD_ENGINE_LORA_VARIANTS trades that memory for switches.
- `weights_key(merged)`: the merged tensors' content (names, dtypes, shapes, bytes) hashed with BLAKE2b. Equal
  merges hash alike whatever computed them; any changed weight changes the key (no sampling, no identities).
"""
from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Generic, TypeVar

import torch

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

FILES = 16  # parsed LoRA files kept
FILE_BYTES = 2 << 30  # ... and at most this many bytes of their tensors (the newest one is kept whatever its size)
VARIANTS = 3  # compiled forms a runner keeps: the built weights and two adapter sets (each a copy of the weights)
VARIANTS_ENV = "SD_ENGINE_LORA_VARIANTS"  # overrides VARIANTS (1 = keep only the one in use: every switch compiles)


@dataclass(frozen=True)
class FileKey:
    """A file's identity as read: the same key means the same bytes (short of a same-size rewrite that restores the
    mtime, which is not an accident)."""

    path: str = ""  # resolved: every name of the file (symlinks, relative paths) shares one entry
    size: int = 0
    mtime_ns: int = 0
    inode: int = 0
    device: int = 0


def file_key(path: Path | str) -> FileKey:
    """`path`'s FileKey now; OSError if it cannot be resolved or stat'ed."""
    resolved = Path(path).resolve(strict=True)
    st = os.stat(resolved)
    return FileKey(str(resolved), st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev)


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0


@dataclass
class Lru(Generic[K, V]):
    """key -> value, the least recently used first out past `max_entries` entries or `max_bytes` (as `size` counts
    a value); the newest entry stays whatever its size. Thread-safe."""

    max_entries: int = FILES
    max_bytes: int | None = None
    size: Callable[[V], int] = lambda _: 0
    stats: CacheStats = field(default_factory=CacheStats)
    _items: OrderedDict[K, tuple[V, int]] = field(default_factory=OrderedDict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def __post_init__(self) -> None:
        if self.max_entries < 1:
            raise ValueError(f"an LRU cache holds at least one entry (max_entries {self.max_entries})")

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.stats.misses += 1
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return item[0]

    def put(self, key: K, value: V) -> None:
        nbytes = self.size(value)
        with self._lock:
            self._items[key] = (value, nbytes)
            self._items.move_to_end(key)
            while len(self._items) > 1 and (len(self._items) > self.max_entries or (
                    self.max_bytes is not None and self.nbytes > self.max_bytes)):
                self._items.popitem(last=False)
                self.stats.evictions += 1

    def reserve(self) -> None:
        """Make room for one more entry now (the least recently used go), before the value to put is built, so a
        runner compiling its next form does not hold one more than the bound meanwhile (with `max_entries` 1 the
        form in use stays alive until the new one replaces it)."""
        with self._lock:
            while self._items and len(self._items) >= self.max_entries:
                self._items.popitem(last=False)
                self.stats.evictions += 1

    @property
    def nbytes(self) -> int:
        return sum(n for _, n in self._items.values())

    def keys(self) -> list[K]:
        """Least recently used first."""
        with self._lock:
            return list(self._items)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()


@dataclass
class LoraFileCache(Generic[V]):
    """Parsed files by FileKey (see the module docstring): `get(path, load)` returns the cached value of the file as
    it is now, else `load(path)`'s, cached only if the file did not change while it was read."""

    lru: Lru[FileKey, V] = field(default_factory=lambda: Lru(max_entries=FILES, max_bytes=FILE_BYTES))
    _loading: dict[FileKey, threading.Lock] = field(default_factory=dict, repr=False)
    _guard: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def get(self, path: Path, load: Callable[[Path], V]) -> V:
        key = file_key(path)
        value = self.lru.get(key)
        if value is not None:
            return value
        with self._guard:
            lock = self._loading.setdefault(key, threading.Lock())
        try:
            with lock:  # one parse per key: concurrent requests for a new file wait for the first one's
                value = self.lru.get(key)
                if value is None:
                    value = load(Path(key.path))
                    if file_key(path) == key:  # else it changed while read: serve this answer, remember none
                        self.lru.put(key, value)
        finally:
            with self._guard:
                self._loading.pop(key, None)
        return value

    def clear(self) -> None:
        self.lru.clear()


def variants_limit() -> int:
    """Compiled forms a runner keeps: $SD_ENGINE_LORA_VARIANTS (a whole number >= 1) or VARIANTS."""
    text = os.environ.get(VARIANTS_ENV, "").strip()
    if not text:
        return VARIANTS
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"{VARIANTS_ENV}={text!r}: expected a whole number >= 1 (compiled forms kept per runner)")
    return int(text)


def weights_key(merged: Mapping[str, torch.Tensor]) -> str:
    """BLAKE2b (128 bits) of the tensors' names, dtypes, shapes and bytes, in name order."""
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(merged):
        t = merged[name].detach()
        h.update(f"{name}\0{t.dtype}\0{tuple(t.shape)}\0".encode())
        raw = t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()  # any dtype, bf16 included
        h.update(raw.data)  # the tensor's own bytes, not a copy
    return h.hexdigest()
