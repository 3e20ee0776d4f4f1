"""vsteer's own vector format (docs/vector-format.md), a directory::

    <dir>/vectors.safetensors   tensors "layer.<L>": float32 [hidden_size]
    <dir>/vsteer.json           metadata, including a sha256 of the tensor content

Plain data only (safetensors + JSON): nothing here unpickles.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import stat
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, save_file

from ..errors import VectorFileError
from ..vectors import LAYER_CONVENTION, LAYER_CONVENTION_DOC, SteeringVectorSet, as_vector

FORMAT_NAME = "vsteer.vectors"
FORMAT_VERSION = 1
TENSORS_FILE = "vectors.safetensors"
METADATA_FILE = "vsteer.json"
_TENSOR_NAME = re.compile(r"^layer\.(\d+)$")


def content_sha256(vectors: dict[int, torch.Tensor], residual_norms: dict[int, float] | None = None,
                   recommended: dict[str, Any] | None = None) -> str:
    """Hash of everything that decides how the set steers: the tensor content (independent
    of how safetensors lays out the file) and, when present, the residual norms (the unit
    of relative strengths) and the recorded recipe. Sets without those hash their tensors
    alone, as files of format version 1 always did."""
    h = hashlib.sha256()
    for layer in sorted(vectors):
        t = vectors[layer].detach().to("cpu", torch.float32).contiguous()
        h.update(f"layer.{layer}:{t.numel()}:".encode())
        h.update(t.numpy().astype("<f4").tobytes())
    if residual_norms:
        h.update(b"residual_norms:" + json.dumps(_rounded(residual_norms), sort_keys=True).encode())
    if recommended:
        h.update(b"recommended:" + json.dumps(recommended, sort_keys=True).encode())
    return h.hexdigest()


def _rounded(norms: dict[int, float]) -> dict[str, float]:
    return {str(k): round(float(v), 6) for k, v in sorted(norms.items())}


def set_sha256(vs: SteeringVectorSet) -> str:
    """The ``sha256`` a set's ``vsteer.json`` records (its version in a registry)."""
    return content_sha256(vs.vectors, vs.residual_norms, vs.recommended)


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
        "residual_norms": _rounded(vs.residual_norms),
        "recommended": vs.recommended,
        "sha256": set_sha256(vs),
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def save_vector_set(vs: SteeringVectorSet, directory: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``vs`` to ``directory`` atomically enough for a registry that readers poll.
    Both files get the mode the process umask gives (safetensors alone would make its file
    0600, unreadable to the other users of a shared registry volume)."""
    d = Path(directory)
    if (d / METADATA_FILE).exists() and not overwrite:
        raise FileExistsError(f"{d} already holds a vector set (pass overwrite=True to replace it)")
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer.{layer}": v.contiguous() for layer, v in vs.vectors.items()}
    meta = vector_set_metadata(vs)
    tmp_t, tmp_m = d / (TENSORS_FILE + ".tmp"), d / (METADATA_FILE + ".tmp")
    try:
        try:
            save_file(tensors, str(tmp_t), metadata={"format": FORMAT_NAME, "sha256": meta["sha256"]})
        except OSError:
            raise
        except Exception as e:  # safetensors reports I/O failures (a full disk) as its own error type
            code = re.search(r"os error (\d+)", str(e))
            raise OSError(int(code.group(1)) if code else errno.EIO, f"cannot write {tmp_t.name}: {e}") from e
        tmp_m.write_text(json.dumps(meta, indent=2, sort_keys=True))  # created with the umask's mode
        os.chmod(tmp_t, stat.S_IMODE(tmp_m.stat().st_mode))
        os.replace(tmp_t, d / TENSORS_FILE)
        os.replace(tmp_m, d / METADATA_FILE)
    except BaseException:
        tmp_t.unlink(missing_ok=True)
        tmp_m.unlink(missing_ok=True)
        raise
    return d


def read_metadata(directory: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``vsteer.json`` without touching the tensors (cheap: for listings)."""
    path = Path(directory) / METADATA_FILE
    if not path.is_file():
        raise VectorFileError(f"{Path(directory)} is not a vsteer vector set: {METADATA_FILE} is missing")
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, RecursionError) as e:
        raise VectorFileError(f"{path}: unreadable metadata ({e})") from e
    return check_metadata(meta, path)


