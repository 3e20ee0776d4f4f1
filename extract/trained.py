"""Trained steering directions: ``--method bipo`` (bi-directional preference optimisation,
after BiPO, Cao et al. 2024; RePS, Wu et al. 2025, is the reference-free relative).

A mean difference only reads the model; here one vector per layer of a band is optimised
by gradient on the frozen HF model so that *adding* it makes the positive completions
more likely than the negative ones, and subtracting it does the reverse. With
``Δ(v) = [log p_v(pos) - log p_0(pos)] - [log p_v(neg) - log p_0(neg)]`` (completion
log-likelihoods, ``likelihood.completion_logprobs``; ``p_0`` the unsteered model), each
step minimises, on a batch of pairs, for direction ``d`` (+1 and -1 on alternate steps)

    -log σ(β · d · Δ(d · v))

``n_L`` is the layer's mean residual-stream norm; the vectors are trained in relative
units (``v_L = n_L u_L``), so the learning rate does not depend on the model's scale. The
output is an ordinary ``SteeringVectorSet`` (``method="bipo"``), so serving, ``vsteer
tune`` and the file formats do not change.

Two settings make the trained vector the one that is served (docs/extraction.md):

* ``strength`` (default 0.2): the vectors are trained *at the size a request applies
  them*, a total relative strength spread over the band (``s / k`` per layer, as
  ``vsteer tune``'s recipes spread it). Only the directions are trained (``u_L = (s/k)
  w_L / |w_L|``, Adam on ``w``, starting from the mean difference). ``None``: the size
  is free (Adam on ``u``) and ``+ λ Σ_L |u_L|²`` holds it back (the first version, which
  grew to about 0.25 relative per layer: ten times what is served, so the served
  direction was not the trained one).
* ``context`` (default ``chat``): each pair is the assistant's reply in a chat turn, as a
  steered answer is; a pair without a prompt answers one of 64 bundled everyday requests
  (``extract/data/requests.jsonl``, none of them an evaluation prompt), so the objective
  is "say the positive text whatever is asked", not "continue it in its own context".
  ``plain``: the pairs as given (without a chat template unless asked). Needs a tokenizer
  with a chat template; without one it falls back to ``plain`` (recorded).

A fraction of the pairs (``holdout_fraction``) is kept out of training; the preference
accuracy and mean ``Δ`` on them (and on the training pairs) before and after training go
to ``provenance["training"]``. Deterministic for a given seed (CPU).
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, replace
from typing import Any, Callable, Sequence

import torch
from torch import nn

from vsteer.engine.vectors import SteeringVectorSet

from .caa import extract_caa
from .centering import load_neutral
from .likelihood import AddVectors, completion_logprobs, encode_pairs
from .pairs import ContrastPair, ContrastPairDataset
from .runner import model_device

CONTEXTS = ("chat", "plain")


@dataclass(frozen=True)
class BiPOConfig:
    """Hyperparameters of ``--method bipo`` (docs/extraction.md, "Trained directions")."""

    steps: int = 30               # optimiser steps (each: one batch, one direction)
    lr: float = 2e-3              # Adam, on the relative vectors u_L = v_L / n_L
    beta: float = 0.5             # preference temperature (per nat of Δ)
    l2: float = 1.0               # λ: weight of Σ_L |u_L|²
    batch_size: int = 8           # pairs per step
    init: str = "caa"             # start from the mean difference ("caa"), or from zero (free size only)
    init_scale: float = 0.05      # |u_L| at the start when init="caa" and the size is free
    strength: float | None = 0.2  # served total relative strength over the band; None: free size, l2
    context: str = "chat"         # "chat": replies in a chat turn (bundled requests); "plain": as given
    holdout_fraction: float = 0.25
    seed: int = 0

    def __post_init__(self) -> None:
        if self.init not in ("caa", "zero"):
            raise ValueError(f"init must be 'caa' or 'zero', got {self.init!r}")
        if self.context not in CONTEXTS:
            raise ValueError(f"context must be one of {', '.join(CONTEXTS)}, got {self.context!r}")
        if self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.beta <= 0 or self.l2 < 0:
            raise ValueError("steps and batch_size must be >= 1, lr and beta > 0, l2 >= 0")
        if self.strength is not None and not 0 < self.strength <= 10:
            raise ValueError(f"the training strength must be in (0, 10] relative, or free (None); got {self.strength}")
        if self.strength is not None and self.init == "zero":
            raise ValueError("a fixed strength trains directions only; they start from the mean difference "
                             "(init='caa'), not from zero")


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

    A CAA pass over all pairs (as given) comes first: it gives the residual norms (the
    relative unit) and, with ``init="caa"``, the starting directions; ``token_position``
    is its reading rule."""
    cfg = config or BiPOConfig()
    pair_list = pairs if isinstance(pairs, ContrastPairDataset) else ContrastPairDataset(list(pairs))
    if len(pair_list) < 2:
        raise ValueError("bipo needs at least two pairs (some are held out)")
    train, held = pair_list.split(cfg.holdout_fraction, cfg.seed)
    caa = extract_caa(model, tokenizer, pair_list, layers=layers, token_position=token_position, batch_size=batch_size,
                      chat_template=chat_template, progress=False, behaviour=behaviour, model_id=model_id,
                      max_length=max_length)
    context = cfg.context if getattr(tokenizer, "chat_template", None) else "plain"
    if context == "chat":
        train, held = in_chat(train, cfg.seed), in_chat(held, cfg.seed + 1)
    train_chat = chat_template or context == "chat"
    device = model_device(model)
    norms = {layer: float(caa.residual_norms.get(layer) or caa.vectors[layer].norm()) for layer in caa.layers}
    size = None if cfg.strength is None else cfg.strength / len(caa.layers)  # relative, per layer
    params = {}
    for layer in caa.layers:
        v = caa.vectors[layer].to(device=device, dtype=torch.float32)
        direction = v / v.norm().clamp_min(1e-12)
        start = (direction if size is not None else direction * cfg.init_scale) if cfg.init == "caa" \
            else torch.zeros_like(v)
        params[layer] = start.clone().requires_grad_(True)
    scale = {layer: torch.tensor(norms[layer], device=device) for layer in params}

    def relative() -> dict[int, torch.Tensor]:
        """u_L: the trained parameters, or with a fixed size their directions at that size."""
        if size is None:
            return dict(params)
        return {layer: size * w / w.norm().clamp_min(1e-12) for layer, w in params.items()}

    def vectors() -> dict[int, torch.Tensor]:
        return {layer: u * scale[layer] for layer, u in relative().items()}

    def prepared(ps: Sequence[ContrastPair]) -> list[tuple[dict, torch.Tensor, int]]:
        out = []
        for start in range(0, len(ps), cfg.batch_size):
            chunk = list(ps[start:start + cfg.batch_size])
            batch = encode_pairs(tokenizer, chunk, chat_template=train_chat, max_length=max_length, device=device)
            with torch.no_grad():
                out.append((batch, _margins(model, batch, len(chunk)), len(chunk)))
        return out

    started = time.perf_counter()
    requires = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        train_batches, held_batches = prepared(train), prepared(held)
        with torch.no_grad():
            initial = {layer: v.detach() for layer, v in vectors().items()}
        before = {"train": _evaluate(model, train_batches, initial, cfg),
                  "heldout": _evaluate(model, held_batches, initial, cfg)}
        penalty = None if size is not None else (lambda: sum((u * u).sum() for u in params.values()))
        losses = _optimise(model, train_batches, list(params.values()), vectors, penalty, cfg, progress)
        with torch.no_grad():
            final = {layer: v.detach() for layer, v in vectors().items()}
        after = {"train": _evaluate(model, train_batches, final, cfg),
                 "heldout": _evaluate(model, held_batches, final, cfg)}
    finally:
        for p, r in zip(model.parameters(), requires):
            p.requires_grad_(r)

    params_out = dict(caa.params, **{f"bipo_{k}": v for k, v in asdict(cfg).items()}, n_train=len(train),
                      n_heldout=len(held), init_token_position=caa.params["token_position"], bipo_context_used=context)
    params_out.pop("token_position", None)
    provenance = dict(caa.provenance, seconds=round(caa.provenance["seconds"] + time.perf_counter() - started, 3))
    objective = ("-log σ(β d Δ(d v)), d = ±1 on alternate steps (BiPO); v_L = n_L (s/k) w_L/|w_L|, s = "
                 f"{cfg.strength:g}" if size is not None else
                 "-log σ(β d Δ(d v)) + λ Σ_L |v_L / n_L|², d = ±1 on alternate steps (BiPO)")
    provenance["training"] = {
        "objective": objective, "context": context, "before": before, "after": after,
        "losses": [round(x, 5) for x in losses],
        "relative_norms": {str(layer): round(float(u.detach().norm()), 6) for layer, u in relative().items()},
        "cosine_to_caa": {str(layer): round(float(nn.functional.cosine_similarity(
            final[layer].float().cpu(), caa.vectors[layer].float().cpu(), dim=0)), 4) for layer in final},
    }
    return SteeringVectorSet(behaviour=caa.behaviour, vectors={k: v.float().cpu() for k, v in final.items()},
                             model_id=caa.model_id, num_layers=caa.num_layers, method="bipo", params=params_out,
                             provenance=provenance, residual_norms=dict(caa.residual_norms))


def in_chat(pairs: ContrastPairDataset, seed: int) -> ContrastPairDataset:
    """Pairs without a prompt become replies to the bundled requests (seeded order, one
    request per pair, cycling); pairs with a prompt keep theirs."""
    requests = load_neutral(bundled="requests")
    random.Random(seed).shuffle(requests)
    out = [p if p.prompt else replace(p, prompt=requests[i % len(requests)]) for i, p in enumerate(pairs)]
    return ContrastPairDataset(out, pairs.name, pairs.description, pairs.source)


def _optimise(model: nn.Module, batches: list[tuple[dict, torch.Tensor, int]], params: list[torch.Tensor],
              vectors: Callable[[], dict[int, torch.Tensor]], penalty: Callable[[], torch.Tensor] | None,
              cfg: BiPOConfig, progress: bool) -> list[float]:
    """``cfg.steps`` Adam steps over a seeded shuffle of the batches; returns each step's loss."""
    from tqdm.auto import tqdm

    opt = torch.optim.Adam(params, lr=cfg.lr)
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
        loss = -nn.functional.logsigmoid(cfg.beta * d * gain).mean()
        if penalty is not None:
            loss = loss + cfg.l2 * penalty()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
    return losses
