"""The model-side op: ``torch.ops.vsteer.add_steering_(hidden_states, layer)``.

Registered like vLLM registers its own ops (``direct_register_custom_op`` with a fake
impl), in our own ``vsteer`` torch library. It takes only the hidden states and a layer
index and reads the persistent tables of this process (``vsteer.serving.tables``), the
way vLLM's attention op finds its KV cache by layer name. That keeps compiled graphs and
CUDA graphs valid across steps: they capture buffer addresses, never per-request data.
"""

from __future__ import annotations

import torch
from torch.library import Library

from .tables import SteeringTables

_LIB = Library("vsteer", "FRAGMENT")  # lives as long as the op
_TABLES: SteeringTables | None = None
_REGISTERED = False


def set_tables(tables: SteeringTables | None) -> None:
    global _TABLES
    _TABLES = tables


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def add_steering_(hidden_states: torch.Tensor, layer: int) -> None:
    """hidden_states[t] += tables[slot(layer)][rows[t]] for every token t, in place."""
    tables = _TABLES
    if tables is None:
        return
    slot = tables.slot_of.get(layer)
    if slot is None:
        return
    # Eager fast path: skip layers nobody steers this step. Never while capturing a CUDA
    # graph: a replay must always run the (zero-row) add, whatever the step holds.
    if not tables.layer_active[slot] and not _capturing():
        return
    flat = hidden_states.view(-1, hidden_states.shape[-1])
    n = flat.shape[0]
    if n > tables.rows.numel():
        raise RuntimeError(f"vsteer: {n} tokens in one forward, steering buffers hold {tables.rows.numel()}")
    flat.add_(tables.tables[slot].index_select(0, tables.rows[:n]))


def _add_steering_fake(hidden_states: torch.Tensor, layer: int) -> None:
    return None


def register_op() -> None:
    """Idempotent; must run in every process that runs the model, before it is traced."""
    global _REGISTERED
    if _REGISTERED or hasattr(torch.ops.vsteer, "add_steering_"):
        _REGISTERED = True
        return
    try:
        from vllm.utils.torch_utils import direct_register_custom_op
    except ImportError:  # plain torch (HF-only installs, unit tests)
        direct_register_custom_op = None
    if direct_register_custom_op is not None:
        direct_register_custom_op("add_steering_", add_steering_, mutates_args=["hidden_states"],
                                  fake_impl=_add_steering_fake, target_lib=_LIB)
    else:
        _LIB.define("add_steering_(Tensor(a!) hidden_states, int layer) -> ()")
        _LIB.impl("add_steering_", add_steering_, "CompositeExplicitAutograd")
        _LIB._register_fake("add_steering_", _add_steering_fake)
    _REGISTERED = True
