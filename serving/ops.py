"""The model-side ops: ``torch.ops.vsteer.steer_(hidden_states, layer)`` and
``torch.ops.vsteer.steer_residual_(hidden_states, residual, layer)``.

Registered like vLLM registers its own ops (``direct_register_custom_op`` with a fake
impl), in our own ``vsteer`` torch library. They take only the layer's outputs and a
layer index and read the persistent tables of this process (``vsteer.serving.tables``),
the way vLLM's attention op finds its KV cache by layer name. That keeps compiled graphs
and CUDA graphs valid across steps: they capture buffer addresses, never per-request data.

vLLM decoder blocks return either the residual stream itself (GPT-2 style) or
``(hidden_states, residual)`` whose sum is the stream (the next block's fused add-norm
adds them). ``add`` only needs ``hidden_states += v``; ablate, clamp and the norm rescale
need the stream itself, so for those tokens the op writes the new stream into
``residual`` and zeros ``hidden_states``: the sum the next block computes is exactly the
new stream. Tokens of add-only configs keep the plain add, bit for bit.

The operator math is ``vsteer.engine.operators`` (shared with the HF injectors).
"""

from __future__ import annotations

import torch

from vsteer.engine.operators import rescale_to, set_projections

from . import custom_ops
from .tables import SteeringTables

_TABLES: SteeringTables | None = None


def set_tables(tables: SteeringTables | None) -> None:
    global _TABLES
    _TABLES = tables


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _rows(tables: SteeringTables, n: int) -> torch.Tensor:
    if n > tables.rows.numel():
        raise RuntimeError(f"vsteer: {n} tokens in one forward, steering buffers hold {tables.rows.numel()}")
    return tables.rows[:n]


def _general_stream(stream: torch.Tensor, tables: SteeringTables, slot: int, rows: torch.Tensor,
                    full: bool) -> torch.Tensor:
    """The new stream for every token (float32): projections, add, norm rescale."""
    reference = stream.norm(dim=-1, keepdim=True)
    out = stream
    if tables.max_projections and (full or tables.general_active[slot]):
        out = set_projections(out, tables.proj_dirs[slot].index_select(0, rows),
                              tables.proj_targets[slot].index_select(0, rows))
    out = out + tables.tables[slot].index_select(0, rows).float()
    return rescale_to(out, reference, tables.norm_flags[slot].index_select(0, rows))


def _prepare(hidden_states: torch.Tensor, layer: int) -> tuple[SteeringTables, int, bool] | None:
    tables = _TABLES
    if tables is None:
        return None
    slot = tables.slot_of.get(layer)
    if slot is None:
        return None
    full = _capturing()
    # Eager fast path: skip layers nobody steers this step. Never while capturing a CUDA
    # graph: a replay must always run the (zero-row) update, whatever the step holds.
    if not full and not tables.layer_active[slot]:
        return None
    return tables, slot, full


def _add_or_begin(hidden_states: torch.Tensor, layer: int):
    """The common start of both entry points. Returns None when the layer is done: nobody
    steers it this step, or every row only adds (the fast path, applied here). Otherwise
    (tables, slot, full, flat rows of ``hidden_states``, table row per token)."""
    prepared = _prepare(hidden_states, layer)
    if prepared is None:
        return None
    tables, slot, full = prepared
    flat = hidden_states.view(-1, hidden_states.shape[-1])
    rows = _rows(tables, flat.shape[0])
    if not full and not tables.general_active[slot]:
        flat.add_(tables.tables[slot].index_select(0, rows))
        return None
    return tables, slot, full, flat, rows


def steer_(hidden_states: torch.Tensor, layer: int) -> None:
    """The block's output is the stream itself: update it in place."""
    begun = _add_or_begin(hidden_states, layer)
    if begun is None:
        return
    tables, slot, full, flat, rows = begun
    general = tables.general[slot].index_select(0, rows).unsqueeze(-1)
    plain = flat + tables.tables[slot].index_select(0, rows)
    new = _general_stream(flat.float(), tables, slot, rows, full).to(flat.dtype)
    flat.copy_(torch.where(general, new, plain))


def steer_residual_(hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    """The stream is ``hidden_states + residual``: update them so their sum is steered."""
    begun = _add_or_begin(hidden_states, layer)
    if begun is None:
        return
    tables, slot, full, flat, rows = begun
    res = residual.view(-1, residual.shape[-1])
    general = tables.general[slot].index_select(0, rows).unsqueeze(-1)
    plain = flat + tables.tables[slot].index_select(0, rows)
    new = _general_stream(flat.float() + res.float(), tables, slot, rows, full).to(res.dtype)
    flat.copy_(torch.where(general, torch.zeros_like(plain), plain))
    res.copy_(torch.where(general, new, res))


def _fake_stream(hidden_states: torch.Tensor, layer: int) -> None:
    return None


def _fake_residual(hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    return None


def register_op() -> None:
    """Idempotent; must run in every process that runs the model, before it is traced."""
    custom_ops.register("steer_", steer_, _fake_stream, tensors=("hidden_states",), mutates=("hidden_states",))
    custom_ops.register("steer_residual_", steer_residual_, _fake_residual, tensors=("hidden_states", "residual"),
                        mutates=("hidden_states", "residual"))


def hook_output(output: object, layer: int) -> None:
    """Call the right op on a decoder block's output (the forward hook body)."""
    if isinstance(output, (tuple, list)):
        hidden = output[0]
        residual = output[1] if len(output) > 1 else None
        if isinstance(residual, torch.Tensor) and residual.shape == hidden.shape:
            torch.ops.vsteer.steer_residual_(hidden, residual, layer)
            return
        torch.ops.vsteer.steer_(hidden, layer)
        return
    torch.ops.vsteer.steer_(output, layer)
