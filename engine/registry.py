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
    .tmp-adopt-<name>                      while a writer moves a hand-made ``<name>/`` into
                                           ``.versions`` (the name is briefly missing)

Writers take the lock, write a new version directory under a unique temporary name,
rename it into place, then swap the live symlink with one ``rename``: a crash at any
point leaves the old set or the new one, never half of either. A replaced or removed
version stays on disk while any accepted request pins it (``LeaseKeeper``) and for
``VSTEER_LEASE_GRACE_S`` after; only then does a later write prune it, and only if its
content still hashes to its directory's name (a directory written into by hand is kept).

Nobody waits on the lock for long: readers never need it but for the rare moment a
hand-made directory is taken over, and every wait (readers' and writers') gives up after
``VSTEER_REGISTRY_LOCK_TIMEOUT_S`` with ``RegistryBusyError``. A read that races a delete
or an overwrite looks again: a name that went away is unknown, never a broken file.

Names are plain identifiers that never reach outside the root (symlinks resolved, checked).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from .cache import ByteLRU, tensor_bytes
from .errors import RegistryBusyError, UnknownVectorError, VectorFileError, VersionGoneError
from .formats import METADATA_FILE, check_compatible, load_vector_set, read_metadata, save_vector_set, set_sha256
from .leases import LeaseKeeper
from .registry_prune import prune_after_write, prune_versions
from .registry_files import (
    ADOPT_PREFIX,
    LEASES_DIR,
    LOCK_FILE,
    NAME_PATTERN,
    NAME_RE,
    RETIRED_MARK,
    SHA_RE,
    TEMP_PREFIX,
    VERSIONS_DIR,
    check_name,
    check_sha,
    flock_within,
    remove_path,
)
from .settings import settings
from .vectors import SteeringVectorSet

