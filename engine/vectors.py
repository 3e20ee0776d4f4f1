"""In-memory steering vectors.

Layer convention (stored in every file we write, checked on every load):
**layer L is the output of decoder block L (0-based)**, i.e. Hugging Face
``output_hidden_states[L + 1]`` for every block but the last (HF applies the final norm
to its last entry; the last block's raw output is the final norm's input). Adding a
vector at layer L adds it to the residual stream right after block L, in the HF injector
and in vLLM alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import torch

LAYER_CONVENTION = "block_output"
LAYER_CONVENTION_DOC = ("layer L = output of decoder block L (0-based) = HF output_hidden_states[L + 1] "
                        "(for the last block: the input of the final norm)")


def as_vector(tensor: Any, *, what: str = "vector") -> torch.Tensor:
    """Return a detached, contiguous float32 CPU 1-D tensor, refusing NaN/inf."""
    t = torch.as_tensor(tensor).detach().to("cpu", torch.float32).contiguous()
    if t.dim() != 1:
        raise ValueError(f"{what} must be 1-D [hidden_size], got shape {tuple(t.shape)}")
    if t.numel() == 0:
        raise ValueError(f"{what} is empty")
    if not torch.isfinite(t).all():
        raise ValueError(f"{what} contains NaN or infinite values")
    return t


@dataclass
class SteeringVector:
    """One behaviour's direction at one layer."""

    behaviour: str
    layer: int
    vector: torch.Tensor
    model_id: str = ""
    method: str = "caa"
    params: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.layer < 0:
            raise ValueError(f"layer must be >= 0, got {self.layer}")
        self.vector = as_vector(self.vector, what=f"vector for layer {self.layer}")

    @property
    def hidden_size(self) -> int:
        return int(self.vector.numel())

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    def scaled(self, factor: float) -> "SteeringVector":
        return SteeringVector(self.behaviour, self.layer, self.vector * factor, self.model_id,
                              self.method, dict(self.params), dict(self.provenance))


@dataclass
class SteeringVectorSet:
    """One behaviour at several layers: what extraction produces and what files hold."""

    behaviour: str
    vectors: dict[int, torch.Tensor]
    model_id: str = ""
    num_layers: int | None = None
    method: str = "caa"
    params: dict[str, Any] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)
    residual_norms: dict[int, float] = field(default_factory=dict)
    """Layer -> mean residual-stream norm over the extraction texts: the unit of
    ``"unit": "relative"`` strengths (a strength of 0.1 adds a tenth of it)."""
    recommended: dict[str, Any] | None = None
    """The recipe a request gets when it names only the vector (``vsteer tune`` writes it):
    any of strength, layers, unit, norm, positions."""

    def __post_init__(self) -> None:
        if not self.vectors:
            raise ValueError(f"vector set {self.behaviour!r} has no layers")
        clean: dict[int, torch.Tensor] = {}
        for layer, vec in sorted(self.vectors.items()):
            layer = int(layer)
            if layer < 0 or (self.num_layers is not None and layer >= self.num_layers):
                raise ValueError(f"layer {layer} is outside the model's 0..{(self.num_layers or 0) - 1}")
            clean[layer] = as_vector(vec, what=f"vector for layer {layer}")
        sizes = {v.numel() for v in clean.values()}
        if len(sizes) != 1:
            raise ValueError(f"vectors of one set must share a hidden size, got {sorted(sizes)}")
        self.vectors = clean
        self.residual_norms = {int(k): float(v) for k, v in (self.residual_norms or {}).items()
                               if v is not None and math.isfinite(float(v)) and float(v) > 0}

    # -- views -----------------------------------------------------------------------
    @property
    def layers(self) -> list[int]:
        return sorted(self.vectors)

    @property
    def hidden_size(self) -> int:
        return int(next(iter(self.vectors.values())).numel())

    def __len__(self) -> int:
        return len(self.vectors)

    def __contains__(self, layer: int) -> bool:
        return layer in self.vectors

    def __getitem__(self, layer: int) -> SteeringVector:
        if layer not in self.vectors:
            raise KeyError(f"{self.behaviour!r} has no vector for layer {layer}; it has {self.layers}")
        return SteeringVector(self.behaviour, layer, self.vectors[layer], self.model_id,
                              self.method, dict(self.params), dict(self.provenance))

    def __iter__(self) -> Iterator[SteeringVector]:
        return (self[layer] for layer in self.layers)

    def norms(self) -> dict[int, float]:
        return {layer: float(v.norm()) for layer, v in self.vectors.items()}

    # -- derived sets ------------------------------------------------------------------
    def _derive(self, vectors: dict[int, torch.Tensor], **changes: Any) -> "SteeringVectorSet":
        kw = dict(behaviour=self.behaviour, model_id=self.model_id, num_layers=self.num_layers,
                  method=self.method, params=dict(self.params), provenance=dict(self.provenance),
                  residual_norms={k: v for k, v in self.residual_norms.items() if k in vectors},
                  recommended=dict(self.recommended) if self.recommended else None)
        kw.update(changes)
        return SteeringVectorSet(vectors=vectors, **kw)

    def select(self, layers: Iterable[int]) -> "SteeringVectorSet":
        wanted = list(layers)
        missing = [layer for layer in wanted if layer not in self.vectors]
        if missing:
            raise KeyError(f"{self.behaviour!r} has no vectors for layers {missing}; it has {self.layers}")
        return self._derive({layer: self.vectors[layer] for layer in wanted})

    def scaled(self, factor: float) -> "SteeringVectorSet":
        return self._derive({layer: v * factor for layer, v in self.vectors.items()})

    def normalized(self) -> "SteeringVectorSet":
        return self._derive({layer: v / v.norm().clamp_min(1e-12) for layer, v in self.vectors.items()},
                            params={**self.params, "normalized": True})
