"""One steering config in the form a worker's tables hold it.

``ResolvedSteering`` says what a request does (vectors, operators, coefficients);
``PreparedSteering`` is the result per layer, already summed, orthonormalised and cast to
the model's dtype: the added vector, up to K unit directions whose projections are set
(ablate, clamp) with their targets, and the norm flag. Writing a config into a table row
is then a copy.

It is built once per fingerprint, off the engine step: in the engine core's input thread
(``vsteer.serving.admission``, where vLLM itself prepares each request before it is
queued), and travels to the workers inside the request (``extra_args[ROWS_KEY]``), so no
worker decodes, scales or orthonormalises anything while a step waits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np
import torch

from vsteer.engine.positions import POSITION_CODES

if TYPE_CHECKING:  # types only: bench/gpu/ builds configs on machines without pydantic
    from vsteer.engine.operators import LayerPlan
    from vsteer.engine.resolver import ResolvedSteering


@dataclass(frozen=True, eq=False)
class PreparedSteering:
    """Per layer this config touches (``layers``, ascending), the rows of its table entry."""

    fingerprint: str
    positions: str
    layers: np.ndarray
    """[L] int64, ascending."""
    add: torch.Tensor
    """[L, hidden], model dtype; zeros at layers that only project."""
    directions: torch.Tensor | None
    """[L, K, hidden], model dtype; unused directions are zero (the op's exact no-op).
    None when no layer projects (the common add-only config: nothing to copy)."""
    targets: torch.Tensor | None
    """[L, K] float32: the projection each direction is set to (None with ``directions``)."""
    preserve_norm: np.ndarray
    """[L] bool: rescale each token to its norm before this layer's operators."""
    general: np.ndarray
    """[L] bool: the layer needs the op's general path (projections or a norm rescale)."""
    max_projections: int = 0
    """K, the projection slots it was prepared for (the tables must hold as many)."""

    @property
    def projects(self) -> bool:
        return self.directions is not None

    @property
    def position_code(self) -> int:
        return POSITION_CODES[self.positions]

    @property
    def nbytes(self) -> int:
        tensors = sum(t.numel() * t.element_size() for t in (self.add, self.directions, self.targets) if t is not None)
        return tensors + self.preserve_norm.nbytes + self.general.nbytes + self.layers.nbytes

    @classmethod
    def build(cls, resolved: "ResolvedSteering", *, dtype: torch.dtype, max_projections: int) -> "PreparedSteering":
        """Everything the tables need, computed once (the plans' math is ``ResolvedSteering.plans``)."""
        hidden = next(iter(resolved.entries[0].vectors.values())).shape[-1]
        return cls.from_plans(resolved.fingerprint, resolved.positions, resolved.plans(), hidden=hidden, dtype=dtype,
                              max_projections=max_projections)

    @classmethod
    def from_plans(cls, fingerprint: str, positions: str, plans: Mapping[int, "LayerPlan"], *, hidden: int,
                   dtype: torch.dtype, max_projections: int) -> "PreparedSteering":
        layers = sorted(plans)
        n, k = len(layers), max_projections
        add = torch.zeros(n, hidden, dtype=dtype)
        directions = torch.zeros(n, k, hidden, dtype=dtype)
        targets = torch.zeros(n, k, dtype=torch.float32)
        preserve = np.zeros(n, dtype=bool)
        general = np.zeros(n, dtype=bool)
        for i, layer in enumerate(layers):
            plan = plans[layer]
            if plan.add is not None:
                add[i] = plan.add.to(dtype)
            if plan.num_directions > k:
                raise RuntimeError(f"{plan.num_directions} projection directions at layer {layer}, tables hold {k} "
                                 "(VSTEER_MAX_PROJECTIONS)")
            if plan.num_directions:
                directions[i, :plan.num_directions] = plan.directions.to(dtype)
                targets[i, :plan.num_directions] = plan.targets
            preserve[i] = plan.preserve_norm
            general[i] = plan.preserve_norm or plan.num_directions > 0
        projects = bool(general.any() and any(plans[layer].num_directions for layer in layers))
        return cls(fingerprint, positions, np.asarray(layers, dtype=np.int64), add,
                   directions if projects else None, targets if projects else None, preserve, general, k)
