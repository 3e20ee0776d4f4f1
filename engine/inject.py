"""Steering a Hugging Face model with forward hooks (research use; vLLM is the fast path).

Every injector here adds, after decoder block L, the sum of its vectors for layer L to the
tokens its ``positions`` rule names. The rule is decided per forward pass from the KV-cache
length, so it stays right while ``model.generate`` decodes one token per step:

* ``all``: every real token; ``prompt``: prompt tokens; ``generated``: tokens produced by
  generation (so the prompt's logits equal an unsteered run);
* ``first`` / ``last``: the first / last real prompt token only. These are the seed's
  (rotalabs-steer) mode names; there they turned into "every generated token" once the KV
  cache was on, here they keep their prefill meaning.

The rules themselves are defined once, in ``vsteer.engine.positions``.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import torch
from torch import nn

from .layers import find_decoder_layers, output_tensor, replace_output_tensor
from .operators import LayerPlan, apply_plan
from .positions import check_positions, steered_mask
from .resolver import ResolvedSteering
from .vectors import SteeringVector, SteeringVectorSet


def _past_length(kwargs: Mapping[str, Any]) -> int:
    cache_position = kwargs.get("cache_position")
    if isinstance(cache_position, torch.Tensor) and cache_position.numel() > 0:
        return int(cache_position.reshape(-1)[0])
    pkv = kwargs.get("past_key_values")
    if pkv is None:
        return 0
    if hasattr(pkv, "get_seq_length"):
        return int(pkv.get_seq_length())
    try:  # legacy tuple-of-tuples cache
        return int(pkv[0][0].shape[-2])
    except Exception:
        return 0


class SteeringHooks:
    """Adds ``layer_vectors()[L]`` after block L at the tokens ``positions`` names.

    Subclasses decide what the per-layer vectors are. Use as a context manager, or call
    ``attach()`` / ``detach()``.
    """

    def __init__(self, model: nn.Module, positions: str = "all"):
        self.model = model
        self.positions = check_positions(positions)
        self.blocks = find_decoder_layers(model)
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._mask: torch.Tensor | None = None          # [batch, tokens] for the current forward
        self._prompt_mask: torch.Tensor | None = None   # [batch, padded prompt length]
        self._cast_cache: dict[tuple[int, torch.dtype, torch.device], torch.Tensor] = {}
        self._plans: dict[int, LayerPlan] | None = None

    # -- what to apply -----------------------------------------------------------------
    def layer_vectors(self) -> dict[int, torch.Tensor]:
        """Layer -> vector to add (subclasses that only add implement this)."""
        raise NotImplementedError

    def layer_plans(self) -> dict[int, LayerPlan]:
        """Layer -> what to do there (``vsteer.engine.operators``); by default an add."""
        return {layer: LayerPlan(add=vec) for layer, vec in self.layer_vectors().items()}

    def _invalidate(self) -> None:
        self._cast_cache.clear()
        self._plans = None

    def _plan_for(self, layer: int) -> LayerPlan | None:
        if self._plans is None:
            self._plans = self.layer_plans()
        return self._plans.get(layer)

    def _vector_for(self, layer: int, like: torch.Tensor) -> torch.Tensor | None:
        key = (layer, like.dtype, like.device)
        vec = self._cast_cache.get(key)
        if vec is None:
            plan = self._plan_for(layer)
            src = plan.add if plan is not None else None
            if src is None:
                return None
            if src.numel() != like.shape[-1]:
                raise ValueError(f"layer {layer}: vector has {src.numel()} dims, the model's hidden size is "
                                 f"{like.shape[-1]}")
            vec = self._cast_cache[key] = src.to(device=like.device, dtype=like.dtype)
        return vec

    # -- hooks -------------------------------------------------------------------------
    def attach(self) -> "SteeringHooks":
        if self._handles:
            return self
        n = len(self.blocks)
        self._plans = None
        layers = sorted(self.layer_plans())
        bad = [layer for layer in layers if not 0 <= layer < n]
        if bad:
            raise ValueError(f"layers {bad} are outside the model's 0..{n - 1}")
        self._handles.append(self.model.register_forward_pre_hook(self._before_forward, with_kwargs=True))
        for layer in layers:
            self._handles.append(self.blocks[layer].register_forward_hook(self._make_layer_hook(layer)))
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._mask = self._prompt_mask = None

    def __enter__(self) -> "SteeringHooks":
        return self.attach()

    def __exit__(self, *exc: object) -> None:
        self.detach()

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs.get("inputs_embeds")
        if ids is None:
            self._mask = None
            return
        batch, tokens = ids.shape[0], ids.shape[1]
        device = ids.device
        past = _past_length(kwargs)
        attn = kwargs.get("attention_mask")
        if past == 0:
            if isinstance(attn, torch.Tensor) and attn.dim() == 2:
                self._prompt_mask = attn[:, :tokens].to(device=device).bool()
            else:
                self._prompt_mask = torch.ones(batch, tokens, dtype=torch.bool, device=device)
        prompt = self._prompt_mask
        if prompt is None or prompt.shape[0] != batch:  # attached mid-generation: all is generated
            prompt = torch.zeros(batch, 0, dtype=torch.bool, device=device)
        self._mask = self._position_mask(prompt, past, tokens)

    def _position_mask(self, prompt: torch.Tensor, past: int, tokens: int) -> torch.Tensor:
        """Which of this forward's tokens (padded indices past..past+tokens-1) to steer.

        Padded indices become real positions (prompt tokens counted over the attention
        mask, generated tokens after the real prompt), so the rule in
        ``vsteer.engine.positions`` sees exactly what vLLM's tables see."""
        batch, plen = prompt.shape
        device = prompt.device
        idx = torch.arange(past, past + tokens, device=device).unsqueeze(0)          # [1, tokens]
        real_plen = prompt.sum(dim=1, keepdim=True)                                    # [batch, 1]
        in_prompt = idx < plen
        if plen:
            clamped = idx.clamp(max=plen - 1).expand(batch, tokens)
            prompt_pos = (prompt.long().cumsum(dim=1) - 1).gather(1, clamped)
            is_real = torch.where(in_prompt, prompt.gather(1, clamped), True)
        else:
            prompt_pos = torch.zeros(batch, tokens, dtype=torch.long, device=device)
            is_real = torch.ones(batch, tokens, dtype=torch.bool, device=device)
        positions = torch.where(in_prompt, prompt_pos, real_plen + (idx - plen))
        return steered_mask(positions, real_plen, self.positions) & is_real

    def _make_layer_hook(self, layer: int):
        def hook(module: nn.Module, inputs: tuple, output: Any) -> Any:
            hidden = output_tensor(output)
            plan = self._plan_for(layer)
            if plan is None:
                return output
            if plan.is_add_only:  # the plain add, exactly as vLLM's add-only path computes it
                vec = self._vector_for(layer, hidden)
                if vec is None:
                    return output
                steered = hidden + vec
            else:
                steered = apply_plan(hidden, plan)
            mask = self._mask
            if mask is None or mask.shape != hidden.shape[:2]:
                return replace_output_tensor(output, steered)
            return replace_output_tensor(output, torch.where(mask.unsqueeze(-1), steered, hidden))
        return hook


