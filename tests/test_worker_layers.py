"""Generic decoder-layer discovery in vLLM models (pipeline stages, vision towers)."""

from __future__ import annotations

import pytest
from torch import nn

vllm = pytest.importorskip("vllm")
from vllm.model_executor.models.utils import PPMissingLayer  # noqa: E402

from vsteer.serving.worker import find_vllm_decoder_layers  # noqa: E402


class FakeAttention(nn.Module):
    pass


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = FakeAttention()
        self.mlp = nn.Linear(2, 2)


class VisionTower(nn.Module):
    def __init__(self, n):
        super().__init__()
        self.layers = nn.ModuleList(Block() for _ in range(n))


class VLM(nn.Module):
    def __init__(self, vision: int, text: int, stage: range | None = None):
        super().__init__()
        self.vision_tower = VisionTower(vision)
        stage = stage or range(text)
        self.layers = nn.ModuleList(Block() if i in stage else PPMissingLayer() for i in range(text))


def test_language_layers_win_over_a_longer_vision_tower():
    model = VLM(vision=8, text=6)
    layers = find_vllm_decoder_layers(model)
    assert sorted(layers) == list(range(6)) and all(layers[i] is model.layers[i] for i in layers)


def test_pipeline_stage_owns_only_its_layers():
    model = VLM(vision=2, text=6, stage=range(3, 6))
    assert sorted(find_vllm_decoder_layers(model)) == [3, 4, 5]


def test_no_layers_is_a_clear_error():
    with pytest.raises(RuntimeError, match="cannot find the decoder layers of Linear"):
        find_vllm_decoder_layers(nn.Linear(2, 2))
