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


def test_first_pipeline_stage_and_hidden_stages():
    """Stage 0 owns the first layers (later ones are placeholders), a middle stage neither
    end: each steers exactly its own layers, and nothing is refused for the others."""
    assert sorted(find_vllm_decoder_layers(VLM(vision=2, text=6, stage=range(0, 2)))) == [0, 1]
    assert sorted(find_vllm_decoder_layers(VLM(vision=2, text=6, stage=range(2, 4)))) == [2, 3]


def test_user_override_for_unrecognised_models(monkeypatch):
    class Odd(nn.Module):  # blocks without anything that looks like attention
        def __init__(self):
            super().__init__()
            self.trunk = nn.ModuleList(nn.Linear(2, 2) for _ in range(3))

    with pytest.raises(RuntimeError, match="VSTEER_DECODER_LAYERS"):
        find_vllm_decoder_layers(Odd())
    monkeypatch.setenv("VSTEER_DECODER_LAYERS", "trunk")
    assert sorted(find_vllm_decoder_layers(Odd())) == [0, 1, 2]
    monkeypatch.setenv("VSTEER_DECODER_LAYERS", "nowhere")
    with pytest.raises(RuntimeError, match="nowhere"):
        find_vllm_decoder_layers(Odd())
