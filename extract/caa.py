"""Extract a steering vector set from contrast pairs (CAA, or any method in ``METHODS``)."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from importlib import metadata
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from vsteer.engine.layers import COMPONENTS, num_decoder_layers
from vsteer.engine.vectors import SteeringVectorSet

from .centering import centred_vector, check_center, load_neutral, neutral_means
from .hooks import normalize_layers
from .methods import LayerStats, get_method
from .pairs import ContrastPair, ContrastPairDataset
from .positions import check_token_position, choose_token_position
from .runner import iter_pair_batches


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "unknown"


def default_model_id(model: nn.Module) -> str:
    cfg = getattr(model, "config", None)
    return str(getattr(cfg, "name_or_path", "") or getattr(cfg, "_name_or_path", "") or "")


def collect_layer_stats(model: nn.Module, tokenizer: Any, pairs: Sequence[ContrastPair], layers: list[int], *,
                        keep_differences: bool = False, **run_kw: Any) -> dict[int, LayerStats]:
    """Run every pair once and fold each batch into per-layer running statistics."""
    stats = {layer: LayerStats(keep_differences=keep_differences) for layer in layers}
    for batch in iter_pair_batches(model, tokenizer, pairs, layers, **run_kw):
        for layer in layers:
            stats[layer].add(batch.positive[layer], batch.negative[layer])
            stats[layer].add_norms(batch.residual_norms[layer])
            if batch.stream_norms is not None:
                stats[layer].add_stream_norms(*batch.stream_norms[layer])
    return stats


def extract_caa(model: nn.Module, tokenizer: Any, pairs: ContrastPairDataset | Iterable[ContrastPair],
                layers: str | int | Iterable[int] = "all", component: str = "residual",
                token_position: str = "last", batch_size: int = 8, chat_template: bool = False,
                method: str = "caa", progress: bool = True, behaviour: str | None = None,
                model_id: str | None = None, max_length: int | None = None, center: str = "none",
                neutral_texts: Sequence[str] | None = None) -> SteeringVectorSet:
    """One steering vector per requested layer, from one forward pass per batch of pairs.

    ``token_position`` picks the token read in each text (``last``/``first`` real token,
    the ``mean`` over real tokens, the mean over the ``completion``'s tokens, or ``auto``:
    ``positions.choose_token_position``); ``method`` is a key of ``METHODS`` (``caa``: mean
    positive minus mean negative; ``pca``: unit first principal direction of the per-pair
    differences, which keeps every difference: O(pairs x hidden) memory per layer).
    ``residual_norms`` {layer: mean per-token residual-stream norm over the texts, first
    tokens left out} is the unit of ``"unit": "relative"`` strengths.
    The set's provenance holds ``mean_activation_norm`` {layer: mean residual-stream norm
    at the read tokens}, so strengths can be given relative to the stream's scale.
    ``center`` (``caa`` only): ``neutral`` subtracts the mean activation of a neutral corpus
    (``neutral_texts``, default the bundled one) from the positive mean instead of the
    negative mean; ``both`` subtracts the average of the two (``extract.centering``).
    """
    pair_list = pairs if isinstance(pairs, ContrastPairDataset) else ContrastPairDataset(list(pairs))
    if len(pair_list) == 0:
        raise ValueError("no contrast pairs given")
    if component not in COMPONENTS:
        raise ValueError(f"component must be one of {', '.join(COMPONENTS)}; got {component!r}")
    if token_position == "auto":
        token_position = choose_token_position(pair_list, chat_template)[0]
    check_token_position(token_position, allow_completion=True)
    spec = get_method(method)
    if check_center(center) != "none" and method != "caa":
        raise ValueError(f"center={center!r} applies to method 'caa' only, not {method!r}")
    num_layers = num_decoder_layers(model)
    wanted = normalize_layers(layers, num_layers)
    behaviour = behaviour or pair_list.name or "behaviour"

    started = time.perf_counter()
    stats = collect_layer_stats(model, tokenizer, pair_list, wanted, keep_differences=spec.keeps_differences,
                                component=component, token_position=token_position, batch_size=batch_size,
                                chat_template=chat_template, max_length=max_length, progress=progress,
                                desc=f"extract {behaviour}")
    vectors = {layer: spec.fn(stats[layer]).to(torch.float32).cpu() for layer in wanted}
    if center != "none":
        neutral = list(neutral_texts) if neutral_texts is not None else load_neutral()
        means = neutral_means(model, tokenizer, neutral, wanted, component=component, token_position=token_position,
                              batch_size=batch_size, max_length=max_length)
        vectors = {layer: centred_vector(stats[layer], means[layer], center).to(torch.float32) for layer in wanted}
    seconds = time.perf_counter() - started

    params = {
        "component": component, "token_position": token_position, "batch_size": batch_size,
        "n_pairs": len(pair_list), "chat_template": chat_template,
        "padding_side": getattr(tokenizer, "padding_side", "right"), "max_length": max_length,
        "model_dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
    }
    if center != "none":
        params["center"] = center
        params["neutral_texts"] = len(neutral)
    provenance = {
        "dataset": {"name": pair_list.name, "source": pair_list.source, "size": len(pair_list)},
        "model_id": model_id or default_model_id(model),
        "versions": {"vsteer": _version("vsteer"), "torch": torch.__version__,
                     "transformers": _version("transformers")},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "mean_activation_norm": {str(layer): round(stats[layer].mean_norm, 6) for layer in wanted},
    }
    residual_norms = {layer: stats[layer].mean_stream_norm for layer in wanted}
    return SteeringVectorSet(behaviour=behaviour, vectors=vectors, model_id=model_id or default_model_id(model),
                             num_layers=num_layers, method=method, params=params, provenance=provenance,
                             residual_norms={k: round(v, 6) for k, v in residual_norms.items()})
