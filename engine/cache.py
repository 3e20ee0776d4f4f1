"""A least-recently-used cache bounded by bytes, not entries.

Vectors are large and their sizes vary by orders of magnitude (hidden 576 x 4 layers vs
hidden 8192 x 80 layers), so a count bound says nothing about memory. Every API server
and every vLLM worker keeps one of these per kind of entry (``VSTEER_CACHE_BYTES`` each).
The LRU bookkeeping is ``cachetools.LRUCache`` with a size function; this adds the lock
(``cachetools`` caches are not thread-safe) and keeps an entry larger than the whole
budget out without failing the caller.
"""

from __future__ import annotations

import threading
from typing import Callable, Generic, Hashable, TypeVar

import torch
from cachetools import LRUCache

V = TypeVar("V")


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class ByteLRU(Generic[V]):
    """Thread-safe LRU of at most ``budget`` bytes (``size(value)`` each, at least 1). An
    entry larger than the whole budget is not kept (the caller still gets its value)."""

    def __init__(self, budget: int, size: Callable[[V], int]):
        self.budget = int(budget)
        self._items: LRUCache[Hashable, V] = LRUCache(maxsize=self.budget,
                                                      getsizeof=lambda v: max(int(size(v)), 1))
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            return self._items.get(key)  # a hit becomes the most recently used

    def put(self, key: Hashable, value: V) -> V:
        with self._lock:
            self._items.pop(key, None)
            try:
                self._items[key] = value  # evicts the least recently used to fit
            except ValueError:  # larger than the whole budget
                pass
        return value

    def pop(self, key: Hashable) -> None:
        with self._lock:
            self._items.pop(key, None)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()

    @property
    def nbytes(self) -> int:
        return int(self._items.currsize)

    def __len__(self) -> int:
        return len(self._items)
