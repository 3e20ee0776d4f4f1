"""Vector files, as a table of formats: each has ``detect``, ``load`` and ``save``.

* ``vsteer`` (``native``): our directory of ``vectors.safetensors`` + ``vsteer.json``
  (docs/vector-format.md), with a content hash. What the registry holds.
* ``rotalabs-steer`` (``seed``): the seed project's ``layer_<i>.json`` + ``layer_<i>.pt``.
* ``gguf``: llama.cpp / repeng control vectors.

``load_any`` and ``vsteer inspect`` both read ``FORMATS``; adding a format is one module
and one entry here. No load path unpickles: safetensors and GGUF are plain data, and the
seed's ``.pt`` tensors are read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import VectorFileError
from ..vectors import SteeringVectorSet
from . import gguf, native, seed
from .gguf import load_control_vector_gguf, save_control_vector_gguf
from .native import (
    METADATA_FILE,
    TENSORS_FILE,
    check_compatible,
    content_sha256,
    load_vector_set,
    read_metadata,
    save_vector_set,
    set_sha256,
    vector_set_from_bytes,
)
from .seed import load_seed_format, save_seed_format


@dataclass(frozen=True)
class VectorFormat:
    name: str
    noun: str
    """What such a file is, for messages ("a .gguf control vector")."""
    detect: Callable[[Path], bool]
    load: Callable[..., SteeringVectorSet]
    """``load(path, expect_hidden_size=None)``: verified set, or ``VectorFileError``."""
    save: Callable[..., Path]
    """``save(vector_set, path)``: the path written."""


FORMATS: tuple[VectorFormat, ...] = (
    VectorFormat("vsteer", "a vsteer vector set (vectors.safetensors + vsteer.json)",
                 native.detect, native.load, native.save),
    VectorFormat("rotalabs-steer", "a rotalabs-steer directory (layer_<i>.json + layer_<i>.pt)",
                 seed.detect, seed.load, seed.save),
    VectorFormat("gguf", "a .gguf control vector (llama.cpp / repeng)", gguf.detect, gguf.load, gguf.save),
)


def detect_format(path: str | os.PathLike) -> VectorFormat:
    p = Path(path)
    for fmt in FORMATS:
        if fmt.detect(p):
            return fmt
    raise VectorFileError(f"{p}: not " + " or ".join(f.noun for f in FORMATS))


def get_format(name: str) -> VectorFormat:
    for fmt in FORMATS:
        if fmt.name == name:
            return fmt
    raise ValueError(f"unknown vector format {name!r}; known: {', '.join(f.name for f in FORMATS)}")


def load_any(path: str | os.PathLike, *, expect_hidden_size: int | None = None, **kw: Any) -> SteeringVectorSet:
    """Load whichever format ``path`` holds."""
    return detect_format(path).load(Path(path), expect_hidden_size=expect_hidden_size, **kw)


__all__ = [
    "FORMATS", "METADATA_FILE", "TENSORS_FILE", "VectorFileError", "VectorFormat", "check_compatible",
    "content_sha256", "detect_format", "get_format", "load_any", "load_control_vector_gguf", "load_seed_format",
    "load_vector_set", "read_metadata", "save_control_vector_gguf", "save_seed_format", "save_vector_set", "set_sha256",
    "vector_set_from_bytes",
]
