"""Read hidden states out of a Hugging Face model with forward hooks.

One ``ActivationHook`` watches any number of layers, so one forward pass yields every
layer's activations. It reads the block output (``residual``: our layer L, see
``vsteer.engine.vectors``) or the attention / MLP sub-module output of each block, and
either stores them (``captured``) or hands them to a ``reduce`` callback, so a caller can
fold them into running sums without keeping a whole dataset's activations.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from torch import nn

from vsteer.engine.layers import COMPONENTS, component_module, find_decoder_layers, output_tensor

from .positions import check_token_position, pool_tokens

Reducer = Callable[[int, torch.Tensor], None]


def normalize_layers(layers: int | Iterable[int] | str, num_layers: int) -> list[int]:
    """``"all"``, one int or ints (negative counts from the end) -> sorted, checked layers."""
    if isinstance(layers, str):
        if layers != "all":
            raise ValueError(f"layers must be 'all' or a list of ints, got {layers!r}")
        return list(range(num_layers))
    wanted = [layers] if isinstance(layers, int) else list(layers)
    if not wanted:
        raise ValueError("no layers requested")
    out = []
    for layer in wanted:
        if isinstance(layer, bool) or not isinstance(layer, int):
            raise TypeError(f"layers must be ints, got {layer!r}")
        real = layer + num_layers if layer < 0 else layer
        if not 0 <= real < num_layers:
            raise ValueError(f"layer {layer} is outside the model's 0..{num_layers - 1}")
        out.append(real)
    if len(set(out)) != len(out):
        raise ValueError(f"layers {wanted} name a layer twice")
    return sorted(out)


class ActivationHook:
    """Capture the activations of ``layers`` on every forward of ``model``.

    ``component``: ``residual`` (block output), ``attn`` or ``mlp`` (that sub-module's
    output). ``token_position``: ``last``/``first``/``mean`` pool each row to [batch, dim]
    (float32) using the attention mask passed to ``model(...)`` as a keyword; ``all`` keeps
    [batch, tokens, dim] as the model produced it. With ``reduce(layer, activation)`` the
    activations go to the callback instead of ``captured``.
    """

    def __init__(self, model: nn.Module, layers: int | Iterable[int] | str = "all", component: str = "residual",
                 token_position: str = "all", reduce: Reducer | None = None):
        if component not in COMPONENTS:
            raise ValueError(f"component must be one of {', '.join(COMPONENTS)}; got {component!r}")
        self.model = model
        self.blocks = find_decoder_layers(model)
        self.layers = normalize_layers(layers, len(self.blocks))
        self.component = component
        self.token_position = check_token_position(token_position, allow_all=True, allow_completion=True)
        self.reduce = reduce
        self.modules = {layer: component_module(self.blocks[layer], component) for layer in self.layers}
        self.captured: dict[int, torch.Tensor] = {}
        self.attention_mask: torch.Tensor | None = None
        self.pool_mask: torch.Tensor | None = None
        """Set by a caller to pool over these tokens instead of the attention mask's
        (``completion``: the completion's tokens)."""
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self) -> "ActivationHook":
        if self._handles:
            return self
        self._handles.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        for layer, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(layer)))
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "ActivationHook":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self.attention_mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self.captured = {}

    def _make_hook(self, layer: int) -> Callable[..., None]:
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            hidden = output_tensor(output).detach()
            if self.token_position != "all":
                mask = self.pool_mask if self.pool_mask is not None else self.attention_mask
                hidden = pool_tokens(hidden, mask, self.token_position)
            if self.reduce is not None:
                self.reduce(layer, hidden)
            else:
                self.captured[layer] = hidden
        return hook


class StopForward(Exception):
    """Raised by ``stop_after_layer`` to end a forward pass once the wanted layers ran."""


class stop_after_layer:
    """Abort the forward pass right after decoder block ``layer``.

    Extraction needs nothing past the deepest requested block, so skipping the rest (and
    the LM head's [tokens x vocab] matmul) saves time. Register it after the capture hooks
    so they run first; catch ``StopForward`` around the model call.
    """

    def __init__(self, model: nn.Module, layer: int):
        self.block = find_decoder_layers(model)[layer]
        self._handle: torch.utils.hooks.RemovableHandle | None = None

    def __enter__(self) -> "stop_after_layer":
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            raise StopForward
        self._handle = self.block.register_forward_hook(hook)
        return self

    def __exit__(self, *exc: object) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
