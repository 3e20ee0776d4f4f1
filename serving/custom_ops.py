"""Register vsteer's custom ops the way vLLM registers its own.

The steering op (``ops``) and the extraction capture op (``capture``) are both in-place
ops on a decoder block's outputs that read persistent buffers of this process. They are
registered with vLLM's ``direct_register_custom_op`` (so torch.compile treats them as
opaque, with a fake impl for tracing) in vsteer's own ``vsteer`` torch library; without
vLLM (HF-only installs, unit tests, the GPU check) plain ``torch.library`` does the same.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.library import Library

LIB = Library("vsteer", "FRAGMENT")  # lives as long as the ops


def _schema_args(mutates: Sequence[str], tensors: Sequence[str]) -> str:
    marks = iter("abcdefgh")
    return ", ".join(f"Tensor({next(marks)}!) {name}" if name in mutates else f"Tensor {name}" for name in tensors)


def register(name: str, fn: Callable[..., None], fake: Callable[..., None], *, tensors: Sequence[str],
             mutates: Sequence[str]) -> None:
    """``torch.ops.vsteer.<name>(*tensors, int layer) -> ()``, once per process."""
    if hasattr(torch.ops.vsteer, name):
        return
    try:
        from vllm.utils.torch_utils import direct_register_custom_op
    except ImportError:
        direct_register_custom_op = None
    if direct_register_custom_op is not None:
        direct_register_custom_op(name, fn, mutates_args=list(mutates), fake_impl=fake, target_lib=LIB)
        return
    LIB.define(f"{name}({_schema_args(mutates, tensors)}, int layer) -> ()")
    LIB.impl(name, fn, "CompositeExplicitAutograd")
    LIB._register_fake(name, fake)
