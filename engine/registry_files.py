"""The registry's on-disk conventions (``vsteer.engine.registry``): the layout's names,
the syntax of vector names and content hashes, taking the lock with a deadline, and
deleting a directory so that it disappears at once.

Several processes and hosts share one registry directory, so everything here assumes
another writer may act between any two system calls.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

from .errors import RegistryBusyError

NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$"
NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
VERSIONS_DIR = ".versions"   # never a valid name: names start with a letter or digit
LEASES_DIR = ".leases"
LOCK_FILE = ".lock"
TEMP_PREFIX = ".tmp-"        # under the lock, any entry named so is a crashed writer's leftover
ADOPT_PREFIX = TEMP_PREFIX + "adopt-"
"""``.tmp-adopt-<name>``: a writer is moving the hand-made directory ``<name>/`` into the
versions area, so the name is missing for a moment (readers wait only then)."""
RETIRED_MARK = ".retired"    # in a version directory: when it stopped being current
SHA_RE = re.compile(r"[0-9a-f]{64}")


def check_name(name: str) -> str:
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or ".." in name:
        raise ValueError(f"invalid vector name {name!r}: use letters, digits, '_', '-' and '.', "
                         "starting with a letter or digit (no paths)")
    return name


def check_sha(sha256: str) -> str:
    if not isinstance(sha256, str) or not SHA_RE.fullmatch(sha256):
        raise ValueError(f"invalid content hash {sha256!r}")
    return sha256


def flock_within(fh: Any, mode: int, timeout: float) -> None:
    """``flock(mode)`` within ``timeout`` seconds, else ``RegistryBusyError``: non-blocking
    tries with short sleeps. A blocking ``flock`` cannot be given up, and would hold its
    thread for as long as another process (maybe on another host) keeps the lock."""
    deadline = time.monotonic() + timeout
    delay = 0.001
    while True:
        try:
            fcntl.flock(fh, mode | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pass
        left = deadline - time.monotonic()
        if left <= 0:
            raise RegistryBusyError(f"the vector registry stayed locked by a writer for {timeout:g} s "
                                    "(VSTEER_REGISTRY_LOCK_TIMEOUT_S); nothing was changed, retry later")
        time.sleep(min(delay, left))
        delay = min(delay * 2, 0.02)


def remove_path(path: Path, trash: Path | None = None) -> None:
    """Delete ``path`` (gone already is fine). With ``trash``, a temporary name beside it,
    a directory is renamed first: it disappears at once, and a crash mid-delete leaves a
    temporary entry (removed by the next writer), never half a version."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        else:
            if trash is not None:
                os.rename(path, trash)
                path = trash
            shutil.rmtree(path)
    except FileNotFoundError:
        pass
    except OSError as e:
        if e.errno != errno.ENOENT:
            raise
