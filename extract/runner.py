"""Run contrast pairs through a model: one forward pass per batch for every layer.

Each batch holds ``batch_size`` pairs: their positive and negative texts go through the
model together (2 x batch_size rows), with hooks on all requested layers at once and
the pass stopped after the deepest of them. Position ids are computed from the
attention mask so left padding gives the same states as no padding, also for models
with absolute position embeddings (GPT-2), whose default ids would count the pads.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from .hooks import ActivationHook, StopForward, stop_after_layer
from .pairs import ContrastPair
from .positions import completion_mask, stream_norms, token_norms


@dataclass
class PairBatch:
    """Pooled float32 activations of one batch: ``positive[layer]`` is [pairs, dim]."""

    positive: dict[int, torch.Tensor]
    negative: dict[int, torch.Tensor]
    residual_norms: dict[int, torch.Tensor]  # [2 * pairs]: per-text residual-stream norm
    stream_norms: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    """Per layer: (sum of token norms, token count) per text, first tokens left out."""


def ensure_pad_token(tokenizer: Any) -> None:
    """Batching needs a pad token; fall back to EOS as most causal LMs allow."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        tokenizer.pad_token = tokenizer.eos_token


def position_ids_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over each row's real tokens (pads get 0), whatever the padding side."""
    return (mask.long().cumsum(dim=-1) - 1).clamp_min(0)


def _accepts(module: nn.Module, name: str) -> bool:
    try:
        params = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return True
    return name in params or any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())


def model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def encode(tokenizer: Any, texts: list[str], *, chat_template: bool, device: torch.device,
           max_length: int | None = None) -> dict[str, torch.Tensor]:
    """Tokenize with padding on the tokenizer's own ``padding_side``. Chat-rendered text
    already holds its special tokens, so none are added a second time."""
    enc = tokenizer(texts, padding=True, return_tensors="pt", add_special_tokens=not chat_template,
                    truncation=max_length is not None, max_length=max_length)
    return {"input_ids": enc["input_ids"].to(device), "attention_mask": enc["attention_mask"].to(device)}


def completion_starts(tokenizer: Any, pairs: Sequence[ContrastPair], *, chat_template: bool,
                      max_length: int | None = None) -> list[int]:
    """Per text (positives, then negatives, as a batch holds them): the index of its first
    completion token, i.e. the length of the token prefix it shares with its prompt alone
    (a token merged across the boundary counts as completion); at least one token is
    always left. 0 for pairs without a prompt."""
    starts: list[list[int]] = [[], []]
    for pair in pairs:
        prefix = pair.prefix_text(tokenizer, chat_template)
        for side, text in enumerate(pair.texts(tokenizer, chat_template)):
            if not prefix:
                starts[side].append(0)
                continue
            kw = dict(add_special_tokens=not chat_template, truncation=max_length is not None, max_length=max_length)
            head, full = tokenizer(prefix, **kw)["input_ids"], tokenizer(text, **kw)["input_ids"]
            n = 0
            while n < min(len(head), len(full)) and head[n] == full[n]:
                n += 1
            starts[side].append(min(n, len(full) - 1))
    return starts[0] + starts[1]


def iter_pair_batches(model: nn.Module, tokenizer: Any, pairs: Sequence[ContrastPair], layers: list[int], *,
                      component: str = "residual", token_position: str = "last", batch_size: int = 8,
                      chat_template: bool = False, max_length: int | None = None,
                      progress: bool = False, desc: str = "extract") -> Iterator[PairBatch]:
    """Yield one ``PairBatch`` per batch of pairs; hooks live only while iterating."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not layers:
        raise ValueError("no layers requested")
    ensure_pad_token(tokenizer)
    from tqdm.auto import tqdm

    device = model_device(model)
    pass_positions = _accepts(model, "position_ids")
    extra = {"use_cache": False} if _accepts(model, "use_cache") else {}
    current: dict[str, dict[int, Any]] = {"acts": {}, "norms": {}, "stream": {}}

    def keep_acts(layer: int, pooled: torch.Tensor) -> None:
        current["acts"][layer] = pooled

    def keep_norms(layer: int, hidden: torch.Tensor) -> None:
        read = acts_hook.pool_mask if acts_hook.pool_mask is not None else norm_hook.attention_mask
        current["norms"][layer] = token_norms(hidden, read, token_position)
        current["stream"][layer] = stream_norms(hidden, norm_hook.attention_mask)

    acts_hook = ActivationHook(model, layers, component, token_position, reduce=keep_acts)
    norm_hook = ActivationHook(model, layers, "residual", "all", reduce=keep_norms)
    starts = range(0, len(pairs), batch_size)
    with acts_hook, norm_hook, stop_after_layer(model, max(layers)):
        for start in tqdm(starts, desc=desc, unit="batch", disable=not progress):
            chunk = pairs[start:start + batch_size]
            rendered = [pair.texts(tokenizer, chat_template) for pair in chunk]
            texts = [pos for pos, _ in rendered] + [neg for _, neg in rendered]
            inputs = encode(tokenizer, texts, chat_template=chat_template, device=device, max_length=max_length)
            if pass_positions:
                inputs["position_ids"] = position_ids_from_mask(inputs["attention_mask"])
            if token_position == "completion":  # read only the completion's tokens
                starts = completion_starts(tokenizer, chunk, chat_template=chat_template, max_length=max_length)
                acts_hook.pool_mask = completion_mask(inputs["attention_mask"], starts)
            current["acts"], current["norms"], current["stream"] = {}, {}, {}
            try:
                with torch.inference_mode():  # only here: a suspended generator must not leak it
                    model(**inputs, **extra)
            except StopForward:
                pass
            missing = [layer for layer in layers if layer not in current["acts"]]
            if missing:
                raise RuntimeError(f"the forward pass never reached layers {missing}")
            n = len(chunk)
            yield PairBatch(positive={layer: a[:n] for layer, a in current["acts"].items()},
                            negative={layer: a[n:] for layer, a in current["acts"].items()},
                            residual_norms=dict(current["norms"]), stream_norms=dict(current["stream"]))