_LISTING_TTL = 2.0           # seconds a cached listing is trusted without a root change
_LIVE_TRIES = 3              # a read that raced a writer looks again this often


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
        self.untrusted: dict[Path, tuple] = {}  # version directories found changed by hand (and their stat)

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
        return self.root / VERSIONS_DIR / check_name(name) / check_sha(sha256)

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
        file read: a cache can check it per request; what is live is the link, not metadata
        someone may have rewritten). None for anything else (absent, a hand-made directory)."""
        try:
            target = os.readlink(self.root / name)
        except OSError:
            return None
        parts = target.split(os.sep)
        if len(parts) != 3 or parts[0] != VERSIONS_DIR or parts[1] != name or not SHA_RE.fullmatch(parts[2]):
            return None
        return parts[2]

    def __contains__(self, name: str) -> bool:
        try:
            return (self.path_for(name) / METADATA_FILE).is_file()
        except ValueError:
            return False

    def metadata(self, name: str) -> dict[str, Any]:
        """The live set's ``vsteer.json`` (re-read only when it changes)."""
        return self._live(name)[1]

    def _live(self, name: str) -> tuple[Path, dict[str, Any]]:
        """The live set's directory (a version directory, or a hand-made one) and its metadata,
        read from that directory, never again through the name: a writer may swap the name
        at any moment. A name that is missing, or that went away while we read, is unknown."""
        path = self.path_for(name)
        for _ in range(_LIVE_TRIES):
            try:
                real = (path / METADATA_FILE).resolve(strict=True)
                st = real.stat()
            except (FileNotFoundError, NotADirectoryError):
                if self._appeared_after_swap(name):
                    continue
                raise UnknownVectorError(name) from None
            if not real.is_relative_to(self.root):  # a hand-made set's vsteer.json linking out
                raise VectorFileError(f"{name}: {METADATA_FILE} resolves outside the vector directory")
            key = (str(real), st.st_mtime_ns)
            meta = self._meta_cache.get(key)
            if meta is None:
                try:
                    meta = read_metadata(real.parent)
                except VectorFileError:
                    if real.is_file():  # still there: the file itself is broken
                        raise
                    continue  # removed or moved while we read it: look again
                if len(self._meta_cache) > 4096:
                    self._meta_cache.clear()
                self._meta_cache[key] = meta
            return real.parent, meta
        if (path / METADATA_FILE).is_file():  # changing under us all the time: report it as busy
            raise RegistryBusyError(f"vector set {name!r} kept changing while it was read")
        raise UnknownVectorError(name)

    def _appeared_after_swap(self, name: str) -> bool:
        """``name`` was missing: look again? Only a writer taking over a hand-made directory
        makes a live name briefly missing, and it marks that (``ADOPT_PREFIX``): without the
        mark, one more look (the swap may have just ended); with it, wait for the writer
        (bounded by ``VSTEER_REGISTRY_LOCK_TIMEOUT_S``) first."""
        if (self.root / (ADOPT_PREFIX + name)).exists():
            with contextlib.suppress(FileNotFoundError), open(self.root / LOCK_FILE, "rb") as fh:
                flock_within(fh, fcntl.LOCK_SH, settings().registry_lock_timeout_s)
                fcntl.flock(fh, fcntl.LOCK_UN)
        return (self.root / name / METADATA_FILE).is_file()

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
            vs, sha256 = self._load_live(name)
        else:
            vs = self._load_version(name, check_sha(sha256))
        shape = {"hidden_size": vs.hidden_size, "num_layers": vs.num_layers, "layers": vs.layers}
        check_compatible(shape, name, expect_hidden_size=expect_hidden_size, expect_num_layers=expect_num_layers)
        return vs, sha256

    def _load_live(self, name: str) -> tuple[SteeringVectorSet, str]:
        """The live set and its hash. Its directory is read once resolved; if it fails and
        the name meanwhile points elsewhere (or nowhere), that was a writer: look again."""
        for _ in range(_LIVE_TRIES):
            directory, meta = self._live(name)
            sha = meta["sha256"]
            if not isinstance(sha, str) or not SHA_RE.fullmatch(sha):
                raise VectorFileError(f"{directory}: metadata holds no valid sha256")
            key = (str(self.root), name, sha)
            cache = vector_cache()
            vs = cache.get(key)
            if vs is not None:
                return vs, sha
            try:
                vs = load_vector_set(directory)
            except VectorFileError:
                if (directory / METADATA_FILE).is_file() and self._points_at(name, directory):
                    raise  # still the live set: it is broken
                continue
            if set_sha256(vs) == sha:
                return cache.put(key, vs), sha
            if self._points_at(name, directory):
                raise VectorFileError(f"{directory}: content hash mismatch (changed after its metadata)")
        raise RegistryBusyError(f"vector set {name!r} kept changing while it was read")

    def _points_at(self, name: str, directory: Path) -> bool:
        try:
            return (self.root / name).resolve(strict=True) == directory
        except (OSError, RuntimeError):
            return False

    def _load_version(self, name: str, sha256: str) -> SteeringVectorSet:
        key = (str(self.root), name, sha256)
        cache = vector_cache()
        vs = cache.get(key)
        if vs is not None:
            return vs
        for path in (self.version_path(name, sha256), self.path_for(name)):
            try:
                real = path.resolve(strict=True)  # read one directory, not a name that may move
                if read_metadata(real)["sha256"] != sha256:
                    continue
                vs = load_vector_set(real)
            except (VectorFileError, OSError, RuntimeError):  # absent, or replaced while we read it
                continue
            if set_sha256(vs) == sha256:
                return cache.put(key, vs)
        if name not in self and not self.version_path(name, sha256).parent.is_dir():
            raise UnknownVectorError(name)
        raise VersionGoneError(f"{name}: version {sha256[:12]} is neither current nor kept any more")

    # -- writing ---------------------------------------------------------------------
    @contextlib.contextmanager
    def write_lock(self) -> Iterator[None]:
        """Exclusive across threads, processes and (on a shared volume) hosts; waits at most
        ``VSTEER_REGISTRY_LOCK_TIMEOUT_S``, then ``RegistryBusyError`` (nothing changed)."""
        timeout = settings().registry_lock_timeout_s
        deadline = time.monotonic() + timeout
        if not self._lock.acquire(timeout=timeout):
            raise RegistryBusyError(f"the vector registry {self.root} stayed locked (by this process) for "
                                    f"{timeout:g} s (VSTEER_REGISTRY_LOCK_TIMEOUT_S)")
        try:
            with open(self.root / LOCK_FILE, "a+b") as fh:
                flock_within(fh, fcntl.LOCK_EX, max(deadline - time.monotonic(), 0.0))
                try:
                    self._remove_temps()
                    yield
                finally:
                    fcntl.flock(fh, fcntl.LOCK_UN)
        finally:
            self._lock.release()

    def _remove_temps(self) -> None:
        """Under the lock no write is in progress: any temporary entry is a crash's leftover."""
        for entry in os.scandir(self.root):
            if entry.name.startswith(TEMP_PREFIX):
                remove_path(Path(entry.path))
        versions = self.root / VERSIONS_DIR
        if versions.is_dir():
            for tmp in versions.glob(f"*/{TEMP_PREFIX}*"):
                remove_path(tmp)

    def temp_path(self, parent: Path) -> Path:
        return parent / f"{TEMP_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"

    def _write_version(self, name: str, vs: SteeringVectorSet) -> str:
        """Write ``vs`` as an immutable version directory (if new); returns its hash."""
        sha = set_sha256(vs)
        dest = self.version_path(name, sha)
        if (dest / METADATA_FILE).is_file():
            return sha
        made = [d for d in (dest.parent, dest.parent.parent) if not d.is_dir()]
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.temp_path(dest.parent)
        try:
            save_vector_set(vs, tmp)
            if dest.exists():  # a leftover without metadata: replace it
                remove_path(dest)
            os.rename(tmp, dest)
        except BaseException:
            remove_path(tmp)
            for d in made:  # a failed first write leaves no empty .versions/<name>/ (or .versions/)
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        return sha

    def _retire(self, name: str, sha: str | None) -> None:
        if sha is None:
            return
        with contextlib.suppress(OSError):
            (self.version_path(name, sha) / RETIRED_MARK).touch()

    def live_sha(self, name: str) -> str | None:
        try:
            return read_metadata(self.path_for(name))["sha256"]
        except (VectorFileError, ValueError):
            return None

    def _adopt_plain_directory(self, name: str) -> str | None:
        """Move a hand-made live directory into the versions area (keeping its content
        for requests that pinned it); returns its hash. The name is missing from here
        until the caller points it at a version: ``.tmp-adopt-<name>`` tells readers so
        (the caller removes it, or the next writer if we crash)."""
        live = self.root / name
        sha = self.live_sha(name)
        if sha is None:
            raise FileExistsError(f"{name!r} is a directory that holds no vector set; move it away first")
        dest = self.version_path(name, sha)
        dest.parent.mkdir(parents=True, exist_ok=True)
        (self.root / (ADOPT_PREFIX + name)).touch()
        if dest.exists():
            trash = self.temp_path(self.root)
            os.rename(live, trash)
            remove_path(trash)
        else:
            os.rename(live, dest)
        return sha

    def add(self, name: str, vs: SteeringVectorSet, *, overwrite: bool = False) -> Path:
        """Add (or with ``overwrite`` replace) a named set; atomic for every reader."""
        path = self.path_for(name)
        with self.write_lock():
            exists = (path / METADATA_FILE).is_file() or path.is_symlink()
            if exists and not overwrite:
                raise FileExistsError(f"{name!r} already holds a vector set (pass overwrite=True to replace it)")
            sha = self._write_version(name, vs)
            old = (self.live_version(name) if path.is_symlink() else self.live_sha(name)) if exists else None
            link = self.temp_path(self.root)  # made before anything live moves: failing here changes nothing
            os.symlink(os.path.join(VERSIONS_DIR, name, sha), link)
            try:
                if path.exists() and not path.is_symlink():
                    old = self._adopt_plain_directory(name)
                os.replace(link, path)  # the swap: one atomic rename
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(link)
                raise
            with contextlib.suppress(OSError):
                (self.root / (ADOPT_PREFIX + name)).unlink()
            if old != sha:
                self._retire(name, old)
            with contextlib.suppress(OSError):
                (self.version_path(name, sha) / RETIRED_MARK).unlink()
            prune_after_write(self)
        self._listing = None
        return path

    def remove(self, name: str) -> None:
        path = self.path_for(name)
        with self.write_lock():
            if not (path / METADATA_FILE).is_file():
                if path.is_symlink():  # dangling: its version is gone already
                    path.unlink()
                raise UnknownVectorError(name)
            if path.is_symlink():
                sha = self.live_version(name)
                path.unlink()
            elif self.live_sha(name) is None:  # hand-made and unreadable: nothing could pin it
                sha = None
                remove_path(path, self.temp_path(self.root))
            else:
                sha = self._adopt_plain_directory(name)
                with contextlib.suppress(OSError):  # removed: missing is the answer now
                    (self.root / (ADOPT_PREFIX + name)).unlink()
            self._retire(name, sha)
            prune_after_write(self)
        self._listing = None

    def prune_versions(self) -> int:
        """Delete versions that are neither live nor leased, retired for longer than the
        grace period, whose content still hashes to their name. Call with the write lock
        held; returns how many were deleted (``vsteer.engine.registry_prune``)."""
        return prune_versions(self)


__all__ = ["LEASES_DIR", "NAME_PATTERN", "TEMP_PREFIX", "VERSIONS_DIR", "VectorRegistry", "check_name", "vector_cache"]
