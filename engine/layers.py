"""Find decoder blocks and their attention / MLP sub-modules in Hugging Face models.

One locator serves the HF path and the vLLM workers alike: a user override
(``VSTEER_DECODER_LAYERS``), then known layouts (Llama, Qwen2/3, Mistral, Gemma/Gemma2/3,
GPT-2, GPT-NeoX, OPT; vLLM's models use the same ``model.layers``), then the longest
``nn.ModuleList`` whose blocks hold attention. Anything else gets a clear error.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from .settings import settings

Component = Literal["residual", "attn", "mlp"]
COMPONENTS: tuple[str, ...] = ("residual", "attn", "mlp")

LAYER_PATHS = (
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


def has_attention(block: nn.Module) -> bool:
    """A decoder block holds an attention module (HF: ``self_attn``/``attn``/...; vLLM: a
    sub-module whose class is an ``...Attention``)."""
    if any(isinstance(getattr(block, n, None), nn.Module) for n in _ATTN_NAMES):
        return True
    return any("attn" in type(m).__name__.lower() or "attention" in type(m).__name__.lower()
               for m in block.modules() if m is not block)


def _real(blocks: nn.ModuleList, placeholder: tuple[type, ...]) -> list[nn.Module]:
    return [b for b in blocks if not (placeholder and isinstance(b, placeholder))]


def _is_decoder_list(module: object, placeholder: tuple[type, ...]) -> bool:
    """Most real blocks hold attention (hybrid models mix in other blocks)."""
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        return False
    real = _real(module, placeholder)
    return bool(real) and 2 * sum(has_attention(b) for b in real) >= len(real)


def locate_decoder_layers(model: nn.Module, *, placeholder: tuple[type, ...] = ()) -> tuple[str, nn.ModuleList]:
    """(attribute path, the decoder blocks in order). One locator for the HF injectors,
    extraction and the vLLM workers; block L's output is our layer L.

    Order: ``VSTEER_DECODER_LAYERS`` (an attribute path, for models nothing below
    recognises), the known layouts in ``LAYER_PATHS``, then the longest ``ModuleList`` most
    of whose blocks hold attention, preferring a language model's list over a vision
    tower's or an encoder's. ``placeholder`` types (vLLM's ``PPMissingLayer``: blocks of
    other pipeline stages) are ignored when judging a list.
    """
    override = settings().decoder_layers
    if override:
        found = _get(model, override)
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            raise ValueError(f"VSTEER_DECODER_LAYERS={override!r} does not name a non-empty ModuleList of "
                             f"{type(model).__name__}")
        return override, found
    for path in LAYER_PATHS:
        found = _get(model, path)
        if _is_decoder_list(found, placeholder):
            return path, found  # type: ignore[return-value]
    candidates = []
    for name, module in model.named_modules():
        if _is_decoder_list(module, placeholder):
            language = not any(k in name.lower() for k in ("vision", "visual", "encoder", "audio"))
            candidates.append((language, len(module), name, module))
    if candidates:
        _, _, name, module = max(candidates, key=lambda c: (c[0], c[1]))
        return name, module
    raise ValueError(
        f"cannot find the decoder layers of {type(model).__name__}: expected a ModuleList of blocks holding an "
        f"attention module (looked at {', '.join(LAYER_PATHS)}); set VSTEER_DECODER_LAYERS to its attribute path")


def find_decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, in order. Block L's output is our layer L."""
    return locate_decoder_layers(model)[1]


def decoder_layer_map(model: nn.Module, *, placeholder: tuple[type, ...] = ()) -> dict[int, nn.Module]:
    """Absolute layer index -> block, for the blocks this process owns (with pipeline
    parallelism, vLLM fills the other stages' places with ``placeholder`` modules)."""
    blocks = locate_decoder_layers(model, placeholder=placeholder)[1]
    return {i: b for i, b in enumerate(blocks) if not (placeholder and isinstance(b, placeholder))}


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
