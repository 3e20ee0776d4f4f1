"""ByteLRU (engine/cache.py, on cachetools): bounded by bytes, least recently used out
first, an over-budget value never kept (nor a stale one left under its key), thread-safe."""

from __future__ import annotations

import threading

from vsteer.engine.cache import ByteLRU


def test_bytes_bound_and_recency():
    c: ByteLRU[str] = ByteLRU(10, len)
    c.put("a", "xxxx")
    c.put("b", "xxxx")
    assert c.get("a") == "xxxx"  # a is now the most recent: b goes first
    c.put("c", "xxxx")
    assert (c.get("a"), c.get("b"), c.get("c")) == ("xxxx", None, "xxxx") and c.nbytes == 8 and len(c) == 2


def test_over_budget_values_are_returned_not_kept():
    c: ByteLRU[str] = ByteLRU(10, len)
    c.put("a", "xxxx")
    assert c.put("a", "x" * 11) == "x" * 11
    assert c.get("a") is None and c.nbytes == 0  # the old value is gone too: never a stale hit
    z: ByteLRU[str] = ByteLRU(0, len)  # VSTEER_CACHE_BYTES=0: nothing is cached, even empty values
    z.put("k", "")
    assert len(z) == 0


def test_concurrent_use_keeps_the_bound():
    c: ByteLRU[bytes] = ByteLRU(1000, len)

    def work(t: int) -> None:
        for i in range(2000):
            c.put((t, i % 50), b"x" * (i % 40 + 1))
            c.get((t, (i * 7) % 50))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert 0 < c.nbytes <= 1000
