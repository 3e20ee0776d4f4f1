"""A directory of named vector sets, safe for several processes (and hosts) sharing it.

The registry is what per-request steering names resolve against: in every API server,
in every vLLM worker and in the admin routes. Several replicas may mount one volume.

Layout under the root::

    <name>  -> .versions/<name>/<sha256>   the live set: a symlink vsteer writes atomically
    <name>/                                ... or a plain directory made by hand
                                           (``vsteer extract --out <root>/<name>``)
    .versions/<name>/<sha256>/             one directory per content version, never modified
    .leases/<name>/<sha256>/<holder>       a process's lease on a version (mtime = heartbeat)
    .lock                                  the writers' lock (``flock``)

Writers take the lock, write a new version directory under a unique temporary name,
rename it into place, then swap the live symlink with one ``rename``: a crash at any
point leaves the old set or the new one, never half of either. A replaced or removed
version stays on disk while any accepted request pins it (``LeaseKeeper``) and for
``VSTEER_LEASE_GRACE_S`` after; only then does a later write prune it.

Names are plain identifiers; a name can never reach outside the root (no separators,
no ``..``, symlinks resolved and checked).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import shutil
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from .cache import ByteLRU, tensor_bytes
from .errors import UnknownVectorError, VectorFileError, VersionGoneError
from .formats import METADATA_FILE, check_compatible, load_vector_set, read_metadata, save_vector_set, set_sha256
from .leases import LeaseKeeper
from .settings import settings
from .vectors import SteeringVectorSet

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
VERSIONS_DIR = ".versions"   # never a valid name: names start with a letter or digit
LEASES_DIR = ".leases"
LOCK_FILE = ".lock"
TEMP_PREFIX = ".tmp-"
RETIRED_MARK = ".retired"    # in a version directory: when it stopped being current
_LISTING_TTL = 2.0           # seconds a cached listing is trusted without a root change
_SHA_RE = re.compile(r"[0-9a-f]{64}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid vector name {name!r}: use letters, digits, '_', '-' and '.', "
                         "starting with a letter or digit (no paths)")
    return name


def _check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not _SHA_RE.fullmatch(sha256):
        raise ValueError(f"invalid content hash {sha256!r}")
    return sha256


_VECTORS: ByteLRU[SteeringVectorSet] | None = None
_VECTORS_LOCK = threading.Lock()


def vector_cache() -> ByteLRU[SteeringVectorSet]:
    """This process's cache of loaded sets, keyed by (root, name, sha256): contents are
    immutable per hash, so entries never go stale; bounded by ``VSTEER_CACHE_BYTES``."""
    global _VECTORS
    with _VECTORS_LOCK:
        if _VECTORS is None:
            _VECTORS = ByteLRU(settings().cache_bytes, lambda vs: tensor_bytes(*vs.vectors.values()))
        return _VECTORS


class VectorRegistry:
    """Named vector sets under one root directory."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise FileNotFoundError(f"vector directory {self.root} does not exist")
        self._lock = threading.RLock()
        self._listing: tuple[int, float, list[str]] | None = None
        self._meta_cache: dict[tuple[str, int], dict[str, Any]] = {}
        self.leases = LeaseKeeper.for_root(self.root / LEASES_DIR)

    # -- paths -----------------------------------------------------------------------
    def path_for(self, name: str) -> Path:
        """The live entry of ``name`` (a symlink or a directory directly under the root)."""
        check_name(name)
        path = self.root / name
        try:
            real = path.resolve()
        except (OSError, RuntimeError):
            raise ValueError(f"vector name {name!r} cannot be resolved") from None
        if real != path and not real.is_relative_to(self.root / VERSIONS_DIR):
            raise ValueError(f"vector name {name!r} resolves outside the vector directory")
        return path

    def version_path(self, name: str, sha256: str) -> Path:
        return self.root / VERSIONS_DIR / check_name(name) / _check_sha(sha256)

    # -- reading ---------------------------------------------------------------------
    def names(self) -> list[str]:
        """The live names, sorted. The listing is cached until the root directory changes
        (adding, replacing or removing an entry renames inside it), at most ``_LISTING_TTL``."""
        try:
            mtime = self.root.stat().st_mtime_ns
        except OSError:
            return []
        now = time.monotonic()
        cached = self._listing
        if cached is not None and cached[0] == mtime and now - cached[1] < _LISTING_TTL:
            return list(cached[2])
        out = []
        for entry in os.scandir(self.root):
            if entry.name.startswith(".") or not NAME_RE.fullmatch(entry.name):
                continue
            try:
                if (Path(entry.path) / METADATA_FILE).is_file():
                    self.path_for(entry.name)
                    out.append(entry.name)
            except (OSError, ValueError):
                continue
        out.sort()
        self._listing = (mtime, now, out)
        return list(out)

    def live_version(self, name: str) -> str | None:
        """The content hash ``name`` points at, read from its symlink alone (no lock, no
        file read: a cache can check it per request). None for anything else (absent, a
        hand-made directory): callers then take the full path."""
        try:
            target = os.readlink(self.root / name)
        except OSError:
            return None
        parts = target.split(os.sep)
        if len(parts) != 3 or parts[0] != VERSIONS_DIR or parts[1] != name or not _SHA_RE.fullmatch(parts[2]):
            return None
        return parts[2]

    def __contains__(self, name: str) -> bool:
        try:
            return (self.path_for(name) / METADATA_FILE).is_file()
        except ValueError:
            return False

    def metadata(self, name: str) -> dict[str, Any]:
        """The live set's ``vsteer.json`` (re-read only when it changes)."""
        path = self.path_for(name)
        meta_file = path / METADATA_FILE
        try:
            st = meta_file.stat()
            real = str(meta_file.resolve())
        except (FileNotFoundError, NotADirectoryError):
            if not self._wait_for_writer():
                raise UnknownVectorError(name, self.names()) from None
            return self._metadata_after_wait(name)
        key = (real, st.st_mtime_ns)
        meta = self._meta_cache.get(key)
        if meta is None:
            meta = read_metadata(path)
            if len(self._meta_cache) > 4096:
                self._meta_cache.clear()
            self._meta_cache[key] = meta
        return meta

    def _metadata_after_wait(self, name: str) -> dict[str, Any]:
        try:
            return read_metadata(self.path_for(name))
        except VectorFileError:
            raise UnknownVectorError(name, self.names()) from None

    def _wait_for_writer(self) -> bool:
        """A name missing right now may be mid-swap (a hand-made directory being taken
        over): wait for any writer once, then look again. False if nobody could write."""
        lock = self.root / LOCK_FILE
        if not lock.exists():
            return False
        try:
            with open(lock, "rb") as fh:
                fcntl.flock(fh, fcntl.LOCK_SH)
                fcntl.flock(fh, fcntl.LOCK_UN)
        except OSError:
            return False
        return True

    def load(self, name: str, *, expect_hidden_size: int | None = None,
             expect_num_layers: int | None = None) -> SteeringVectorSet:
        """Load (and verify) the live set."""
        return self.load_with_hash(name, expect_hidden_size=expect_hidden_size,
                                   expect_num_layers=expect_num_layers)[0]

    def load_with_hash(self, name: str, *, expect_hidden_size: int | None = None,
                       expect_num_layers: int | None = None,
                       sha256: str | None = None) -> tuple[SteeringVectorSet, str]:
        """The set and the sha256 of exactly the tensors returned: the live set, or with
        ``sha256`` that exact content (live or kept), else ``VersionGoneError``."""
        if sha256 is None:
            sha256 = self.metadata(name)["sha256"]
        vs = self._load_version(name, _check_sha(sha256))
        shape = {"hidden_size": vs.hidden_size, "num_layers": vs.num_layers, "layers": vs.layers}
        check_compatible(shape, name, expect_hidden_size=expect_hidden_size, expect_num_layers=expect_num_layers)
        return vs, sha256

    def _load_version(self, name: str, sha256: str) -> SteeringVectorSet:
        key = (str(self.root), name, sha256)
        cache = vector_cache()
        vs = cache.get(key)
        if vs is not None:
            return vs
        for path in (self.version_path(name, sha256), self.path_for(name)):
            try:
                if read_metadata(path)["sha256"] != sha256:
                    continue
                vs = load_vector_set(path)
            except VectorFileError:  # absent, or replaced while we read it
                continue
            if set_sha256(vs) == sha256:  # the live directory may change under us
                return cache.put(key, vs)
        if name not in self and not self.version_path(name, sha256).parent.is_dir():
            raise UnknownVectorError(name, self.names())
        raise VersionGoneError(f"{name}: version {sha256[:12]} is neither current nor kept any more")

    # -- writing ---------------------------------------------------------------------
    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        """Exclusive across threads, processes and (on a shared volume) hosts."""
        with self._lock:
            with open(self.root / LOCK_FILE, "a+b") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX)
                try:
                    self._remove_temps()
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)

    def _remove_temps(self) -> None:
        """Under the lock no write is in progress: any temporary entry is a crash's leftover."""
        for entry in os.scandir(self.root):
            if entry.name.startswith(TEMP_PREFIX):
                _remove(Path(entry.path))
        versions = self.root / VERSIONS_DIR
        if versions.is_dir():
            for tmp in versions.glob(f"*/{TEMP_PREFIX}*"):
                _remove(tmp)

    def _temp(self, parent: Path) -> Path:
        return parent / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"

    def _write_version(self, name: str, vs: SteeringVectorSet) -> str:
        """Write ``vs`` as an immutable version directory (if new); returns its hash."""
        sha = set_sha256(vs)
        dest = self.version_path(name, sha)
        if (dest / METADATA_FILE).is_file():
            return sha
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._temp(dest.parent)
        try:
            save_vector_set(vs, tmp)
            if dest.exists():  # a leftover without metadata: replace it
                _remove(dest)
            os.rename(tmp, dest)
        except BaseException:
            _remove(tmp)
            raise
        return sha

    def _retire(self, name: str, sha: str | None) -> None:
        if sha is None:
            return
        with contextlib.suppress(OSError):
            (self.version_path(name, sha) / RETIRED_MARK).touch()

    def _live_sha(self, name: str) -> str | None:
        try:
            return read_metadata(self.path_for(name))["sha256"]
        except (VectorFileError, ValueError):
            return None

    def _adopt_plain_directory(self, name: str) -> str | None:
        """Move a hand-made live directory into the versions area (keeping its content
        for requests that pinned it); returns its hash."""
        live = self.root / name
        sha = self._live_sha(name)
        if sha is None:
            raise FileExistsError(f"{name!r} is a directory that holds no vector set; move it away first")
        dest = self.version_path(name, sha)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            trash = self._temp(self.root)
            os.rename(live, trash)
            _remove(trash)
        else:
            os.rename(live, dest)
        return sha

    def _point(self, name: str, sha: str) -> None:
        """Make ``name`` point at version ``sha`` with one atomic rename."""
        link = self._temp(self.root)
        os.symlink(os.path.join(VERSIONS_DIR, name, sha), link)
        try:
            os.replace(link, self.root / name)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(link)
            raise

    def add(self, name: str, vs: SteeringVectorSet, *, overwrite: bool = False) -> Path:
        """Add (or with ``overwrite`` replace) a named set; atomic for every reader."""
        path = self.path_for(name)
        with self.write_lock():
            exists = (path / METADATA_FILE).is_file() or path.is_symlink()
            if exists and not overwrite:
                raise FileExistsError(f"{name!r} already holds a vector set (pass overwrite=True to replace it)")
            sha = self._write_version(name, vs)
            old = self._live_sha(name) if exists else None
            if path.exists() and not path.is_symlink():
                old = self._adopt_plain_directory(name)
            self._point(name, sha)
            if old != sha:
                self._retire(name, old)
            with contextlib.suppress(OSError):
                (self.version_path(name, sha) / RETIRED_MARK).unlink()
            self.prune_versions()
        self._listing = None
        return path

    def remove(self, name: str) -> None:
        path = self.path_for(name)
        with self.write_lock():
            if not (path / METADATA_FILE).is_file():
                if path.is_symlink():  # dangling: its version is gone already
                    path.unlink()
                raise UnknownVectorError(name, self.names())
            if path.is_symlink():
                sha = self._live_sha(name)
                path.unlink()
            else:
                sha = self._adopt_plain_directory(name)
            self._retire(name, sha)
            self.prune_versions()
        self._listing = None

    def prune_versions(self) -> int:
        """Delete versions that are neither live nor leased, retired for longer than the
        grace period. Call with the write lock held; returns how many were deleted."""
        base = self.root / VERSIONS_DIR
        if not base.is_dir():
            return 0
        grace = settings().lease_grace_s
        cutoff = time.time() - grace
        removed = 0
        for name_dir in list(base.iterdir()):
            if not name_dir.is_dir() or not NAME_RE.fullmatch(name_dir.name):
                continue
            live = self._live_sha(name_dir.name) if (self.root / name_dir.name).is_symlink() else None
            for version in list(name_dir.iterdir()):
                if version.name == live or not _SHA_RE.fullmatch(version.name):
                    continue
                retired = version / RETIRED_MARK
                try:
                    since = (retired if retired.exists() else version).stat().st_mtime
                except FileNotFoundError:
                    continue
                if since > cutoff or self.leases.is_leased(name_dir.name, version.name, grace):
                    continue
                _remove(version)
                removed += 1
            with contextlib.suppress(OSError):
                name_dir.rmdir()  # only when empty
        self.leases.prune(grace)
        return removed


def _remove(path: Path) -> None:
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
