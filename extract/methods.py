"""Extraction methods: how one layer's accumulated activations become a vector.

A method is a function ``LayerStats -> tensor [dim]`` in ``METHODS``. Statistics are
running float64 sums, so memory does not grow with the dataset; a method that needs
every pair's difference (PCA) says so with ``keeps_differences=True`` and then costs
O(n_pairs x hidden_size) memory per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch


@dataclass
class LayerStats:
    """Running statistics of one layer's positive and negative activations."""

    keep_differences: bool = False
    sum_pos: torch.Tensor | None = None   # float64 [dim]
    sum_neg: torch.Tensor | None = None
    count: int = 0
    norm_sum: float = 0.0                 # residual-stream norms of all captured texts
    norm_count: int = 0
    stream_norm_sum: float = 0.0          # token norms over all real tokens but each text's first
    stream_norm_count: float = 0.0
    differences: list[torch.Tensor] = field(default_factory=list)  # float32 [pairs, dim] chunks

    def add(self, positive: torch.Tensor, negative: torch.Tensor) -> None:
        """Fold in one batch: ``positive``/``negative`` are [pairs, dim] for the same pairs."""
        if positive.shape != negative.shape:
            raise ValueError(f"positive {tuple(positive.shape)} and negative {tuple(negative.shape)} differ")
        # MPS has no float64: sums live on the CPU there (one small copy per batch).
        device = positive.device if positive.device.type != "mps" else torch.device("cpu")
        pos = positive.to(device=device, dtype=torch.float64)
        neg = negative.to(device=device, dtype=torch.float64)
        if self.sum_pos is None:
            self.sum_pos = torch.zeros(pos.shape[-1], dtype=torch.float64, device=device)
            self.sum_neg = torch.zeros_like(self.sum_pos)
        self.sum_pos += pos.sum(dim=0)
        self.sum_neg += neg.sum(dim=0)
        self.count += pos.shape[0]
        if self.keep_differences:
            self.differences.append((pos - neg).to("cpu", torch.float32))

    def add_norms(self, norms: torch.Tensor) -> None:
        self.norm_sum += float(norms.double().sum())
        self.norm_count += int(norms.numel())

    @property
    def mean_pos(self) -> torch.Tensor:
        self._check()
        return self.sum_pos / self.count

    @property
    def mean_neg(self) -> torch.Tensor:
        self._check()
        return self.sum_neg / self.count

    @property
    def mean_difference(self) -> torch.Tensor:
        return self.mean_pos - self.mean_neg

    def add_stream_norms(self, sums: torch.Tensor, counts: torch.Tensor) -> None:
        self.stream_norm_sum += float(sums.sum())
        self.stream_norm_count += float(counts.sum())

    @property
    def mean_stream_norm(self) -> float:
        """Mean residual-stream norm per token: the unit of ``unit: relative`` strengths."""
        return self.stream_norm_sum / self.stream_norm_count if self.stream_norm_count else float("nan")

    @property
    def mean_norm(self) -> float:
        return self.norm_sum / self.norm_count if self.norm_count else float("nan")

    def difference_matrix(self) -> torch.Tensor:
        """All per-pair differences, [pairs, dim] float64 (needs ``keep_differences``)."""
        if not self.keep_differences:
            raise RuntimeError("these statistics were collected without per-pair differences")
        self._check()
        return torch.cat(self.differences).double()

    def _check(self) -> None:
        if self.count == 0 or self.sum_pos is None:
            raise ValueError("no activations were collected for this layer")


@dataclass(frozen=True)
class Method:
    name: str
    fn: Callable[[LayerStats], torch.Tensor]
    keeps_differences: bool = False
    description: str = ""


METHODS: dict[str, Method] = {}


def register_method(name: str, *, keeps_differences: bool = False, description: str = ""):
    """Decorator adding ``fn(stats) -> vector`` to ``METHODS`` under ``name``."""
    def wrap(fn: Callable[[LayerStats], torch.Tensor]) -> Callable[[LayerStats], torch.Tensor]:
        METHODS[name] = Method(name, fn, keeps_differences, description or (fn.__doc__ or "").strip())
        return fn
    return wrap


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown extraction method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


@register_method("caa")
def caa_vector(stats: LayerStats) -> torch.Tensor:
    """Contrastive activation addition: mean(positive) - mean(negative)."""
    return stats.mean_difference


@register_method("pca", keeps_differences=True)
def pca_vector(stats: LayerStats) -> torch.Tensor:
    """First principal direction of the uncentered per-pair differences (unit norm), signed
    to agree with the mean difference. Uncentered, because the shared offset of the
    differences is the behaviour direction itself; centering would remove it."""
    diffs = stats.difference_matrix()
    _, _, vh = torch.linalg.svd(diffs, full_matrices=False)
    direction = vh[0]
    if torch.dot(direction, stats.mean_difference.to(direction)) < 0:
        direction = -direction
    return direction / direction.norm().clamp_min(1e-12)
