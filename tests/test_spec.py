"""SteeringSpec validation and resolution against a registry and a model shape."""

from __future__ import annotations

import math

import pytest
import torch

from vsteer.engine import SteeringError, SteeringResolver, SteeringSpec, SteeringVectorSet, VectorRegistry
from vsteer.engine.resolver import encode_inline
from vsteer.engine.settings import settings

MAX_VECTORS = settings().max_vectors

H, L = 16, 6


@pytest.fixture()
def resolver(tmp_path):
    reg = VectorRegistry(tmp_path)
    g = torch.Generator().manual_seed(0)
    reg.add("happy", SteeringVectorSet("happy", {1: torch.randn(H, generator=g), 3: torch.randn(H, generator=g)}))
    reg.add("formal", SteeringVectorSet("formal", {3: torch.randn(H, generator=g)}))
    reg.add("wide", SteeringVectorSet("wide", {1: torch.randn(H * 2, generator=g)}))
    return SteeringResolver(reg, hidden_size=H, num_layers=L)


def _err(resolver, spec) -> SteeringError:
    with pytest.raises(SteeringError) as e:
        resolver.resolve(spec)
    return e.value


def test_sum_per_layer_and_order_independent_fingerprint(resolver):
    reg = resolver.registry
    a = resolver.resolve({"vectors": [{"name": "happy", "strength": 2.0}, {"name": "formal", "strength": -1.0}]})
    b = resolver.resolve({"vectors": [{"name": "formal", "strength": -1.0}, {"name": "happy", "strength": 2.0}]})
    assert a.fingerprint == b.fingerprint and a.layers == [1, 3]
    assert torch.allclose(a.layer_vectors[3], 2.0 * reg.load("happy").vectors[3] - reg.load("formal").vectors[3])
    c = resolver.resolve({"vectors": [{"name": "happy", "strength": 2.0, "layers": [3]}]})
    assert c.layers == [3] and c.fingerprint != a.fingerprint
    d = resolver.resolve({"vectors": [{"name": "happy", "strength": 2.0}], "positions": "generated"})
    e = resolver.resolve({"vectors": [{"name": "happy", "strength": 2.0}], "positions": "prompt"})
    assert d.fingerprint != e.fingerprint


@pytest.mark.parametrize("empty", [None, {}, {"vectors": []}])
def test_no_steering(resolver, empty):
    assert resolver.resolve(empty) is None


@pytest.mark.parametrize("spec,field,reason", [
    ({"vectors": [{"name": "nope"}]}, "steering.vectors[0].name", "unknown_vector"),
    ({"vectors": [{"name": "wide"}]}, "steering.vectors[0].name", "wrong_hidden_size"),
    ({"vectors": [{"name": "happy", "strength": math.nan}]}, "steering.vectors[0].strength", "non_finite_strength"),
    ({"vectors": [{"name": "happy", "strength": math.inf}]}, "steering.vectors[0].strength", "non_finite_strength"),
    ({"vectors": [{"name": "happy", "strength": 1e9}]}, "steering.vectors[0].strength", "strength_out_of_bounds"),
    ({"vectors": [{"name": "../etc/passwd"}]}, "steering.vectors[0].name", "invalid_name"),
    ({"vectors": [{"name": "happy", "layers": [2]}]}, "steering.vectors[0].layers", "unknown_layer"),
    ({"vectors": [{"name": "happy"}], "positions": "middle"}, "steering.positions", "invalid_value"),
    ({"vectors": [{"name": "happy", "bogus": 1}]}, "steering.vectors[0].bogus", "unknown_field"),
    ({"vectors": [{"name": "happy"}] * (MAX_VECTORS + 1)}, "steering.vectors", "too_many_vectors"),
])
def test_bad_specs_name_field_and_reason(resolver, spec, field, reason):
    err = _err(resolver, spec)
    assert err.field == field and err.reason == reason, (err.field, err.reason, str(err))


def test_unknown_name_lists_no_registry_names(resolver):
    """Issue 20 #8: the registry's names are the operator's (GET /v1/steering/vectors), not
    every client's."""
    message = str(_err(resolver, {"vectors": [{"name": "nope"}]}))
    assert "'nope'" in message and not any(n in message for n in ("formal", "happy", "wide", "known vectors"))


def test_layer_outside_model(tmp_path):
    reg = VectorRegistry(tmp_path)
    reg.add("deep", SteeringVectorSet("deep", {9: torch.ones(H)}))
    err = _err(SteeringResolver(reg, hidden_size=H, num_layers=L), {"vectors": [{"name": "deep"}]})
    assert err.reason == "layer_out_of_range"


def test_inline_vectors(resolver):
    v = torch.arange(H, dtype=torch.float32)
    r = resolver.resolve({"vectors": [{"name": "mine", "strength": 0.5, "data": {"2": encode_inline(v)}}]})
    assert r.layers == [2] and torch.equal(r.layer_vectors[2], 0.5 * v)
    assert _err(resolver, {"vectors": [{"name": "mine", "data": {"2": encode_inline(torch.ones(H + 1))}}]}).reason \
        == "wrong_hidden_size"
    nan = torch.ones(H)
    nan[0] = float("nan")
    assert _err(resolver, {"vectors": [{"name": "mine", "data": {"2": encode_inline(nan)}}]}).reason \
        == "non_finite_vector"
    huge = {"vectors": [{"name": "mine", "data": {"2": "A" * (3 << 20)}}]}
    assert _err(resolver, huge).reason == "inline_too_large"
    negative = {"vectors": [{"name": "mine", "data": {"-1": encode_inline(v)}}]}
    assert _err(resolver, negative).reason == "layer_out_of_range"


def test_fingerprint_follows_the_loaded_content(tmp_path):
    """An overwritten set gets a new fingerprint, and the hash always describes the
    tensors actually returned (never a second, newer read of the metadata)."""
    from vsteer.engine.formats import content_sha256

    reg = VectorRegistry(tmp_path)
    reg.add("v", SteeringVectorSet("v", {1: torch.ones(H)}))
    first = SteeringResolver(reg, hidden_size=H, num_layers=L).resolve({"vectors": [{"name": "v"}]})
    reg.add("v", SteeringVectorSet("v", {1: 2 * torch.ones(H)}), overwrite=True)
    vs, sha = reg.load_with_hash("v")
    assert sha == content_sha256(vs.vectors) and torch.equal(vs.vectors[1], 2 * torch.ones(H))
    second = SteeringResolver(reg, hidden_size=H, num_layers=L).resolve({"vectors": [{"name": "v"}]})
    assert second.fingerprint != first.fingerprint and torch.equal(second.layer_vectors[1], 2 * torch.ones(H))


def test_spec_parse_rejects_non_object():
    with pytest.raises(SteeringError, match="must be an object"):
        SteeringSpec.parse(["happy"])
