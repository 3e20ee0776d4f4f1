"""Vector files: our format, the seed's, GGUF; refusal of mismatched or tampered files."""

from __future__ import annotations

import json
import pickle

import pytest
import torch

from vsteer.engine import (
    SteeringVectorSet, VectorFileError, VectorRegistry, load_any, load_control_vector_gguf, load_seed_format,
    load_vector_set, save_control_vector_gguf, save_seed_format, save_vector_set,
)
from vsteer.engine.formats import METADATA_FILE, TENSORS_FILE


def _set(hidden: int = 16, layers=(1, 3, 5)) -> SteeringVectorSet:
    g = torch.Generator().manual_seed(0)
    return SteeringVectorSet("demo", {layer: torch.randn(hidden, generator=g) for layer in layers},
                             model_id="m", num_layers=8, params={"component": "residual"})


def test_round_trip_our_format(tmp_path):
    vs = _set()
    save_vector_set(vs, tmp_path / "v")
    meta = json.loads((tmp_path / "v" / METADATA_FILE).read_text())
    assert meta["layer_convention"] == "block_output" and meta["hidden_size"] == 16 and meta["num_layers"] == 8
    back = load_vector_set(tmp_path / "v")
    assert back.layers == vs.layers and back.behaviour == "demo" and back.params == vs.params
    for layer in vs.layers:
        assert torch.equal(back.vectors[layer], vs.vectors[layer])


def test_round_trip_seed_format(tmp_path):
    vs = _set()
    save_seed_format(vs, tmp_path / "seed")
    assert (tmp_path / "seed" / "layer_3.pt").is_file() and (tmp_path / "seed" / "layer_3.json").is_file()
    back = load_seed_format(tmp_path / "seed")
    assert back.layers == vs.layers
    for layer in vs.layers:
        assert torch.equal(back.vectors[layer], vs.vectors[layer])


def test_round_trip_gguf(tmp_path):
    vs = _set()
    path = save_control_vector_gguf(vs, tmp_path / "cv.gguf")
    back = load_control_vector_gguf(path)
    assert back.layers == vs.layers and back.behaviour == "demo"
    for layer in vs.layers:
        assert torch.equal(back.vectors[layer], vs.vectors[layer])
    assert load_any(path).layers == vs.layers


def test_gguf_refuses_layer_zero(tmp_path):
    with pytest.raises(ValueError, match="block 0"):
        save_control_vector_gguf(_set(layers=(0, 1)), tmp_path / "cv.gguf")


def test_hidden_size_mismatch_refused(tmp_path):
    save_vector_set(_set(hidden=16), tmp_path / "v")
    with pytest.raises(VectorFileError, match="hidden size 16 does not match the model's 32"):
        load_vector_set(tmp_path / "v", expect_hidden_size=32)


def test_tampered_tensor_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    vs = _set()
    save_vector_set(vs, tmp_path / "v")
    tensors = load_file(str(tmp_path / "v" / TENSORS_FILE))
    tensors["layer.3"][0] += 1.0
    save_file(tensors, str(tmp_path / "v" / TENSORS_FILE))
    with pytest.raises(VectorFileError, match="content hash mismatch"):
        load_vector_set(tmp_path / "v")


def test_nan_and_wrong_shape_refused(tmp_path):
    with pytest.raises(ValueError, match="NaN"):
        SteeringVectorSet("x", {1: torch.tensor([1.0, float("nan")])})
    with pytest.raises(ValueError, match="1-D"):
        SteeringVectorSet("x", {1: torch.ones(2, 2)})


def test_seed_loader_never_unpickles(tmp_path):
    """A .pt that holds an arbitrary pickled object must not execute or load."""
    d = tmp_path / "evil"
    d.mkdir()
    (d / "layer_1.json").write_text(json.dumps({"behavior": "x", "layer_index": 1, "model_name": ""}))

    class Boom:
        def __reduce__(self):
            return (exec, ("raise SystemExit('unpickled!')",))

    with open(d / "layer_1.pt", "wb") as f:
        pickle.dump(Boom(), f)
    with pytest.raises(VectorFileError, match="not a plain tensor file"):
        load_seed_format(d)


def test_registry_names_cannot_escape(tmp_path):
    reg_root = tmp_path / "reg"
    reg_root.mkdir()
    save_vector_set(_set(), tmp_path / "outside")
    reg = VectorRegistry(reg_root)
    for bad in ("../outside", "a/b", "..", "/etc", ".hidden", ""):
        with pytest.raises(ValueError):
            reg.path_for(bad)
    reg.add("good", _set())
    assert reg.names() == ["good"] and reg.load("good").layers == [1, 3, 5]
