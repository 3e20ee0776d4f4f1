"""The front-end's resolver cache follows the vector directory: a process that starts a
second engine on another directory validates against the new vectors, not the old."""

from __future__ import annotations

import pytest
import torch

from vsteer.engine import SteeringError, SteeringVectorSet, VectorRegistry
from vsteer.serving import set_vectors_dir
from vsteer.serving.frontend import resolver_for


def test_resolver_cache_is_keyed_by_vector_directory(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    VectorRegistry(first).add("a", SteeringVectorSet("a", {1: torch.ones(128)}))
    VectorRegistry(second).add("b", SteeringVectorSet("b", {2: torch.ones(128)}))
    monkeypatch.setenv("VSTEER_VECTORS_DIR", "")
    set_vectors_dir(first)
    assert resolver_for(128, 4).resolve({"vectors": [{"name": "a"}]}) is not None
    set_vectors_dir(second)
    assert resolver_for(128, 4).resolve({"vectors": [{"name": "b"}]}) is not None
    with pytest.raises(SteeringError, match="unknown steering vector 'a'"):
        resolver_for(128, 4).resolve({"vectors": [{"name": "a"}]})
