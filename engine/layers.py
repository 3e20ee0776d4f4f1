"""Find decoder blocks and their attention / MLP sub-modules in Hugging Face models.

Known layouts are tried first (Llama, Qwen2/3, Mistral, Gemma/Gemma2/3, GPT-2,
GPT-NeoX, OPT); otherwise the largest ``nn.ModuleList`` whose children each hold an
attention module is taken. Anything else gets a clear error.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

Component = Literal["residual", "attn", "mlp"]
COMPONENTS: tuple[str, ...] = ("residual", "attn", "mlp")

_LAYER_PATHS = (
    "model.layers",                      # Llama, Qwen2/3, Mistral, Gemma/Gemma2 (ForCausalLM)
    "model.language_model.layers",       # Gemma3 (ForConditionalGeneration), other VLM wrappers
    "language_model.model.layers",
    "model.model.layers",
    "layers",                            # a bare decoder (LlamaModel)
    "transformer.h",                     # GPT-2, GPT-J
    "h",
    "gpt_neox.layers",                   # GPT-NeoX, Pythia
    "model.decoder.layers",              # OPT
    "decoder.layers",
)
_ATTN_NAMES = ("self_attn", "attn", "attention", "self_attention")
_MLP_NAMES = ("mlp", "feed_forward", "ffn")
_MLP_OUT_NAMES = ("fc2",)                # OPT has no MLP module: fc2's output is the MLP output


def _get(obj: nn.Module, path: str) -> nn.Module | None:
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _has_attention(block: nn.Module) -> bool:
    return any(isinstance(getattr(block, n, None), nn.Module) for n in _ATTN_NAMES) or any(
        "attn" in type(m).__name__.lower() or "attention" in type(m).__name__.lower() for m in block.children())


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, in order. Block L's output is our layer L."""
    for path in _LAYER_PATHS:
        layers = _get(model, path)
        if isinstance(layers, nn.ModuleList) and len(layers) > 0 and _has_attention(layers[0]):
            return layers
    candidates = [m for m in model.modules()
                  if isinstance(m, nn.ModuleList) and len(m) > 0 and all(_has_attention(c) for c in m)]
    if candidates:
        return max(candidates, key=len)
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: expected a ModuleList of blocks holding an "
        f"attention module at one of {', '.join(_LAYER_PATHS)}")


def num_decoder_layers(model: nn.Module) -> int:
    return len(find_decoder_layers(model))


def component_module(block: nn.Module, component: Component) -> nn.Module:
    """The sub-module whose output is ``component`` (the block itself for ``residual``)."""
    if component == "residual":
        return block
    names = _ATTN_NAMES if component == "attn" else _MLP_NAMES + _MLP_OUT_NAMES
    for n in names:
        m = getattr(block, n, None)
        if isinstance(m, nn.Module):
            return m
    raise ValueError(f"{type(block).__name__} has no {component} module (looked for {', '.join(names)})")


def output_tensor(output: object) -> torch.Tensor:
    """The hidden states in a module's output: transformers 5 blocks return a plain tensor,
    older ones and attention modules a tuple whose first item is the hidden states."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find hidden states in a module output of type {type(output).__name__}")


def replace_output_tensor(output: object, new: torch.Tensor) -> object:
    """``output`` with its hidden states replaced, keeping the container shape."""
    if isinstance(output, torch.Tensor):
        return new
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    raise TypeError(f"cannot replace hidden states in a module output of type {type(output).__name__}")


def model_hidden_size(model: nn.Module) -> int:
    cfg = getattr(model, "config", None)
    cfg = getattr(cfg, "get_text_config", lambda: cfg)() if cfg is not None else None
    for attr in ("hidden_size", "n_embd", "d_model"):
        if cfg is not None and getattr(cfg, attr, None):
            return int(getattr(cfg, attr))
    raise ValueError(f"cannot read the hidden size of {type(model).__name__} from its config")
