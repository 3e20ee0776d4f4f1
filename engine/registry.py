"""A directory of named vector sets: ``<root>/<name>/{vectors.safetensors,vsteer.json}``.

The registry is what per-request steering names resolve against, in the vLLM front-end,
in every worker and in the server's admin routes. Names are plain identifiers; a name
can never reach outside the root (no separators, no ``..``, symlinks resolved and checked).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

from .formats import (
    METADATA_FILE,
    VectorFileError,
    content_sha256,
    load_vector_set,
    read_metadata,
    save_vector_set,
)
from .vectors import SteeringVectorSet

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)
VECTORS_DIR_ENV = "VSTEER_VECTORS_DIR"


class UnknownVectorError(KeyError):
    """A name that is not in the registry. ``str()`` lists the known names."""

    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        super().__init__(name)

    def __str__(self) -> str:
        shown = ", ".join(self.known[:50]) or "(none)"
        return f"unknown steering vector {self.name!r}; known vectors: {shown}"


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(f"invalid vector name {name!r}: use letters, digits, '_', '-' and '.', "
                         "starting with a letter or digit (no paths)")
    return name


class VectorRegistry:
    """Named vector sets under one root directory, with a small content-addressed cache."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"vector directory {self.root} does not exist")
        self._lock = threading.Lock()
        self._meta_cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._set_cache: dict[tuple[str, str], SteeringVectorSet] = {}

    @classmethod
    def from_env(cls) -> "VectorRegistry | None":
        root = os.environ.get(VECTORS_DIR_ENV)
        return cls(root) if root else None

    def path_for(self, name: str) -> Path:
        check_name(name)
        path = (self.root / name).resolve()
        if path.parent != self.root:
            raise ValueError(f"vector name {name!r} resolves outside the vector directory")
        return path

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir()
                      if p.is_dir() and _NAME_RE.match(p.name) and (p / METADATA_FILE).is_file())

    def __contains__(self, name: str) -> bool:
        try:
            return (self.path_for(name) / METADATA_FILE).is_file()
        except ValueError:
            return False

    def metadata(self, name: str) -> dict[str, Any]:
        """The set's ``vsteer.json``, re-read only when the file changes."""
        path = self.path_for(name)
        meta_file = path / METADATA_FILE
        try:
            mtime = meta_file.stat().st_mtime_ns
        except FileNotFoundError:
            raise UnknownVectorError(name, self.names()) from None
        with self._lock:
            cached = self._meta_cache.get(name)
            if cached and cached[0] == mtime:
                return cached[1]
        meta = read_metadata(path)
        with self._lock:
            self._meta_cache[name] = (mtime, meta)
        return meta

    def load(self, name: str, *, expect_hidden_size: int | None = None,
             expect_num_layers: int | None = None) -> SteeringVectorSet:
        """Load (and verify) a named set; cached by content hash, so a replaced file is re-read."""
        return self.load_with_hash(name, expect_hidden_size=expect_hidden_size,
                                   expect_num_layers=expect_num_layers)[0]

    def load_with_hash(self, name: str, *, expect_hidden_size: int | None = None,
                       expect_num_layers: int | None = None) -> tuple[SteeringVectorSet, str]:
        """The set and the sha256 of exactly the tensors returned.

        The hash comes from what was loaded, never from a second read of the metadata: a
        set overwritten between two reads must not pair old tensors with the new hash
        (fingerprints, and the prefix-cache namespaces derived from them, rely on it)."""
        meta = self.metadata(name)
        key = (name, meta["sha256"])
        with self._lock:
            cached = self._set_cache.get(key)
        if cached is None:
            cached = load_vector_set(self.path_for(name), expect_hidden_size=expect_hidden_size,
                                     expect_num_layers=expect_num_layers)
            key = (name, content_sha256(cached.vectors))  # the file may have changed since ``meta``
            with self._lock:
                self._set_cache = {k: v for k, v in self._set_cache.items() if k[0] != name}
                self._set_cache[key] = cached
        elif expect_hidden_size is not None and cached.hidden_size != expect_hidden_size:
            raise VectorFileError(f"{name}: hidden size {cached.hidden_size} does not match the model's "
                                  f"{expect_hidden_size}")
        return cached, key[1]

    def add(self, name: str, vs: SteeringVectorSet, *, overwrite: bool = False) -> Path:
        path = self.path_for(name)
        return save_vector_set(vs, path, overwrite=overwrite)

    def remove(self, name: str) -> None:
        path = self.path_for(name)
        if not (path / METADATA_FILE).is_file():
            raise UnknownVectorError(name, self.names())
        shutil.rmtree(path)
        with self._lock:
            self._meta_cache.pop(name, None)
            self._set_cache = {k: v for k, v in self._set_cache.items() if k[0] != name}
