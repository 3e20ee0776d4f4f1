"""Which old versions of a registry's sets may be deleted (``VectorRegistry.prune_versions``).

A version directory is deleted only when all of these hold: the live link does not name
it (nor the live metadata's hash), it was retired (or, never live, written) longer ago
than ``VSTEER_LEASE_GRACE_S``, no process holds a fresh lease on it, and its content still
hashes to its name. The last rule keeps data someone wrote into a version directory by
hand (``vsteer extract --out <root>/<name>`` follows the live link): such a directory is
kept, with a warning, for the operator to move away.
"""

from __future__ import annotations

import contextlib
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import VectorFileError
from .formats import load_vector_set, read_metadata, set_sha256
from .registry_files import NAME_RE, RETIRED_MARK, SHA_RE, VERSIONS_DIR, remove_path
from .settings import settings

if TYPE_CHECKING:
    from .registry import VectorRegistry

logger = logging.getLogger("vllm.vsteer")


def prune_versions(reg: "VectorRegistry") -> int:
    """Delete the versions nothing needs any more (call with the write lock held)."""
    base = reg.root / VERSIONS_DIR
    if not base.is_dir():
        return 0
    grace = settings().lease_grace_s
    cutoff = time.time() - grace
    removed = 0
    for name_dir in list(base.iterdir()):
        if not name_dir.is_dir() or not NAME_RE.fullmatch(name_dir.name):
            continue
        live = {reg.live_version(name_dir.name), reg.live_sha(name_dir.name)}
        for version in list(name_dir.iterdir()):
            if version.name in live or not SHA_RE.fullmatch(version.name):
                continue
            retired = version / RETIRED_MARK
            try:
                since = (retired if retired.exists() else version).stat().st_mtime
            except FileNotFoundError:
                continue
            if since > cutoff or reg.leases.is_leased(name_dir.name, version.name, grace):
                continue
            if not _hashes_to_its_name(version, reg.untrusted):
                continue
            remove_path(version, reg.temp_path(name_dir))
            removed += 1
        with contextlib.suppress(OSError):
            name_dir.rmdir()  # only when empty
    reg.leases.prune(grace)
    return removed


def prune_after_write(reg: "VectorRegistry") -> None:
    """Prune after a write that has happened: a failure (a version that cannot be deleted)
    is logged, never reported as a failed write, and the next write tries again."""
    try:
        prune_versions(reg)
    except OSError as e:
        logger.warning("vsteer: could not delete old vector versions under %s (%s); the next write tries again",
                       reg.root, e)


def _hashes_to_its_name(version: Path, untrusted: dict[Path, tuple]) -> bool:
    """The recorded hash and the tensors' hash both equal the directory's name. A directory
    found changed is not read again until its files change (``untrusted``: their stat)."""
    try:
        stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in sorted(version.iterdir()))
    except OSError:
        return False
    if untrusted.get(version) == stamp:
        return False
    try:
        if read_metadata(version)["sha256"] == version.name and set_sha256(load_vector_set(version)) == version.name:
            untrusted.pop(version, None)
            return True
    except (VectorFileError, OSError, ValueError, KeyError):
        pass
    if version not in untrusted:
        logger.warning("vsteer: %s was changed after vsteer wrote it (its content no longer hashes to its name); "
                       "it is kept: move it away once nothing needs it", version)
    untrusted[version] = stamp
    return False
