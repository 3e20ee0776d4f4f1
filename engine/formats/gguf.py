"""repeng / llama.cpp control vectors (GGUF).

llama.cpp adds tensor ``direction.<k>`` to the output of decoder block k (its layer loop
index, 0-based) and never steers block 0 (``direction.0`` is rejected there). So GGUF
``direction.<k>`` is exactly our layer k, and layer 0 cannot be written to GGUF.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from ..errors import VectorFileError
from ..vectors import SteeringVectorSet, as_vector


def _gguf():
    try:
        import gguf  # type: ignore
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError("GGUF control vectors need the `gguf` package: pip install 'vsteer[gguf]'") from e
    return gguf


def save_control_vector_gguf(vs: SteeringVectorSet, path: str | os.PathLike, *, model_hint: str = "llama") -> Path:
    """Write a llama.cpp/repeng control vector (``general.architecture = controlvector``)."""
    gguf = _gguf()
    if 0 in vs.vectors:
        raise ValueError("llama.cpp cannot steer the output of block 0 (direction.0 is invalid); "
                         "select layers >= 1 before exporting to GGUF")
    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_string("controlvector.model_hint", model_hint)
    writer.add_uint32("controlvector.layer_count", len(vs.vectors))
    writer.add_string("vsteer.behaviour", vs.behaviour)
    writer.add_string("vsteer.model_id", vs.model_id)
    for layer, vec in vs.vectors.items():
        writer.add_tensor(f"direction.{layer}", vec.numpy().astype("float32"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def load_control_vector_gguf(path: str | os.PathLike, *, behaviour: str | None = None,
                             expect_hidden_size: int | None = None) -> SteeringVectorSet:
    """Read a llama.cpp/repeng control vector GGUF file."""
    gguf = _gguf()
    path = Path(path)
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:
        raise VectorFileError(f"{path}: not a readable GGUF file ({e})") from e

    def field_str(key: str) -> str | None:
        f = reader.get_field(key)
        if f is None:
            return None
        return bytes(f.parts[f.data[0]]).decode("utf-8", "replace")

    arch = field_str("general.architecture")
    if arch != "controlvector":
        raise VectorFileError(f"{path}: general.architecture is {arch!r}, expected 'controlvector'")
    vectors: dict[int, torch.Tensor] = {}
    for t in reader.tensors:
        m = re.match(r"^direction\.(\d+)$", t.name)
        if not m:
            continue
        layer = int(m.group(1))
        if layer == 0:
            raise VectorFileError(f"{path}: direction.0 is invalid in llama.cpp's numbering")
        vectors[layer] = as_vector(torch.from_numpy(t.data.astype("float32").reshape(-1).copy()),
                                   what=f"{path}:{t.name}")
    if not vectors:
        raise VectorFileError(f"{path}: no direction.<layer> tensors")
    vs = SteeringVectorSet(behaviour or field_str("vsteer.behaviour") or path.stem, vectors,
                           model_id=field_str("vsteer.model_id") or "",
                           provenance={"imported_from": "gguf", "model_hint": field_str("controlvector.model_hint")})
    if expect_hidden_size is not None and vs.hidden_size != expect_hidden_size:
        raise VectorFileError(f"{path}: hidden size {vs.hidden_size} does not match the model's {expect_hidden_size}")
    return vs




def detect(path: Path) -> bool:
    return path.is_file() and path.suffix == ".gguf"


def load(path: Path, *, expect_hidden_size: int | None = None, **kw: Any) -> SteeringVectorSet:
    return load_control_vector_gguf(path, expect_hidden_size=expect_hidden_size)


def save(vs: SteeringVectorSet, path: str | os.PathLike, **kw: Any) -> Path:
    return save_control_vector_gguf(vs, path, **kw)
