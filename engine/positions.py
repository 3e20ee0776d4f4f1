"""Position rules: which tokens of a sequence a request steers. The one definition.

A rule depends only on a token's absolute position in its sequence (0-based, counting
real tokens: no padding) and the prompt length. So chunked prefill, preemption and
recomputation in vLLM give the same answer as one uninterrupted pass, and the HF
injector (padded batches, KV cache) and the vLLM tables (flattened ragged batches)
compute the same token set from this module.

The mask functions take numpy arrays or torch tensors alike (only ``==``, ``<``, ``>=``,
``&``, ``|`` on broadcastable arrays).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

Positions = Literal["all", "prompt", "generated", "first", "last"]


@dataclass(frozen=True)
class PositionRule:
    name: str
    code: int
    doc: str
    prompt_relative: bool
    """True when the steered token set depends on where the prompt ends: the KV such a
    request computes may only be shared with requests of the same prompt length (the
    prefix-cache salt includes it), or a later turn would reuse steered "generated" KV as
    its unsteered prompt."""
    mask: Callable[[Any, Any], Any]
    """(positions, prompt_lens) -> bool array: is the token at ``positions`` steered."""


def _all(pos: Any, plen: Any) -> Any:
    return pos >= 0


RULES: dict[str, PositionRule] = {r.name: r for r in (
    PositionRule("all", 0, "every token: prompt and generated", False, _all),
    PositionRule("prompt", 1, "prompt tokens only", True, lambda pos, plen: pos < plen),
    PositionRule("generated", 2, "only tokens produced by generation (the prompt's logits stay unsteered)", True,
                 lambda pos, plen: pos >= plen),
    PositionRule("first", 3, "the first prompt token only (kept fixed while the KV cache decodes)", False,
                 lambda pos, plen: pos == 0),
    PositionRule("last", 4, "the last prompt token only (kept fixed while the KV cache decodes)", True,
                 lambda pos, plen: pos == plen - 1),
)}
POSITIONS: tuple[str, ...] = tuple(RULES)
POSITION_CODES: dict[str, int] = {name: rule.code for name, rule in RULES.items()}
POSITIONS_DOC: dict[str, str] = {name: rule.doc for name, rule in RULES.items()}


def check_positions(name: str) -> str:
    if name not in RULES:
        raise ValueError(f"positions must be one of {', '.join(POSITIONS)}; got {name!r}")
    return name


def steered_mask(positions: Any, prompt_lens: Any, rule: str) -> Any:
    """One rule for every token."""
    return RULES[check_positions(rule)].mask(positions, prompt_lens)


def steered_mask_by_code(positions: Any, prompt_lens: Any, codes: Any) -> Any:
    """Per-token rules given as ``POSITION_CODES`` (the vLLM tables: one rule per request,
    repeated per token)."""
    out = None
    for rule in RULES.values():
        term = (codes == rule.code) & rule.mask(positions, prompt_lens)
        out = term if out is None else out | term
    return out
