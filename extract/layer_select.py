"""Choose layers by how well each layer's vector separates held-out pairs.

Per layer: extract on the training pairs, project each held-out positive and negative
activation onto the unit vector, and score the per-pair projection gap ``pos - neg``:

* ``accuracy``: the fraction of held-out pairs with a positive gap;
* ``margin``: mean gap / its standard deviation (scale-free, so layers compare).

Layers rank by accuracy, then margin. Everything is measured on the model at hand; there
are no per-model tables.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Iterable

import torch
from torch import nn

from vsteer.engine.layers import num_decoder_layers
from vsteer.engine.vectors import SteeringVectorSet

from .caa import extract_caa
from .hooks import normalize_layers
from .pairs import ContrastPair, ContrastPairDataset
from .runner import iter_pair_batches


@dataclass(frozen=True)
class LayerScore:
    accuracy: float
    margin: float
    n_heldout: int

    def to_dict(self) -> dict[str, float]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


def _score(gaps: torch.Tensor) -> LayerScore:
    gaps = gaps.double()
    mean = float(gaps.mean())
    std = float(gaps.std(unbiased=False)) if gaps.numel() > 1 else 0.0
    margin = mean / max(std, 1e-6 * abs(mean), 1e-12)
    return LayerScore(accuracy=float((gaps > 0).double().mean()), margin=margin, n_heldout=int(gaps.numel()))


def score_vectors(model: nn.Module, tokenizer: Any, vectors: SteeringVectorSet,
                  heldout_pairs: Iterable[ContrastPair], *, batch_size: int = 8, progress: bool = False,
                  **run_kw: Any) -> dict[int, LayerScore]:
    """Score an existing set on held-out pairs (one forward pass per batch, all layers).
    The set's own component/token position/chat template are used unless overridden."""
    held = list(heldout_pairs)
    if not held:
        raise ValueError("no held-out pairs to score on")
    for key in ("component", "token_position", "chat_template", "max_length"):
        if key in vectors.params and key not in run_kw:
            run_kw[key] = vectors.params[key]
    units = {layer: v / v.norm().clamp_min(1e-12) for layer, v in vectors.vectors.items()}
    gaps: dict[int, list[torch.Tensor]] = {layer: [] for layer in units}
    for batch in iter_pair_batches(model, tokenizer, held, vectors.layers, batch_size=batch_size,
                                   progress=progress, desc="score layers", **run_kw):
        for layer, unit in units.items():
            diff = (batch.positive[layer] - batch.negative[layer]).double()
            gaps[layer].append(diff.cpu() @ unit.double())
    return {layer: _score(torch.cat(g)) for layer, g in gaps.items()}


def score_layers(model: nn.Module, tokenizer: Any, train_pairs: Iterable[ContrastPair],
                 heldout_pairs: Iterable[ContrastPair], layers: str | Iterable[int] = "all",
                 **extract_kw: Any) -> dict[int, LayerScore]:
    """{layer: LayerScore}: CAA on ``train_pairs`` (one pass for all layers), scored on
    ``heldout_pairs``. ``extract_kw`` go to ``extract_caa`` (component, token_position, ...)."""
    extract_kw.setdefault("progress", False)
    train_set = extract_caa(model, tokenizer, train_pairs, layers=layers, **extract_kw)
    run_kw = {k: extract_kw[k] for k in ("batch_size", "progress") if k in extract_kw}
    return score_vectors(model, tokenizer, train_set, heldout_pairs, **run_kw)


def top_layers(scores: dict[int, LayerScore], k: int) -> list[int]:
    """The ``k`` best layers, best first (ties: the earlier layer)."""
    if k < 1:
        raise ValueError(f"top_k must be >= 1, got {k}")
    return sorted(scores, key=lambda layer: (-scores[layer].accuracy, -scores[layer].margin, layer))[:k]


def extract_auto(model: nn.Module, tokenizer: Any, pairs: ContrastPairDataset, *, top_k: int = 3,
                 holdout_fraction: float = 0.25, seed: int = 0, candidates: str | Iterable[int] = "all",
                 **extract_kw: Any) -> SteeringVectorSet:
    """Score ``candidates`` on a held-out split, then extract the ``top_k`` best layers from
    all pairs. The scores go to ``provenance["layer_scores"]``."""
    train, heldout = pairs.split(holdout_fraction, seed)
    candidate_layers = normalize_layers(candidates if isinstance(candidates, str) else list(candidates),
                                        num_decoder_layers(model))
    score_kw = {k: v for k, v in extract_kw.items() if k not in ("method", "behaviour", "model_id")}
    scores = score_layers(model, tokenizer, train, heldout, candidate_layers, **score_kw)
    chosen = sorted(top_layers(scores, min(top_k, len(scores))))
    vs = extract_caa(model, tokenizer, pairs, layers=chosen, **extract_kw)
    vs.provenance["layer_scores"] = {str(layer): s.to_dict() for layer, s in sorted(scores.items())}
    vs.provenance["layer_selection"] = {
        "method": "heldout_separation", "top_k": top_k, "holdout_fraction": holdout_fraction, "seed": seed,
        "n_train": len(train), "n_heldout": len(heldout), "candidates": candidate_layers,
        "ranked": top_layers(scores, len(scores)),
    }
    return vs