def check_metadata(meta: Any, path: str | os.PathLike) -> dict[str, Any]:
    """The checks of ``read_metadata`` on a parsed object (``path`` names it in errors)."""
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
    return _vector_set(meta, raw, str(d), str(tpath))


def vector_set_from_bytes(meta: Any, tensors: bytes, *, where: str = "upload",
                          expect_hidden_size: int | None = None,
                          expect_num_layers: int | None = None) -> SteeringVectorSet:
    """``load_vector_set`` of the two files' contents (an upload): verified in memory, so
    nothing is staged on disk (a full temporary directory cannot fail it)."""
    meta = check_metadata(meta, where)
    check_compatible(meta, where, expect_hidden_size=expect_hidden_size, expect_num_layers=expect_num_layers)
    try:
        raw = load_bytes(tensors)
    except Exception as e:  # safetensors raises its own error types
        raise VectorFileError(f"{where}: not a valid safetensors file ({e})") from e
    return _vector_set(meta, raw, where, f"{where}: {TENSORS_FILE}")


def _vector_set(meta: dict[str, Any], raw: dict[str, torch.Tensor], d: str, tpath: str) -> SteeringVectorSet:
    """Shapes, finiteness, layers and the content hash of loaded tensors against ``meta``."""
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
    stored_norms = _norms_of(meta.get("residual_norms"), d)
    recommended = check_recommended(meta.get("recommended"), d)
    if content_sha256(vectors, stored_norms, recommended) != meta["sha256"]:
        raise VectorFileError(f"{d}: content hash mismatch: the tensors were changed after the metadata was "
                              "written (tampered or half-written file)")
    provenance = meta.get("provenance") or {}
    return SteeringVectorSet(
        behaviour=meta["behaviour"], vectors=vectors, model_id=meta.get("model_id") or "",
        num_layers=meta.get("num_layers"), method=meta.get("method", "caa"),
        params=meta.get("params") or {}, provenance=provenance,
        residual_norms=stored_norms,
        recommended=recommended,
    )


def _norms_of(raw: Any, where: Path | str) -> dict[int, float]:
    try:
        return {int(k): float(v) for k, v in (raw or {}).items() if v is not None}
    except (AttributeError, TypeError, ValueError):
        raise VectorFileError(f"{where}: residual_norms must map layers to numbers") from None


_RECIPE_KEYS = {"strength", "layers", "unit", "norm", "positions"}


def check_recommended(recipe: Any, where: Path | str) -> dict[str, Any] | None:
    """A recorded recipe must hold only what a request could say (files can be uploaded)."""
    if recipe is None:
        return None
    from ..positions import POSITIONS

    ok = isinstance(recipe, dict) and set(recipe) <= _RECIPE_KEYS
    if ok and "strength" in recipe:
        ok = isinstance(recipe["strength"], (int, float)) and math.isfinite(recipe["strength"])
    if ok and "layers" in recipe:
        ok = isinstance(recipe["layers"], list) and bool(recipe["layers"]) and all(
            isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in recipe["layers"])
    ok = ok and recipe.get("unit", "raw") in ("raw", "relative") and recipe.get("norm", "keep") in ("keep", "preserve")
    ok = ok and recipe.get("positions", "all") in POSITIONS
    if not ok:
        raise VectorFileError(f"{where}: 'recommended' must be an object of strength (number), layers (list of "
                              "ints), unit (raw|relative), norm (keep|preserve), positions")
    return dict(recipe)


def detect(path: Path) -> bool:
    return (path / METADATA_FILE).is_file()


def load(path: Path, *, expect_hidden_size: int | None = None, **kw: Any) -> SteeringVectorSet:
    return load_vector_set(path, expect_hidden_size=expect_hidden_size, **kw)


def save(vs: SteeringVectorSet, path: str | os.PathLike, **kw: Any) -> Path:
    return save_vector_set(vs, path, **kw)
