"""Registry work of an API server, on threads of its own.

Registry reads (a set's metadata and tensors, listings) touch a volume that may be slow
(NFS) and that writers in other replicas lock. On asyncio's default pool they would queue
with everything else vLLM's server runs there, and a stalled volume would stall it all.
Here reads get a small pool of their own (``VSTEER_REGISTRY_READ_THREADS``) and admin
writes one thread (writes serialise on the registry's lock anyway). Every wait for the
registry's lock is bounded (``VSTEER_REGISTRY_LOCK_TIMEOUT_S``, then ``RegistryBusyError``),
so a stuck writer elsewhere holds a thread here for at most that long.

``run_registry_read`` is what the steering request path awaits to resolve a request's
steering, and what the registry routes await for reads.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from vsteer.engine.settings import settings

T = TypeVar("T")
_pools: dict[str, tuple[int, ThreadPoolExecutor]] = {}
_pools_lock = threading.Lock()


def _pool(kind: str, size: int) -> ThreadPoolExecutor:
    """This process's pool of ``kind`` (a new one after a fork: threads do not survive it)."""
    with _pools_lock:
        hit = _pools.get(kind)
        if hit is None or hit[0] != os.getpid():
            hit = (os.getpid(), ThreadPoolExecutor(max_workers=size, thread_name_prefix=f"vsteer-registry-{kind}"))
            _pools[kind] = hit
        return hit[1]


def read_pool() -> ThreadPoolExecutor:
    return _pool("read", settings().registry_read_threads)


async def _run(pool: ThreadPoolExecutor, fn: Callable[..., T], *args: Any) -> T:
    ctx = contextvars.copy_context()  # like asyncio.to_thread: the request's context variables go along
    return await asyncio.get_running_loop().run_in_executor(pool, functools.partial(ctx.run, fn, *args))


async def run_registry_read(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the registry read pool, awaited."""
    return await _run(read_pool(), fn, *args)


async def run_registry_write(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` on the one admin-write thread, awaited."""
    return await _run(_pool("write", 1), fn, *args)
