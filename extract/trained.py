"""Trained steering directions: ``--method bipo`` (bi-directional preference optimisation,
after BiPO, Cao et al. 2024; RePS, Wu et al. 2025, is the reference-free relative).

A mean difference only reads the model; here one vector per layer of a band is optimised
by gradient on the frozen HF model so that *adding* it makes the positive completions
more likely than the negative ones, and subtracting it does the reverse. With
``Δ(v) = [log p_v(pos) - log p_0(pos)] - [log p_v(neg) - log p_0(neg)]`` (completion
log-likelihoods, ``likelihood.completion_logprobs``; ``p_0`` the unsteered model), each
step minimises, on a batch of pairs, for direction ``d`` (+1 and -1 on alternate steps)

    -log σ(β · d · Δ(d · v))  +  λ · Σ_L |v_L / n_L|²

``n_L`` is the layer's mean residual-stream norm, so ``λ`` and the learning rate do not
depend on the model's scale: the vectors are trained in relative units (``v_L = n_L u_L``,
Adam on ``u``). The output is an ordinary ``SteeringVectorSet`` (``method="bipo"``), so
serving, ``vsteer tune`` and the file formats do not change.

A fraction of the pairs (``holdout_fraction``) is kept out of training; the preference
accuracy and mean ``Δ`` on them (and on the training pairs) before and after training go
to ``provenance["training"]``. Deterministic for a given seed (CPU).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import torch
from torch import nn

from vsteer.engine.vectors import SteeringVectorSet

from .caa import extract_caa
from .likelihood import AddVectors, completion_logprobs, encode_pairs
from .pairs import ContrastPair, ContrastPairDataset
from .runner import model_device


@dataclass(frozen=True)
class BiPOConfig:
    """Hyperparameters of ``--method bipo`` (docs/extraction.md, "Trained directions")."""

    steps: int = 30               # optimiser steps (each: one batch, one direction)
    lr: float = 2e-3              # Adam, on the relative vectors u_L = v_L / n_L
    beta: float = 0.5             # preference temperature (per nat of Δ)
    l2: float = 1.0               # λ: weight of Σ_L |u_L|²
    batch_size: int = 8           # pairs per step
    init: str = "zero"            # start from zero, or from the mean difference ("caa")
    init_scale: float = 0.05      # |u_L| at the start when init="caa"
    holdout_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.init not in ("caa", "zero"):
            raise ValueError(f"init must be 'caa' or 'zero', got {self.init!r}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.beta <= 0 or self.l2 < 0:
            raise ValueError("steps and batch_size must be >= 1, lr and beta > 0, l2 >= 0")


def _margins(model: nn.Module, batch: dict[str, torch.Tensor], n: int) -> torch.Tensor:
    lp = completion_logprobs(model, batch)
    return lp[:n] - lp[n:]


def _evaluate(model: nn.Module, batches: list[tuple[dict, torch.Tensor, int]], vectors: dict[int, torch.Tensor],
              cfg: BiPOConfig) -> dict[str, float]:
    """Objective (both directions), preference accuracy and mean Δ(+v) over ``batches``, no grad."""
    loss, hits, delta, total = 0.0, 0, 0.0, 0
    with torch.no_grad():
        for batch, ref, n in batches:
            for d in (1, -1):
                with AddVectors(model, vectors, scale=float(d)):
                    gain = _margins(model, batch, n) - ref
                loss += float(-nn.functional.logsigmoid(cfg.beta * d * gain).sum())
                if d == 1:
                    hits += int((gain > 0).sum())
                    delta += float(gain.sum())
            total += n
    return {"objective": loss / (2 * max(total, 1)), "accuracy": hits / max(total, 1),
            "mean_delta": delta / max(total, 1)}


def train_bipo(model: nn.Module, tokenizer: Any, pairs: ContrastPairDataset | Sequence[ContrastPair],
               layers: str | int | Sequence[int], config: BiPOConfig | None = None, *, chat_template: bool = False,
               max_length: int | None = None, progress: bool = True, behaviour: str | None = None,
               model_id: str | None = None, batch_size: int = 8, token_position: str = "auto") -> SteeringVectorSet:
    """Train one vector per layer of ``layers`` (see the module doc); returns the set.

    A CAA pass over all pairs comes first: it gives the residual norms (the relative unit)
    and, with ``init="caa"``, the starting directions; ``token_position`` is its reading rule."""
    cfg = config or BiPOConfig()
    pair_list = pairs if isinstance(pairs, ContrastPairDataset) else ContrastPairDataset(list(pairs))
    if len(pair_list) < 2:
        raise ValueError("bipo needs at least two pairs (some are held out)")
    train, held = pair_list.split(cfg.holdout_fraction, cfg.seed)
    caa = extract_caa(model, tokenizer, pair_list, layers=layers, token_position=token_position, batch_size=batch_size,
                      chat_template=chat_template, progress=False, behaviour=behaviour, model_id=model_id,
                      max_length=max_length)
    device = model_device(model)
    norms = {layer: float(caa.residual_norms.get(layer) or caa.vectors[layer].norm()) for layer in caa.layers}
    units = {}
    for layer in caa.layers:
        v = caa.vectors[layer].to(device=device, dtype=torch.float32)
        start = v / v.norm().clamp_min(1e-12) * cfg.init_scale if cfg.init == "caa" else torch.zeros_like(v)
        units[layer] = start.clone().requires_grad_(True)
    scale = {layer: torch.tensor(norms[layer], device=device) for layer in units}

    def vectors() -> dict[int, torch.Tensor]:
        return {layer: u * scale[layer] for layer, u in units.items()}

    def prepared(ps: Sequence[ContrastPair]) -> list[tuple[dict, torch.Tensor, int]]:
        out = []
        for start in range(0, len(ps), cfg.batch_size):
            chunk = list(ps[start:start + cfg.batch_size])
            batch = encode_pairs(tokenizer, chunk, chat_template=chat_template, max_length=max_length, device=device)
            with torch.no_grad():
                out.append((batch, _margins(model, batch, len(chunk)), len(chunk)))
        return out

    started = time.perf_counter()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        train_batches, held_batches = prepared(train), prepared(held)
        before = {"train": _evaluate(model, train_batches, vectors(), cfg),
                  "heldout": _evaluate(model, held_batches, vectors(), cfg)}
        losses = _optimise(model, train_batches, units, vectors, cfg, progress)
        final = {layer: v.detach() for layer, v in vectors().items()}
        after = {"train": _evaluate(model, train_batches, final, cfg),
                 "heldout": _evaluate(model, held_batches, final, cfg)}
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)

    params = dict(caa.params, **{f"bipo_{k}": v for k, v in asdict(cfg).items()}, n_train=len(train),
                  n_heldout=len(held), init_token_position=caa.params["token_position"])
    params.pop("token_position", None)
    provenance = dict(caa.provenance, seconds=round(caa.provenance["seconds"] + time.perf_counter() - started, 3))
    provenance["training"] = {
        "objective": "-log σ(β d Δ(d v)) + λ Σ_L |v_L / n_L|², d = ±1 on alternate steps (BiPO)",
        "before": before, "after": after, "losses": [round(x, 5) for x in losses],
        "relative_norms": {str(layer): round(float(units[layer].detach().norm()), 6) for layer in units},
    }
    return SteeringVectorSet(behaviour=caa.behaviour, vectors={k: v.float().cpu() for k, v in final.items()},
                             model_id=caa.model_id, num_layers=caa.num_layers, method="bipo", params=params,
                             provenance=provenance, residual_norms=dict(caa.residual_norms))


def _optimise(model: nn.Module, batches: list[tuple[dict, torch.Tensor, int]], units: dict[int, torch.Tensor],
              vectors: Any, cfg: BiPOConfig, progress: bool) -> list[float]:
    """``cfg.steps`` Adam steps over a seeded shuffle of the batches; returns each step's loss."""
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(list(units.values()), lr=cfg.lr)
    rng = random.Random(cfg.seed)
    order: list[int] = []
    losses = []
    bar = tqdm(range(cfg.steps), desc="train bipo", unit="step", disable=not progress)
    for step in bar:
        if not order:
            order = list(range(len(batches)))
            rng.shuffle(order)
        batch, ref, n = batches[order.pop()]
        d = 1.0 if step % 2 == 0 else -1.0
        with AddVectors(model, vectors(), scale=d):
            gain = _margins(model, batch, n) - ref
        pref = -nn.functional.logsigmoid(cfg.beta * d * gain).mean()
        loss = pref + cfg.l2 * sum((u * u).sum() for u in units.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
