"""Leases on vector versions: a replaced or removed version stays on disk while any
accepted request still pins it.

A request is validated (and its vectors pinned to content hashes) in an API-server
process; the vLLM workers load the pinned content later. Between the two, the set may be
overwritten or deleted, by this process or another replica on the same volume. Each
process that accepts requests holds a lease file per pinned version::

    <root>/.leases/<name>/<sha256>/<holder>      (holder: host-pid-random)

touched every ``grace / 4`` seconds while any of its requests pins that version, and
left to expire ``grace`` seconds after the last one finished. The registry prunes a
retired version only when no lease file on it is younger than ``grace``. A process that
dies stops touching its files, so its leases expire on their own.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import socket
import threading
import time
import uuid
from pathlib import Path

logger = logging.getLogger("vllm.vsteer")
_SAFE = re.compile(r"[^A-Za-z0-9_.-]")


class LeaseKeeper:
    """Reference-counted leases of this process under one ``.leases`` directory."""

    _by_dir: dict[Path, "LeaseKeeper"] = {}
    _class_lock = threading.Lock()

    def __init__(self, directory: Path):
        self.directory = directory
        self.pid = os.getpid()
        self.holder = _SAFE.sub("_", f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        self._counts: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._warned = False

    @classmethod
    def for_root(cls, directory: Path) -> "LeaseKeeper":
        """One keeper per leases directory per process (shared by every registry on it)."""
        with cls._class_lock:
            keeper = cls._by_dir.get(directory)
            if keeper is None or keeper.pid != os.getpid():
                keeper = cls._by_dir[directory] = cls(directory)  # new after a fork
            return keeper

    def _file(self, name: str, sha256: str) -> Path:
        return self.directory / name / sha256 / self.holder

    def acquire(self, name: str, sha256: str) -> None:
        with self._lock:
            n = self._counts.get((name, sha256), 0)
            self._counts[(name, sha256)] = n + 1
        if n == 0:
            self._touch(name, sha256)
            self._start_heartbeat()

    def release(self, name: str, sha256: str) -> None:
        with self._lock:
            n = self._counts.get((name, sha256), 0)
            if n <= 1:
                self._counts.pop((name, sha256), None)
            else:
                self._counts[(name, sha256)] = n - 1
        if n == 1:
            self._touch(name, sha256)  # the grace period runs from now

    def held(self) -> dict[tuple[str, str], int]:
        with self._lock:
            return dict(self._counts)

    def _touch(self, name: str, sha256: str) -> None:
        path = self._file(name, sha256)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.touch()
        except OSError as e:  # a read-only volume: the grace period alone protects versions
            if not self._warned:
                logger.warning("vsteer: cannot write lease files under %s (%s); replaced vector versions are "
                               "kept only for the grace period", self.directory, e)
                self._warned = True

    def _start_heartbeat(self) -> None:
        with self._lock:
            if self._thread is not None and self._thread.is_alive():
                return
            self._thread = threading.Thread(target=self._heartbeat, name="vsteer-leases", daemon=True)
            self._thread.start()

    def _heartbeat(self) -> None:
        from .settings import settings

        while True:
            time.sleep(max(settings().lease_grace_s / 4, 0.05))
            for name, sha in self.held():
                self._touch(name, sha)

    def is_leased(self, name: str, sha256: str, grace: float) -> bool:
        """Any holder (any process, any host) touched a lease on this version recently."""
        if (name, sha256) in self.held():
            return True
        cutoff = time.time() - grace
        try:
            return any(f.stat().st_mtime > cutoff for f in (self.directory / name / sha256).iterdir())
        except FileNotFoundError:
            return False

    def prune(self, grace: float) -> None:
        """Delete lease files nobody touched for ``grace`` (their holders are gone or done)."""
        if not self.directory.is_dir():
            return
        cutoff = time.time() - grace
        held = self.held()
        for f in self.directory.glob("*/*/*"):
            name, sha = f.parent.parent.name, f.parent.name
            with contextlib.suppress(OSError):
                if (name, sha) not in held and f.stat().st_mtime < cutoff:
                    f.unlink()
        for d in list(self.directory.glob("*/*")) + list(self.directory.glob("*")):
            with contextlib.suppress(OSError):
                d.rmdir()
