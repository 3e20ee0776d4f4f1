"""Which tokens of a padded batch an activation is read from.

Everything here goes through the attention mask, so left and right padding give the
same answer, and padded positions (whose hidden states may even be NaN for fully masked
rows) never leak in: they are selected away or masked out, never multiplied by zero.
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

import torch

TokenPosition = Literal["last", "first", "mean", "completion"]
TOKEN_POSITIONS: tuple[str, ...] = ("last", "first", "mean")
"""The rules every extraction engine reads (the vLLM engine's capture knows these)."""
HF_TOKEN_POSITIONS: tuple[str, ...] = TOKEN_POSITIONS + ("completion",)
"""``completion``: the mean over the completion's tokens (the prompt's left out); HF engine."""
CLI_TOKEN_POSITIONS: tuple[str, ...] = ("auto",) + HF_TOKEN_POSITIONS


def check_token_position(position: str, *, allow_all: bool = False, allow_completion: bool = False) -> str:
    allowed = (HF_TOKEN_POSITIONS if allow_completion else TOKEN_POSITIONS) + (("all",) if allow_all else ())
    if position not in allowed:
        raise ValueError(f"token_position must be one of {', '.join(allowed)}; got {position!r}")
    return position


def choose_token_position(pairs: Sequence[Any], chat_template: bool = False) -> tuple[str, str]:
    """The position ``auto`` stands for, and why (``vsteer extract`` prints both).

    Pairs that share a prompt and differ in their completions (``prompt`` set on every
    pair, or a chat template around them) are read over the completion tokens: the prompt
    is the same on both sides and would only dilute the difference. Whole-sentence pairs
    (topic swaps from ``vsteer pairs topic``) are read as the mean over the sentence: their
    last token is the same full stop on both sides, where the difference is faint."""
    if chat_template:
        return "completion", "chat-rendered pairs: the mean over the completion (reply) tokens"
    prompted = sum(1 for p in pairs if p.prompt.strip())
    if pairs and prompted == len(pairs):
        return "completion", "every pair shares a prompt: the mean over the completion tokens"
    what = "whole-sentence pairs (no prompt)" if prompted == 0 else f"{prompted} of {len(pairs)} pairs have a prompt"
    return "mean", f"{what}: the mean over each text's tokens"


def align_mask(mask: torch.Tensor | None, hidden: torch.Tensor) -> torch.Tensor:
    """A bool [batch, tokens] mask matching ``hidden`` [batch, tokens, dim]; all ones if none
    (and the trailing columns when a KV cache makes the forward shorter than the mask)."""
    batch, tokens = hidden.shape[0], hidden.shape[1]
    if mask is None:
        return torch.ones(batch, tokens, dtype=torch.bool, device=hidden.device)
    if mask.dim() != 2 or mask.shape[0] != batch or mask.shape[1] < tokens:
        raise ValueError(f"attention mask of shape {tuple(mask.shape)} does not fit hidden states "
                         f"{tuple(hidden.shape)}")
    return mask[:, -tokens:].to(device=hidden.device, dtype=torch.bool)


def token_indices(mask: torch.Tensor, position: str) -> torch.Tensor:
    """Index of the first or last real token of each row ([batch], long)."""
    tokens = mask.shape[1]
    idx = torch.arange(tokens, device=mask.device).expand_as(mask)
    if position == "last":
        return torch.where(mask, idx, -1).amax(dim=1).clamp_min(0)
    if position == "first":
        return torch.where(mask, idx, tokens).amin(dim=1).clamp_max(tokens - 1)
    raise ValueError(f"no single index for token position {position!r}")


def pool_tokens(hidden: torch.Tensor, mask: torch.Tensor | None, position: str) -> torch.Tensor:
    """[batch, tokens, dim] -> float32 [batch, dim] at ``position`` (last/first/mean real token;
    ``completion``: the mean over ``mask``, which the caller narrowed to the completion)."""
    check_token_position(position, allow_completion=True)
    m = align_mask(mask, hidden)
    if position in ("mean", "completion"):
        summed = hidden.float().masked_fill(~m.unsqueeze(-1), 0.0).sum(dim=1)
        return summed / m.sum(dim=1, keepdim=True).clamp_min(1).float()
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    return hidden[rows, token_indices(m, position)].float()


def token_norms(hidden: torch.Tensor, mask: torch.Tensor | None, position: str) -> torch.Tensor:
    """Per-row L2 norm of the states read at ``position`` ([batch], float32); for ``mean``,
    the average per-token norm (the scale a vector added at every token competes with),
    not the norm of the averaged state."""
    check_token_position(position, allow_completion=True)
    m = align_mask(mask, hidden)
    if position not in ("mean", "completion"):
        return pool_tokens(hidden, m, position).norm(dim=-1)
    norms = hidden.float().norm(dim=-1).masked_fill(~m, 0.0)
    return norms.sum(dim=1) / m.sum(dim=1).clamp_min(1).float()


def stream_norms(hidden: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: (sum of per-token L2 norms, token count) over the real tokens but the first.

    The first token of a sequence often carries a norm many times the others (an
    "attention sink"); leaving it out gives the scale a steering vector added at the
    other tokens competes with, the unit of relative strengths. Rows with one real token
    keep it."""
    m = align_mask(mask, hidden)
    first = token_indices(m, "first")
    rows = torch.arange(hidden.shape[0], device=hidden.device)
    keep = m.clone()
    keep[rows, first] = m.sum(dim=1) <= 1
    norms = hidden.float().norm(dim=-1).masked_fill(~keep, 0.0)
    return norms.sum(dim=1).double(), keep.sum(dim=1).double()


def completion_mask(mask: torch.Tensor, starts: Sequence[int]) -> torch.Tensor:
    """``mask`` [batch, tokens] narrowed to each row's real tokens from index ``starts[row]``
    on (the completion; counted over real tokens, so either padding side works)."""
    m = mask.bool()
    index = m.long().cumsum(dim=1) - 1
    start = torch.tensor(list(starts), device=mask.device).unsqueeze(1)
    return m & (index >= start)
