"""The seed's (rotalabs-steer) format: ``<dir>/layer_<i>.json`` + ``<dir>/layer_<i>.pt``
(+ ``metadata.json``). The ``.pt`` tensors are read with ``torch.load(weights_only=True)``:
never a full unpickle."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import VectorFileError
from ..vectors import LAYER_CONVENTION, SteeringVectorSet, as_vector

def save_seed_format(vs: SteeringVectorSet, directory: str | os.PathLike) -> Path:
    """Write the rotalabs-steer layout so tools built on the seed can read our vectors."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for layer, vec in vs.vectors.items():
        (d / f"layer_{layer}.json").write_text(json.dumps({
            "behavior": vs.behaviour, "layer_index": layer, "model_name": vs.model_id,
            "extraction_method": vs.method, "metadata": {**vs.params, "vsteer_layer_convention": LAYER_CONVENTION},
            "vector_shape": [vec.numel()],
        }, indent=2))
        torch.save(vec.clone(), d / f"layer_{layer}.pt")
    (d / "metadata.json").write_text(json.dumps(
        {"behavior": vs.behaviour, "layers": vs.layers, "model_name": vs.model_id}, indent=2))
    return d


def load_seed_format(directory: str | os.PathLike, *, expect_hidden_size: int | None = None) -> SteeringVectorSet:
    """Read the rotalabs-steer layout. The seed hooks ``layers[i]``'s output, as we do."""
    d = Path(directory)
    files = sorted(d.glob("layer_*.json"), key=lambda p: int(p.stem.split("_")[1]) if p.stem.split("_")[1].isdigit() else -1)
    if not files:
        raise VectorFileError(f"{d}: no layer_<i>.json files (not a rotalabs-steer vector directory)")
    vectors: dict[int, torch.Tensor] = {}
    behaviour, model_id, method = "", "", "caa"
    for meta_path in files:
        meta = json.loads(meta_path.read_text())
        layer = int(meta["layer_index"])
        behaviour, model_id = meta.get("behavior", behaviour), meta.get("model_name", model_id)
        method = meta.get("extraction_method", method)
        pt = meta_path.with_suffix(".pt")
        try:
            tensor = torch.load(pt, map_location="cpu", weights_only=True)  # never a full unpickle
        except Exception as e:
            raise VectorFileError(f"{pt}: not a plain tensor file ({e})") from e
        if not isinstance(tensor, torch.Tensor):
            raise VectorFileError(f"{pt}: holds a {type(tensor).__name__}, expected a tensor")
        try:
            vectors[layer] = as_vector(tensor.reshape(-1) if tensor.dim() == 2 and tensor.shape[0] == 1 else tensor,
                                       what=str(pt))
        except ValueError as e:
            raise VectorFileError(str(e)) from e
    vs = SteeringVectorSet(behaviour or d.name, vectors, model_id=model_id, method=method,
                           provenance={"imported_from": "rotalabs-steer"})
    if expect_hidden_size is not None and vs.hidden_size != expect_hidden_size:
        raise VectorFileError(f"{d}: hidden size {vs.hidden_size} does not match the model's {expect_hidden_size}")
    return vs




def detect(path: Path) -> bool:
    return path.is_dir() and any(path.glob("layer_*.json"))


def load(path: Path, *, expect_hidden_size: int | None = None, **kw: Any) -> SteeringVectorSet:
    return load_seed_format(path, expect_hidden_size=expect_hidden_size)


def save(vs: SteeringVectorSet, path: str | os.PathLike, **kw: Any) -> Path:
    return save_seed_format(vs, path)
