"""A directory of named vector sets: ``<root>/<name>/{vectors.safetensors,vsteer.json}``.

The registry is what per-request steering names resolve against, in the vLLM front-end,
in every worker and in the server's admin routes. Names are plain identifiers; a name
can never reach outside the root (no separators, no ``..``, symlinks resolved and checked).

A request is validated by the front-end and applied later by every worker, each reading
the registry itself. So that all of them apply the same content even when a set is
overwritten or deleted in between, the front-end pins each name to the content hash it
validated, and the registry keeps the content it replaces or removes for a while under
``<root>/.versions/<name>/<sha256>/`` (``VSTEER_VERSION_RETAIN_SECONDS``, default one hour).
"""

from __future__ import annotations

import os
import re
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from .errors import UnknownVectorError, VectorFileError, VersionGoneError
from .formats import (
    METADATA_FILE,
    check_compatible,
    content_sha256,
    load_vector_set,
    read_metadata,
    save_vector_set,
)
from .vectors import SteeringVectorSet

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
_NAME_RE = re.compile(NAME_PATTERN)
VERSIONS_DIR = ".versions"  # never a valid name: names start with a letter or digit
RETAIN_ENV = "VSTEER_VERSION_RETAIN_SECONDS"
_CACHED_VERSIONS_PER_NAME = 4


def check_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.match(name) or ".." in name:
        raise ValueError(f"invalid vector name {name!r}: use letters, digits, '_', '-' and '.', "
                         "starting with a letter or digit (no paths)")
    return name


class VectorRegistry:
    """Named vector sets under one root directory, with a small content-addressed cache."""

    def __init__(self, root: str | os.PathLike, *, retain_seconds: float | None = None):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"vector directory {self.root} does not exist")
        self.retain_seconds = float(os.environ.get(RETAIN_ENV, 3600) if retain_seconds is None else retain_seconds)
        self._lock = threading.Lock()
        self._write_lock = threading.Lock()
        self._meta_cache: dict[str, tuple[float, dict[str, Any]]] = {}
        self._set_cache: dict[tuple[str, str], SteeringVectorSet] = {}

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
                       expect_num_layers: int | None = None,
                       sha256: str | None = None) -> tuple[SteeringVectorSet, str]:
        """The set and the sha256 of exactly the tensors returned.

        The hash is checked against the tensors actually loaded: a set overwritten while
        it is read must not pair old tensors with the new hash (fingerprints, and the
        prefix-cache namespaces derived from them, rely on it). With ``sha256`` the result
        is that exact content, current or kept from before an overwrite or removal, or
        ``VersionGoneError``."""
        if sha256 is None:
            sha256 = self.metadata(name)["sha256"]
        vs = self._load_version(name, sha256)
        shape = {"hidden_size": vs.hidden_size, "num_layers": vs.num_layers, "layers": vs.layers}
        check_compatible(shape, name, expect_hidden_size=expect_hidden_size, expect_num_layers=expect_num_layers)
        return vs, sha256

    def _load_version(self, name: str, sha256: str) -> SteeringVectorSet:
        """Exactly the content ``sha256``: the hash is re-checked on what was loaded, since
        the live set may be rewritten between reading its metadata and its tensors."""
        vs = self._cached(name, sha256)
        if vs is not None:
            return vs
        for path in (self.path_for(name), self._version_path(name, sha256)):
            try:
                if read_metadata(path)["sha256"] != sha256:
                    continue
                vs = load_vector_set(path)
            except VectorFileError:  # absent, or replaced while we read it
                continue
            if content_sha256(vs.vectors) == sha256:
                self._remember(name, sha256, vs)
                return vs
        if name not in self:
            raise UnknownVectorError(name, self.names())
        raise VersionGoneError(f"{name}: version {sha256[:12]} is neither current nor kept any more "
                               f"(replaced versions are kept for {self.retain_seconds:g} s)")

    def _cached(self, name: str, sha256: str) -> SteeringVectorSet | None:
        with self._lock:
            return self._set_cache.get((name, sha256))

    def _remember(self, name: str, sha256: str, vs: SteeringVectorSet) -> None:
        """Cache a few versions per name: in-flight requests may still pin an older one."""
        with self._lock:
            self._set_cache.pop((name, sha256), None)
            self._set_cache[(name, sha256)] = vs
            mine = [k for k in self._set_cache if k[0] == name]
            for k in mine[:-_CACHED_VERSIONS_PER_NAME]:
                del self._set_cache[k]

    def _version_path(self, name: str, sha256: str) -> Path:
        check_name(name)
        if not all(c in "0123456789abcdef" for c in sha256) or len(sha256) != 64:
            raise ValueError(f"invalid content hash {sha256!r}")
        return self.root / VERSIONS_DIR / name / sha256

    def _keep_current(self, name: str) -> None:
        """Copy the current content of ``name`` to the versions area before it changes."""
        path = self.path_for(name)
        try:
            sha = read_metadata(path)["sha256"]
        except VectorFileError:
            return
        dest = self._version_path(name, sha)
        if not dest.exists():
            tmp = dest.with_name(f".{sha}.{os.getpid()}.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(path, tmp)
            try:
                os.replace(tmp, dest)
            except OSError:  # another process kept the same version first
                shutil.rmtree(tmp, ignore_errors=True)
                if not dest.exists():
                    raise
        os.utime(dest)  # retention counts from when this version stopped being current

    def prune_versions(self) -> int:
        """Delete kept versions older than the retention time; returns how many."""
        base = self.root / VERSIONS_DIR
        if not base.is_dir():
            return 0
        cutoff, removed = time.time() - self.retain_seconds, 0
        for version in base.glob("*/*"):
            try:
                if version.stat().st_mtime < cutoff:
                    shutil.rmtree(version)
                    removed += 1
            except FileNotFoundError:
                pass
        return removed

    def add(self, name: str, vs: SteeringVectorSet, *, overwrite: bool = False) -> Path:
        path = self.path_for(name)
        with self._write_lock:
            if overwrite:
                self._keep_current(name)
            out = save_vector_set(vs, path, overwrite=overwrite)
            self.prune_versions()
        return out

    def remove(self, name: str) -> None:
        path = self.path_for(name)
        with self._write_lock:
            if not (path / METADATA_FILE).is_file():
                raise UnknownVectorError(name, self.names())
            self._keep_current(name)
            shutil.rmtree(path)
            self.prune_versions()
        with self._lock:
            self._meta_cache.pop(name, None)
