"""Completion likelihoods under added vectors: what the trained method (``trained``)
optimises and what ``quality`` checks a written vector against.

``AddVectors`` adds one tensor per layer (which may require grad) to every token of the
output of decoder block L, our layer L, as ``{"op": "add", "positions": "all"}`` does in
the server. ``completion_logprobs`` sums each text's token log-probabilities over its
completion (``runner.completion_starts``; the whole text after the first token for a pair
without a prompt).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from vsteer.engine.layers import find_decoder_layers, output_tensor, replace_output_tensor

from .pairs import ContrastPair
from .runner import _accepts, completion_starts, encode, ensure_pad_token, model_device, position_ids_from_mask


class AddVectors:
    """Add ``vectors[L] * scale`` after block L, at every token, while the context is open."""

    def __init__(self, model: nn.Module, vectors: Mapping[int, torch.Tensor], scale: float = 1.0):
        self.blocks = find_decoder_layers(model)
        self.vectors, self.scale = dict(vectors), scale
        self._handles: list[Any] = []

    def _hook(self, layer: int):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
            hidden = output_tensor(output)
            vec = self.vectors[layer].to(dtype=hidden.dtype, device=hidden.device)
            return replace_output_tensor(output, hidden + self.scale * vec)
        return hook

    def __enter__(self) -> "AddVectors":
        self._handles = [self.blocks[layer].register_forward_hook(self._hook(layer)) for layer in self.vectors]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def encode_pairs(tokenizer: Any, pairs: Sequence[ContrastPair], *, chat_template: bool = False,
                 max_length: int | None = None, device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The pairs' texts (positives, then negatives) as one padded batch, plus ``score``: the
    [2n, tokens-1] mask of the target tokens whose log-probabilities count (completion
    tokens, never a text's first token)."""
    ensure_pad_token(tokenizer)
    texts = [t for side in (0, 1) for t in (pair.texts(tokenizer, chat_template)[side] for pair in pairs)]
    enc = encode(tokenizer, texts, chat_template=chat_template, device=torch.device(device), max_length=max_length)
    starts = torch.tensor(completion_starts(tokenizer, pairs, chat_template=chat_template, max_length=max_length),
                          device=enc["attention_mask"].device)
    mask = enc["attention_mask"].bool()
    index = mask.long().cumsum(dim=1) - 1
    targets = mask & (index >= starts.clamp_min(1).unsqueeze(1))
    return {**enc, "score": targets[:, 1:]}


def completion_logprobs(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """[texts] summed log-probabilities of the scored tokens (grad flows if anything needs it)."""
    kw: dict[str, Any] = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if _accepts(model, "position_ids"):
        kw["position_ids"] = position_ids_from_mask(batch["attention_mask"])
    if _accepts(model, "use_cache"):
        kw["use_cache"] = False
    logits = model(**kw).logits[:, :-1].float()
    target = batch["input_ids"][:, 1:]
    lp = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
    return (lp * batch["score"]).sum(dim=1)


def pair_margins(model: nn.Module, tokenizer: Any, pairs: Sequence[ContrastPair],
                 vectors: Mapping[int, torch.Tensor] | None = None, *, batch_size: int = 8,
                 chat_template: bool = False, max_length: int | None = None) -> torch.Tensor:
    """[pairs] log p(positive completion) - log p(negative completion), with ``vectors``
    added (none: the plain model). No grad."""
    device = model_device(model)
    out = []
    with torch.inference_mode(), AddVectors(model, vectors or {}):
        for start in range(0, len(pairs), batch_size):
            chunk = list(pairs[start:start + batch_size])
            lp = completion_logprobs(model, encode_pairs(tokenizer, chunk, chat_template=chat_template,
                                                         max_length=max_length, device=device))
            out.append((lp[:len(chunk)] - lp[len(chunk):]).double().cpu())
    return torch.cat(out)
