"""Is a written vector any good? Two checks on pairs it was not extracted from.

1. **Reading** (``layer_select.score_vectors``): do held-out positive and negative texts
   separate along the vector (accuracy of the projection gap; 0.5 is chance)?
2. **Steering** (``likelihood``): does *adding* the vector (its layers as one band, at
   ``relative`` of the residual norm in total) make the held-out positive completions
   more likely than the negative ones, by more than same-norm random directions do?
   Reported as the mean gain in nats per pair and its z against the random directions.

Reading alone misses the commonest dead vector: topic-swap sentences read at their
``last`` token separate perfectly (every positive ends on a full stop after an ocean
word), yet adding that difference does not move the text to the topic; the steering gain
shows it (measured on SmolLM2-135M: ocean, layers 6-9, 0.2 relative: +0.10 nats/pair
for ``last``, about what random directions give, against +1.57 for ``mean``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable, Sequence

import torch
from torch import nn

from vsteer.engine.vectors import SteeringVectorSet

from .layer_select import score_vectors
from .likelihood import pair_margins
from .pairs import ContrastPair

MIN_ACCURACY = 0.7   # held-out projection accuracy below this: near chance
MIN_Z = 2.0          # steering gain below this many random-direction sds: weak


@dataclass
class Quality:
    n_heldout: int
    accuracy: float               # best layer's held-out projection accuracy
    margin: float                 # and its mean gap / sd
    gain: float                   # nats per pair: steered margin - unsteered margin
    random_gains: list[float]
    z: float
    relative: float
    layers: list[int]
    zero: bool = False            # every layer's vector is exactly zero

    @property
    def problems(self) -> list[str]:
        if self.zero:  # the other two checks only restate it (accuracy 0, gain 0, z nan)
            return ["it is zero at every layer: the positive and negative texts are identical at the token position "
                    "it was read at (a shared first token, say); choose another --token-position"]
        out = []
        if self.accuracy < MIN_ACCURACY:
            out.append(f"held-out pairs barely separate along it (best layer accuracy {self.accuracy:.2f}; 0.5 is "
                       "chance)")
        if not (self.gain > 0 and (self.z != self.z or self.z >= MIN_Z)):  # z is nan without random sd
            out.append(f"adding it does not make the held-out positive completions more likely than random "
                       f"directions do (gain {self.gain:+.2f} nats/pair, z {self.z:.1f})")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "weak": bool(self.problems), "problems": self.problems}


def _random_like(vectors: dict[int, torch.Tensor], gen: torch.Generator) -> dict[int, torch.Tensor]:
    out = {}
    for layer, v in vectors.items():
        r = torch.randn(v.shape, generator=gen)
        out[layer] = r / r.norm() * v.norm()
    return out


def check_vector(model: nn.Module, tokenizer: Any, vs: SteeringVectorSet, heldout: Sequence[ContrastPair], *,
                 relative: float = 0.2, n_random: int = 4, seed: int = 0, batch_size: int = 8,
                 chat_template: bool = False, max_length: int | None = None) -> Quality:
    """Both checks of ``vs`` on ``heldout`` pairs (keep them out of its extraction)."""
    held = list(heldout)
    reading = score_vectors(model, tokenizer, vs, held, batch_size=batch_size,
                            **({"token_position": "mean"} if vs.params.get("token_position") is None else {}))
    best = max(reading.values(), key=lambda s: (s.accuracy, s.margin))
    k = len(vs.layers)
    device = next(model.parameters()).device
    vectors = {layer: (v / v.norm().clamp_min(1e-12) * vs.residual_norms.get(layer, float(v.norm())) * relative / k)
               for layer, v in vs.vectors.items()}
    margins: Callable[[dict[int, torch.Tensor] | None], torch.Tensor] = lambda vecs: pair_margins(  # noqa: E731
        model, tokenizer, held, {k_: v.to(device) for k_, v in (vecs or {}).items()}, batch_size=batch_size,
        chat_template=chat_template, max_length=max_length)
    base = margins(None)
    gain = float((margins(vectors) - base).mean())
    gen = torch.Generator().manual_seed(seed)
    randoms = [float((margins(_random_like(vectors, gen)) - base).mean()) for _ in range(n_random)]
    mu = sum(randoms) / len(randoms) if randoms else 0.0
    sd = (sum((x - mu) ** 2 for x in randoms) / (len(randoms) - 1)) ** 0.5 if len(randoms) > 1 else float("nan")
    z = (gain - mu) / sd if sd and sd == sd and sd > 0 else float("nan")
    return Quality(n_heldout=len(held), accuracy=best.accuracy, margin=best.margin, gain=gain, random_gains=randoms,
                   z=z, relative=relative, layers=vs.layers,
                   zero=all(float(v.norm()) == 0.0 for v in vs.vectors.values()))