def _sum_by_layer(pairs: Iterable[tuple[int, torch.Tensor]]) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    for layer, vec in pairs:
        out[layer] = vec.clone() if layer not in out else out[layer] + vec
    return out


class ActivationInjector(SteeringHooks):
    """Add steering vectors at one strength. Several vectors on one layer add up.

    ``vectors`` may be a ``SteeringVector``, a list of them, or a ``SteeringVectorSet``.
    ``injection_mode`` is accepted as the seed's name for ``positions``.
    """

    def __init__(self, model: nn.Module, vectors: SteeringVector | SteeringVectorSet | Iterable[SteeringVector],
                 strength: float = 1.0, positions: str = "all", *, injection_mode: str | None = None):
        if isinstance(vectors, (SteeringVector, SteeringVectorSet)):
            vectors = [vectors] if isinstance(vectors, SteeringVector) else list(vectors)
        self.vectors = list(vectors)
        self.strength = float(strength)
        super().__init__(model, injection_mode or positions)
        self._sums = _sum_by_layer((v.layer, v.vector) for v in self.vectors)

    def set_strength(self, value: float) -> None:
        self.strength = float(value)
        self._invalidate()

    def layer_vectors(self) -> dict[int, torch.Tensor]:
        return {layer: v * self.strength for layer, v in self._sums.items()}


class MultiVectorInjector(SteeringHooks):
    """Compose several behaviours, each with its own strength, changeable at run time."""

    def __init__(self, model: nn.Module, vector_sets: Mapping[str, SteeringVectorSet] | Iterable[SteeringVectorSet],
                 strengths: Mapping[str, float] | None = None, positions: str = "all"):
        if not isinstance(vector_sets, Mapping):
            vector_sets = {vs.behaviour: vs for vs in vector_sets}
        self.vector_sets = dict(vector_sets)
        self.strengths = {name: 1.0 for name in self.vector_sets}
        for name, value in (strengths or {}).items():
            self._check_name(name)
            self.strengths[name] = float(value)
        super().__init__(model, positions)
        self._layers_cache: dict[int, torch.Tensor] | None = None

    def _check_name(self, name: str) -> None:
        if name not in self.vector_sets:
            raise KeyError(f"unknown vector set {name!r}; this injector has {sorted(self.vector_sets)}")

    def set_strength(self, name: str, value: float) -> None:
        self._check_name(name)
        self.strengths[name] = float(value)
        self._layers_cache = None
        self._invalidate()

    def layer_vectors(self) -> dict[int, torch.Tensor]:
        if self._layers_cache is None:
            self._layers_cache = _sum_by_layer(
                (layer, vec * self.strengths[name])
                for name, vs in sorted(self.vector_sets.items()) for layer, vec in vs.vectors.items())
        return self._layers_cache


class SpecInjector(SteeringHooks):
    """Apply a resolved ``SteeringSpec`` (the per-request type, every operator) to an HF
    model: the reference that the vLLM path is tested against."""

    def __init__(self, model: nn.Module, resolved: ResolvedSteering | None):
        super().__init__(model, resolved.positions if resolved else "all")
        self.resolved = resolved

    def layer_plans(self) -> dict[int, LayerPlan]:
        return self.resolved.plans() if self.resolved else {}

    def layer_vectors(self) -> dict[int, torch.Tensor]:
        return dict(self.resolved.layer_vectors) if self.resolved else {}
