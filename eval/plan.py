"""What an evaluation runs: its conditions (``Condition``) and the vector sets they name.

A condition is one way of answering the same held-out inputs: unsteered, prompted (a
system message asking for the behaviour), steered with a ``Recipe``, steered and
prompted together, or steered with a same-norm random direction (the baseline that any
effect must beat).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from vsteer.engine.vectors import SteeringVectorSet

from .recipes import Recipe

TARGET = "eval-target"          # registry name of the evaluated set inside the eval's registry
RANDOM_PREFIX = "eval-random-"  # same-norm random directions
KINDS = ("baseline", "prompting", "sweep", "both", "random")


@dataclass
class Condition:
    """One configuration of an evaluation and, after it ran, its raw results."""

    key: str
    kind: str                    # one of KINDS
    recipe: Recipe | None = None
    prompted: bool = False
    random_index: int | None = None
    result: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    """The system message of a prompted condition (None: the behaviour's ``system_prompt``)."""

    @property
    def vector(self) -> str:
        return TARGET if self.random_index is None else f"{RANDOM_PREFIX}{self.random_index}"

    @property
    def spec(self) -> dict[str, Any] | None:
        return self.recipe.spec(self.vector) if self.recipe is not None else None

    @property
    def scored(self) -> bool:
        """Random directions only feed the z-score: no coherence, no samples."""
        return self.kind != "random"


# Backwards-compatible name (the sweep called these configs).
Config = Condition


def random_sets(vs: SteeringVectorSet, layers: Sequence[int], n: int, seed: int) -> list[SteeringVectorSet]:
    """``n`` seeded random directions, each with the set's norm at every layer (and its
    residual norms, so relative units mean the same for them)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        vecs = {}
        for layer in layers:
            r = torch.randn(vs.hidden_size, generator=gen)
            vecs[layer] = r / r.norm() * vs.vectors[layer].norm()
        out.append(SteeringVectorSet(f"{RANDOM_PREFIX}{i}", vecs, method="random",
                                     params={"seed": seed, "index": i, "matched_norm_of": vs.behaviour},
                                     provenance={k: v for k, v in (vs.provenance or {}).items()
                                                 if k == "mean_activation_norm"},
                                     residual_norms={k: v for k, v in vs.residual_norms.items() if k in vecs}))
    return out


def strength_key(s: float) -> str:
    return f"{s:g}"


def sweep_conditions(variants: Sequence[Recipe], strengths: Sequence[float], *, random_baselines: int,
                     random_strengths: Sequence[float], prompting: bool) -> list[Condition]:
    """Unsteered, prompted (if ``prompting``), every variant at every non-zero strength
    (an ablation once), and ``random_baselines`` random directions per variant at each
    of ``random_strengths``."""
    out = [Condition("baseline", "baseline")]
    if prompting:
        out.append(Condition("prompting", "prompting", prompted=True))
    for v in variants:
        for s in (strengths if v.takes_strength else [1.0]):
            if s != 0.0:
                r = v.at(s)
                out.append(Condition(f"{r.label()}:{strength_key(r.strength)}", "sweep", r))
    for v in variants:
        for s in (random_strengths if v.takes_strength else [1.0]):
            if s == 0.0:
                continue
            for i in range(random_baselines):
                r = v.at(s)
                out.append(Condition(f"R{i}:{r.label()}:{strength_key(r.strength)}", "random", r, random_index=i))
    return out


def finite(x: Any) -> Any:
    """JSON-safe: nan/inf -> None, floats rounded, recursively."""
    if isinstance(x, float):
        return None if not math.isfinite(x) else round(x, 6)
    if isinstance(x, dict):
        return {k: finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [finite(v) for v in x]
    return x
