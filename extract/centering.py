"""Mean-centring against a neutral corpus (Jorgensen et al. 2023, "Improving activation
steering in language models with mean-centring").

A plain mean difference ``mean(positive) - mean(negative)`` is only as good as the
negatives: topic-swap negatives bring their own topics into the vector. Mean-centring
subtracts the mean activation of a broad neutral corpus instead, so the vector is what
sets the positive texts apart from ordinary text:

* ``none``: ``mean(pos) - mean(neg)`` (CAA, unchanged);
* ``neutral``: ``mean(pos) - mean(neutral corpus)``;
* ``both``: ``mean(pos) - (mean(neg) + mean(neutral)) / 2``.

The corpus is read at the same layers, component and token position as the pairs. The
bundled one (``extract/data/neutral.jsonl``, 64 everyday sentences written for vsteer)
is used unless a file of ``{"text": ...}`` lines (or plain lines) is given.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .methods import LayerStats
from .pairs import ContrastPair
from .runner import iter_pair_batches

CENTERINGS: tuple[str, ...] = ("none", "neutral", "both")


def check_center(center: str) -> str:
    if center not in CENTERINGS:
        raise ValueError(f"center must be one of {', '.join(CENTERINGS)}; got {center!r}")
    return center


def load_neutral(path: str | None = None, bundled: str = "neutral") -> list[str]:
    """Texts of a neutral corpus: ``path`` (JSONL of {"text"} or plain lines) or the bundled
    file ``extract/data/<bundled>.jsonl`` (``requests``: the user turns bipo trains under)."""
    if path:
        try:
            raw = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read the neutral corpus {path}: {e}") from None
    else:
        raw = resources.files("vsteer.extract").joinpath("data", f"{bundled}.jsonl").read_text(encoding="utf-8")
    texts = []
    for line in raw.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.startswith("{"):
            rec = json.loads(line)
            line = str(rec.get("text") or rec.get("prompt") or "")
        if line:
            texts.append(line)
    if len(texts) < 2:
        raise ValueError(f"the neutral corpus {path or '(bundled)'} needs at least two texts")
    return texts


def neutral_means(model: nn.Module, tokenizer: Any, texts: Sequence[str], layers: list[int],
                  **run_kw: Any) -> dict[int, torch.Tensor]:
    """{layer: float64 mean activation over ``texts``}, read exactly like the pairs are.

    The texts go through the pair runner two at a time (one as "positive", the next as
    "negative"), so no forward pass is spent twice; an odd last text is paired with
    itself and counted once."""
    texts = list(texts)
    odd = len(texts) % 2 == 1
    pseudo = [ContrastPair(texts[i], texts[i + 1] if i + 1 < len(texts) else texts[i])
              for i in range(0, len(texts), 2)]
    sums: dict[int, torch.Tensor] = {}
    seen = 0
    for batch in iter_pair_batches(model, tokenizer, pseudo, layers, **run_kw):
        n = next(iter(batch.positive.values())).shape[0]
        seen += n
        for layer in layers:
            neg = batch.negative[layer]
            if odd and seen == len(pseudo):
                neg = neg[:-1]  # the last pair repeats one text
            total = batch.positive[layer].double().sum(0).cpu() + neg.double().sum(0).cpu()
            sums[layer] = total if layer not in sums else sums[layer] + total
    return {layer: s / len(texts) for layer, s in sums.items()}


def centred_vector(stats: LayerStats, neutral_mean: torch.Tensor, center: str) -> torch.Tensor:
    """The vector of one layer under ``center`` (see the module doc)."""
    pos = stats.mean_pos.cpu()
    if center == "neutral":
        return pos - neutral_mean
    if center == "both":
        return pos - (stats.mean_neg.cpu() + neutral_mean) / 2
    return pos - stats.mean_neg.cpu()
