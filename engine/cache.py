"""A least-recently-used cache bounded by bytes, not entries.

Vectors are large and their sizes vary by orders of magnitude (hidden 576 x 4 layers vs
hidden 8192 x 80 layers), so a count bound says nothing about memory. Every API server
and every vLLM worker keeps one of these per kind of entry (``VSTEER_CACHE_BYTES`` each).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable, Generic, Hashable, TypeVar

import torch

V = TypeVar("V")


def tensor_bytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


class ByteLRU(Generic[V]):
    """Thread-safe LRU of at most ``budget`` bytes (``size(value)`` each). An entry larger
    than the whole budget is not kept (the caller still gets its value)."""

    def __init__(self, budget: int, size: Callable[[V], int]):
        self.budget, self._size = int(budget), size
        self._items: OrderedDict[Hashable, tuple[V, int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> V | None:
        with self._lock:
            hit = self._items.get(key)
            if hit is None:
                return None
            self._items.move_to_end(key)
            return hit[0]

    def put(self, key: Hashable, value: V) -> V:
        nbytes = max(int(self._size(value)), 1)
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]
            if nbytes <= self.budget:
                self._items[key] = (value, nbytes)
                self._bytes += nbytes
                while self._bytes > self.budget:
                    _, (_, n) = self._items.popitem(last=False)
                    self._bytes -= n
        return value

    def pop(self, key: Hashable) -> None:
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self._bytes -= old[1]

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
            self._bytes = 0

    @property
    def nbytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._items)
