"""Vector files: our safetensors+JSON format, the seed (rotalabs-steer) format and
repeng/llama.cpp control-vector GGUF.

Our format (documented in docs/vector-format.md) is a directory::

    <dir>/vectors.safetensors   tensors "layer.<L>": float32 [hidden_size]
    <dir>/vsteer.json           metadata, including a sha256 of the tensor content

No load path here unpickles: safetensors and GGUF are plain data, and the seed's
``.pt`` tensors are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .vectors import LAYER_CONVENTION, LAYER_CONVENTION_DOC, SteeringVectorSet, as_vector

FORMAT_NAME = "vsteer.vectors"
FORMAT_VERSION = 1
TENSORS_FILE = "vectors.safetensors"
METADATA_FILE = "vsteer.json"
_TENSOR_NAME = re.compile(r"^layer\.(\d+)$")


class VectorFileError(ValueError):
    """A vector file is missing, malformed, tampered with, or made for another model."""


def content_sha256(vectors: dict[int, torch.Tensor]) -> str:
    """Hash of the tensor content, independent of how safetensors lays out the file."""
    h = hashlib.sha256()
    for layer in sorted(vectors):
        t = vectors[layer].detach().to("cpu", torch.float32).contiguous()
        h.update(f"layer.{layer}:{t.numel()}:".encode())
        h.update(t.numpy().astype("<f4").tobytes())
    return h.hexdigest()


def vector_set_metadata(vs: SteeringVectorSet) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "behaviour": vs.behaviour,
        "model_id": vs.model_id,
        "hidden_size": vs.hidden_size,
        "num_layers": vs.num_layers,
        "layers": vs.layers,
        "layer_convention": LAYER_CONVENTION,
        "layer_convention_doc": LAYER_CONVENTION_DOC,
        "method": vs.method,
        "params": vs.params,
        "provenance": vs.provenance,
        "norms": {str(k): round(v, 6) for k, v in vs.norms().items()},
        "sha256": content_sha256(vs.vectors),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save_vector_set(vs: SteeringVectorSet, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``vs`` to ``directory`` atomically enough for a registry that readers poll."""
    d = Path(directory)
    if (d / METADATA_FILE).exists() and not overwrite:
        raise FileExistsError(f"{d} already holds a vector set (pass overwrite=True to replace it)")
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer.{layer}": v.contiguous() for layer, v in vs.vectors.items()}
    meta = vector_set_metadata(vs)
    tmp_t, tmp_m = d / (TENSORS_FILE + ".tmp"), d / (METADATA_FILE + ".tmp")
    save_file(tensors, str(tmp_t), metadata={"format": FORMAT_NAME, "sha256": meta["sha256"]})
    tmp_m.write_text(json.dumps(meta, indent=2, sort_keys=True))
    os.replace(tmp_t, d / TENSORS_FILE)
    os.replace(tmp_m, d / METADATA_FILE)
    return d


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``vsteer.json`` without touching the tensors (cheap: for listings)."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise VectorFileError(f"{Path(directory)} is not a vsteer vector set: {METADATA_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VectorFileError(f"{path}: unreadable metadata ({e})") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise VectorFileError(f"{path}: not a {FORMAT_NAME} metadata file")
    if meta.get("format_version") != FORMAT_VERSION:
        raise VectorFileError(f"{path}: format_version {meta.get('format_version')!r} is not supported "
                              f"(this vsteer reads version {FORMAT_VERSION})")
    if meta.get("layer_convention") != LAYER_CONVENTION:
        raise VectorFileError(f"{path}: layer convention {meta.get('layer_convention')!r} differs from "
                              f"{LAYER_CONVENTION!r} ({LAYER_CONVENTION_DOC})")
    for key in ("behaviour", "hidden_size", "layers", "sha256"):
        if key not in meta:
            raise VectorFileError(f"{path}: metadata lacks {key!r}")
    return meta


def check_compatible(meta: dict[str, Any], where: str, *, expect_hidden_size: int | None,
                     expect_model_id: str | None = None, expect_num_layers: int | None = None) -> None:
    """Refuse a vector set made for another model (hidden size, layer count, model id)."""
    if expect_hidden_size is not None and meta["hidden_size"] != expect_hidden_size:
        raise VectorFileError(f"{where}: hidden size {meta['hidden_size']} does not match the model's "
                              f"{expect_hidden_size}")
    if expect_num_layers is not None:
        bad = [layer for layer in meta["layers"] if not 0 <= layer < expect_num_layers]
        if bad:
            raise VectorFileError(f"{where}: layers {bad} are outside the model's 0..{expect_num_layers - 1}")
    if expect_model_id and meta.get("model_id") and meta["model_id"] != expect_model_id:
        raise VectorFileError(f"{where}: made for model {meta['model_id']!r}, not {expect_model_id!r}")


def load_vector_set(directory: str | os.PathLike, *, expect_hidden_size: int | None = None,
                    expect_model_id: str | None = None,
                    expect_num_layers: int | None = None) -> SteeringVectorSet:
    """Load and verify a vector set: format, convention, shapes, finiteness, content hash."""
    d = Path(directory)
    meta = read_metadata(d)
    check_compatible(meta, str(d), expect_hidden_size=expect_hidden_size,
                     expect_model_id=expect_model_id, expect_num_layers=expect_num_layers)
    tpath = d / TENSORS_FILE
    if not tpath.is_file():
        raise VectorFileError(f"{d}: {TENSORS_FILE} is missing")
    try:
        raw = load_file(str(tpath))
    except Exception as e:  # safetensors raises its own error types
        raise VectorFileError(f"{tpath}: not a valid safetensors file ({e})") from e
    vectors: dict[int, torch.Tensor] = {}
    for name, tensor in raw.items():
        m = _TENSOR_NAME.match(name)
        if not m:
            raise VectorFileError(f"{tpath}: unexpected tensor {name!r}")
        if tensor.dtype != torch.float32 or tensor.dim() != 1 or tensor.numel() != meta["hidden_size"]:
            raise VectorFileError(f"{tpath}: tensor {name} is {tensor.dtype} {tuple(tensor.shape)}, expected "
                                  f"float32 [{meta['hidden_size']}]")
        try:
            vectors[int(m.group(1))] = as_vector(tensor, what=f"{tpath}:{name}")
        except ValueError as e:
            raise VectorFileError(str(e)) from e
    if sorted(vectors) != sorted(meta["layers"]):
        raise VectorFileError(f"{tpath}: holds layers {sorted(vectors)}, metadata says {meta['layers']}")
    if content_sha256(vectors) != meta["sha256"]:
        raise VectorFileError(f"{d}: content hash mismatch: the tensors were changed after the metadata was "
                              "written (tampered or half-written file)")
    return SteeringVectorSet(
        behaviour=meta["behaviour"], vectors=vectors, model_id=meta.get("model_id") or "",
        num_layers=meta.get("num_layers"), method=meta.get("method", "caa"),
        params=meta.get("params") or {}, provenance=meta.get("provenance") or {},
    )


# ---------------------------------------------------------------------------------------
# Seed format (rotalabs-steer): <dir>/layer_<i>.json + <dir>/layer_<i>.pt (+ metadata.json)
# ---------------------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------------------
# repeng / llama.cpp control vectors (GGUF)
# ---------------------------------------------------------------------------------------
# llama.cpp adds tensor ``direction.<k>`` to the output of decoder block k (its layer loop
# index, 0-based) and never steers block 0 (``direction.0`` is rejected there). So GGUF
# ``direction.<k>`` is exactly our layer k, and layer 0 cannot be written to GGUF.

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


def load_any(path: str | os.PathLike, **kw: Any) -> SteeringVectorSet:
    """Load whichever of the three formats ``path`` holds."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return load_control_vector_gguf(p, expect_hidden_size=kw.get("expect_hidden_size"))
    if (p / METADATA_FILE).is_file():
        return load_vector_set(p, **kw)
    if p.is_dir() and any(p.glob("layer_*.json")):
        return load_seed_format(p, expect_hidden_size=kw.get("expect_hidden_size"))
    raise VectorFileError(f"{p}: not a vsteer vector set, a rotalabs-steer directory or a .gguf control vector")
