"""Decoder-layer discovery for the HF layouts vsteer supports, on tiny random models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from vsteer.engine.layers import component_module, find_decoder_layers, model_hidden_size

ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {}),
    "mistral": ("MistralConfig", "MistralForCausalLM", {}),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", {}),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", {}),
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", {}),
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", {"n_embd": 32, "n_layer": 3, "n_head": 2, "vocab_size": 64}),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM", {}),
    "opt": ("OPTConfig", "OPTForCausalLM", {"word_embed_proj_dim": 32, "ffn_dim": 64}),
}
COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
              vocab_size=64, head_dim=16, max_position_embeddings=64, ffn_dim=64)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_find_layers_and_components(arch):
    import transformers

    cfg_name, model_name, extra = ARCHS[arch]
    cfg_cls = getattr(transformers, cfg_name)
    kwargs = {k: v for k, v in {**COMMON, **extra}.items() if arch != "gpt2" or k in extra}
    model = getattr(transformers, model_name)(cfg_cls(**kwargs)).eval()
    layers = find_decoder_layers(model)
    assert len(layers) == 3
    assert model_hidden_size(model) == 32
    seen = {}
    for comp in ("residual", "attn", "mlp"):
        mod = component_module(layers[1], comp)
        mod.register_forward_hook(lambda m, i, o, comp=comp: seen.setdefault(comp, o))
    with torch.no_grad():
        model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert set(seen) == {"residual", "attn", "mlp"}


def test_unknown_layout_is_a_clear_error():
    class NoLayers(nn.Module):
        def __init__(self):
            super().__init__()
            self.linear = nn.Linear(2, 2)

    with pytest.raises(ValueError, match="cannot find the decoder layers of NoLayers"):
        find_decoder_layers(NoLayers())
