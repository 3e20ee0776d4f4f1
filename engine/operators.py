"""Steering operators: what a vector does to the residual stream. The one definition.

With ``h`` the residual stream after decoder block L (one token), ``v`` a request's vector
for L, ``u = v / |v|`` and ``s`` its strength:

* ``add``: ``h + s v``.
* ``ablate``: ``h - (h.u) u``, the direction removed. Takes no strength (it must be 1).
  Several ablated directions of one request are removed together: they are
  orthonormalised first (Gram-Schmidt, in request order), so the result is the
  projection onto the orthogonal complement of their span.
* ``clamp``: ``h + (c - h.u) u``: the projection on ``u`` set to ``c = s |v|`` (so ``s = 1``
  pins it to the vector's own length), or ``c = s n_L`` with ``"unit": "relative"``.
* ``add`` with ``"norm": "preserve"``: after the operators of this layer, each token is
  rescaled to the norm it had before them: ``h' |h| / |h'|``.

Within one request and layer the operators apply in a fixed order: ablate, clamp (each
clamped direction in request order), then add (the sum of every added vector), then the
norm rescale. Requests in one batch may use any mix.

``"unit": "relative"`` reads a strength as a fraction of the layer's mean residual-stream
norm ``n_L`` (recorded at extraction, ``residual_norms`` in vsteer.json): for ``add`` the
added vector has norm ``s n_L``, for ``clamp`` the pinned projection is ``s n_L``.

``LayerPlan`` is what a request does at one layer; ``apply_plan`` is its math, used as is
by the HF injectors and (per token, with gathered table rows) by the vLLM op.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Op = Literal["add", "ablate", "clamp"]
Unit = Literal["raw", "relative"]
Norm = Literal["keep", "preserve"]


@dataclass(frozen=True)
class Operator:
    name: str
    doc: str
    takes_strength: bool
    projects: bool
    """Sets a projection (ablate, clamp): needs a direction slot in the vLLM tables."""


OPERATORS: dict[str, Operator] = {o.name: o for o in (
    Operator("add", "h + s*v (with norm=preserve: rescaled to |h| afterwards)", True, False),
    Operator("ablate", "h - (h.u) u: remove the direction (strength must be 1)", False, True),
    Operator("clamp", "h + (c - h.u) u with c = s*|v| (raw) or s*n_L (relative): pin the projection", True, True),
)}
OPS: tuple[str, ...] = tuple(OPERATORS)
UNITS: tuple[str, ...] = ("raw", "relative")
NORMS: tuple[str, ...] = ("keep", "preserve")
ORDER = "ablate, clamp, add, norm"


@dataclass(frozen=True)
class LayerPlan:
    """What one request does at one layer, in application order.

    ``directions`` [k, hidden] are unit vectors whose projections are set to ``targets``
    [k] one after another (ablated directions come first, orthonormalised, with target
    0); ``add`` [hidden] is the summed added vector; ``preserve_norm`` rescales each
    token to its norm before this layer's operators."""

    add: torch.Tensor | None = None
    directions: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    preserve_norm: bool = False

    @property
    def num_directions(self) -> int:
        return 0 if self.directions is None else int(self.directions.shape[0])

    @property
    def is_add_only(self) -> bool:
        return self.num_directions == 0 and not self.preserve_norm


def orthonormalize(vectors: list[torch.Tensor], *, eps: float = 1e-6) -> list[torch.Tensor]:
    """Gram-Schmidt in float64, in order; a vector (nearly) inside the span of the earlier
    ones adds nothing and is dropped."""
    basis: list[torch.Tensor] = []
    for v in vectors:
        w = v.double().clone()
        for b in basis:
            w -= (w @ b) * b
        n = w.norm()
        if n > eps * max(float(v.double().norm()), 1e-30):
            basis.append(w / n)
    return [b.float() for b in basis]


def set_projections(h: torch.Tensor, directions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``h`` with its projection on each direction set to its target, one after another.

    ``h`` [..., H]; ``directions`` [K, H] or [..., K, H]; ``targets`` [K] or [..., K].
    Computed in float32 (the dot products of bf16 states need it); a zero direction with
    target 0 is an exact no-op, so unused table slots change nothing."""
    x = h.float()
    for k in range(directions.shape[-2]):
        u = directions[..., k, :].float()
        p = (x * u).sum(dim=-1, keepdim=True)
        x = x + (targets[..., k:k + 1].float() - p) * u
    return x.to(h.dtype)


def rescale_to(h: torch.Tensor, reference_norm: torch.Tensor, enabled: torch.Tensor | bool) -> torch.Tensor:
    """``h * reference_norm / |h|`` where ``enabled`` (per token), else ``h`` unchanged."""
    x = h.float()
    scale = reference_norm / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if isinstance(enabled, bool):
        return (x * scale).to(h.dtype) if enabled else h
    scale = torch.where(enabled.unsqueeze(-1), scale, torch.ones_like(scale))
    return (x * scale).to(h.dtype)


def apply_plan(h: torch.Tensor, plan: LayerPlan) -> torch.Tensor:
    """One request's operators at one layer, for every token of ``h`` [..., H] (HF path)."""
    reference = h.float().norm(dim=-1, keepdim=True) if plan.preserve_norm else None
    if plan.num_directions:
        h = set_projections(h, plan.directions.to(h.device), plan.targets.to(h.device))
    if plan.add is not None:
        h = h + plan.add.to(device=h.device, dtype=h.dtype)
    if reference is not None:
        h = rescale_to(h, reference, True)
    return h
