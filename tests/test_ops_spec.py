"""Operator fields of a request (op, unit, norm) through the spec and the resolver: bad
input is refused with the right ``reason`` and ``field``; good input resolves to the
documented plans and fingerprints. No vLLM (tests/test_vllm_ops.py sends the same bad
input through ``vllm.LLM``)."""

from __future__ import annotations

import pytest
import torch

from vsteer.engine import SteeringError, SteeringResolver, SteeringVectorSet, VectorRegistry
from vsteer.engine.operators import OPERATORS, apply_plan
from vsteer.engine.resolver import encode_inline

H, L = 16, 6


def _vec(seed: int, norm: float = 3.0) -> torch.Tensor:
    v = torch.randn(H, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


@pytest.fixture()
def resolver(tmp_path):
    reg = VectorRegistry(tmp_path)
    for i, name in enumerate(("d1", "d2", "d3")):
        reg.add(name, SteeringVectorSet(name, {1: _vec(i), 2: _vec(10 + i)}, residual_norms={1: 4.0, 2: 8.0}))
    reg.add("bare", SteeringVectorSet("bare", {1: _vec(20)}))  # extracted before residual norms existed
    reg.add("legacy", SteeringVectorSet("legacy", {1: _vec(21)}, provenance={"mean_activation_norm": {"1": 6.0}}))
    reg.add("zero", SteeringVectorSet("zero", {1: _vec(22), 2: torch.zeros(H)}, residual_norms={1: 4.0, 2: 8.0}))
    reg.add("preset", SteeringVectorSet("preset", {1: _vec(23)}, residual_norms={1: 4.0},
                                        recommended={"strength": 0.25, "unit": "relative", "norm": "preserve",
                                                     "layers": [1]}))
    return SteeringResolver(reg, hidden_size=H, num_layers=L)


def _err(resolver, spec) -> SteeringError:
    with pytest.raises(SteeringError) as e:
        resolver.resolve(spec)
    return e.value


def _inline(v: torch.Tensor, layer: int = 1) -> dict[str, str]:
    return {str(layer): encode_inline(v)}


V0 = "steering.vectors[0]"


@pytest.mark.parametrize("spec,field,reason", [
    # the shape of the request (the pydantic model)
    ({"vectors": [{"name": "d1", "op": "multiply"}]}, f"{V0}.op", "invalid_value"),
    ({"vectors": [{"name": "d1", "op": 3}]}, f"{V0}.op", "invalid_value"),
    ({"vectors": [{"name": "d1", "unit": "percent"}]}, f"{V0}.unit", "invalid_value"),
    ({"vectors": [{"name": "d1", "norm": "unit"}]}, f"{V0}.norm", "invalid_value"),
    ({"vectors": [{"name": "d1", "op": "ablate", "strength": 2.0}]}, V0, "invalid_op_combination"),
    ({"vectors": [{"name": "d1", "op": "ablate", "strength": 0.0}]}, V0, "invalid_op_combination"),
    ({"vectors": [{"name": "d1", "op": "ablate", "unit": "relative"}]}, V0, "invalid_op_combination"),
    ({"vectors": [{"name": "d1", "op": "clamp", "norm": "preserve"}]}, V0, "invalid_op_combination"),
    ({"vectors": [{"name": "d1", "op": "ablate", "norm": "preserve"}]}, V0, "invalid_op_combination"),
    # against the vectors
    ({"vectors": [{"name": "zero", "op": "clamp", "layers": [2]}]}, V0, "zero_vector"),
    ({"vectors": [{"name": "zero", "op": "ablate"}]}, V0, "zero_vector"),
    ({"vectors": [{"name": "z", "op": "ablate", "data": _inline(torch.zeros(H))}]}, V0, "zero_vector"),
    ({"vectors": [{"name": "z", "op": "clamp", "strength": 2.0, "data": _inline(torch.zeros(H))}]}, V0,
     "zero_vector"),
    ({"vectors": [{"name": "bare", "unit": "relative", "strength": 0.1}]}, f"{V0}.unit", "no_residual_norms"),
    ({"vectors": [{"name": "bare", "op": "clamp", "unit": "relative"}]}, f"{V0}.unit", "no_residual_norms"),
    ({"vectors": [{"name": "mine", "unit": "relative", "data": _inline(_vec(5))}]}, f"{V0}.unit",
     "no_residual_norms"),
    ({"vectors": [{"name": "d1"}, {"name": "bare", "unit": "relative"}]}, "steering.vectors[1].unit",
     "no_residual_norms"),
    # the whole request at one layer
    ({"vectors": [{"name": n, "op": "ablate", "layers": [1]} for n in ("d1", "d2", "d3")]}, "steering.vectors",
     "too_many_projections"),
    ({"vectors": [{"name": "d1", "op": "ablate"}, {"name": "d2", "op": "clamp"}, {"name": "d3", "op": "clamp"}]},
     "steering.vectors", "too_many_projections"),
    ({"vectors": [{"name": "d1", "norm": "preserve"}, {"name": "d2", "norm": "keep", "layers": [2]}]},
     "steering.vectors", "conflicting_norm"),
    ({"vectors": [{"name": "d1", "norm": "preserve"}, {"name": "d2"}]}, "steering.vectors", "conflicting_norm"),
    ({"vectors": [{"name": "preset"}, {"name": "bare", "strength": 1.0}]}, "steering.vectors",
     "conflicting_norm"),  # the recorded recipe's norm=preserve meets an explicit keep
    # results that overflow: a relative clamp target of a huge norm is fine, x1000 of 3.4e38 is not
    ({"vectors": [{"name": "h", "op": "clamp", "strength": 1000.0, "data": _inline(torch.full((H,), 3e37))}]},
     "steering.vectors", "non_finite_result"),
])
def test_bad_operator_input(resolver, spec, field, reason):
    err = _err(resolver, spec)
    assert (err.field, err.reason) == (field, reason), str(err)


def test_projection_limit_follows_the_setting(resolver, monkeypatch):
    """VSTEER_MAX_PROJECTIONS is read per process (each test starts a fresh resolver: a
    resolver caches its results)."""
    def fresh(limit: str) -> SteeringResolver:
        monkeypatch.setenv("VSTEER_MAX_PROJECTIONS", limit)
        return SteeringResolver(resolver.registry, hidden_size=H, num_layers=L)

    two = {"vectors": [{"name": "d1", "op": "ablate"}, {"name": "d2", "op": "clamp"}]}
    assert fresh("2").resolve(two).plans()[1].num_directions == 2
    assert _err(fresh("1"), two).reason == "too_many_projections"
    assert _err(fresh("0"), {"vectors": [{"name": "d1", "op": "ablate"}]}).reason == "too_many_projections"
    # norm=preserve needs no projection slot
    assert fresh("0").resolve({"vectors": [{"name": "d1", "norm": "preserve"}]}).plans()[1].preserve_norm
    three = {"vectors": [{"name": n, "op": "ablate", "layers": [1]} for n in ("d1", "d2", "d3")]}
    assert fresh("3").resolve(three).plans()[1].num_directions == 3


def test_ablate_accepts_strength_one(resolver):
    a = resolver.resolve({"vectors": [{"name": "d1", "op": "ablate"}]})
    b = resolver.resolve({"vectors": [{"name": "d1", "op": "ablate", "strength": 1.0}]})
    assert a.fingerprint == b.fingerprint


def test_plans_follow_the_documented_order_and_units(resolver):
    reg = resolver.registry
    v = {n: reg.load(n).vectors for n in ("d1", "d2", "d3")}
    r = resolver.resolve({"vectors": [
        {"name": "d3", "strength": 0.5, "unit": "relative", "norm": "preserve"},   # add: |0.5 * 4| at layer 1
        {"name": "d2", "op": "clamp", "strength": 2.0},                            # target 2 |d2|
        {"name": "d1", "op": "ablate"}]})
    plan = r.plans()[1]
    assert [e.op for e in r.entries] == ["ablate", "clamp", "add"]
    assert plan.num_directions == 2 and plan.preserve_norm and not plan.is_add_only
    assert torch.allclose(plan.directions[0], v["d1"][1] / v["d1"][1].norm(), atol=1e-6)   # ablate first
    assert torch.allclose(plan.directions[1], v["d2"][1] / v["d2"][1].norm(), atol=1e-6)
    assert plan.targets.tolist() == pytest.approx([0.0, 2.0 * float(v["d2"][1].norm())])
    assert float(plan.add.norm()) == pytest.approx(0.5 * 4.0, rel=1e-5)                   # relative unit
    assert float(r.plans()[2].add.norm()) == pytest.approx(0.5 * 8.0, rel=1e-5)            # per layer
    applied = {a["op"]: a for a in r.applied}
    assert applied["add"]["absolute_strength"]["1"] == pytest.approx(2.0 / float(v["d3"][1].norm()), rel=1e-5)
    assert applied["clamp"]["target"]["1"] == pytest.approx(2.0 * float(v["d2"][1].norm()), rel=1e-5)
    assert applied["add"]["norm"] == "preserve"


def test_relative_falls_back_to_the_extraction_norm(resolver):
    r = resolver.resolve({"vectors": [{"name": "legacy", "op": "clamp", "strength": 0.5, "unit": "relative"}]})
    assert r.plans()[1].targets.tolist() == pytest.approx([3.0])


def test_recorded_recipe_supplies_unit_and_norm(resolver):
    r = resolver.resolve({"vectors": [{"name": "preset"}]})
    plan = r.plans()[1]
    assert plan.preserve_norm and float(plan.add.norm()) == pytest.approx(0.25 * 4.0, rel=1e-5)
    # the recipe describes adding: another operator ignores it
    c = resolver.resolve({"vectors": [{"name": "preset", "op": "clamp"}]})
    assert c.plans()[1].targets.tolist() == pytest.approx([float(resolver.registry.load("preset").vectors[1].norm())])


def test_two_ablations_remove_their_span(resolver):
    """Several ablated directions are orthonormalised, so the result is the projection onto
    the complement of their span, whatever their order (and so is the fingerprint)."""
    a = resolver.resolve({"vectors": [{"name": "d1", "op": "ablate"}, {"name": "d2", "op": "ablate"}]})
    b = resolver.resolve({"vectors": [{"name": "d2", "op": "ablate"}, {"name": "d1", "op": "ablate"}]})
    assert a.fingerprint == b.fingerprint
    d = a.plans()[1].directions
    assert torch.allclose(d @ d.T, torch.eye(2), atol=1e-5)
    h = torch.randn(5, H, generator=torch.Generator().manual_seed(3)) * 4
    out = apply_plan(h, a.plans()[1])
    reg = resolver.registry
    span = torch.stack([reg.load("d1").vectors[1], reg.load("d2").vectors[1]])
    assert (out @ span.T).abs().max() < 1e-4
    basis, _ = torch.linalg.qr(span.T.double())
    assert torch.allclose(out.double(), h.double() - h.double() @ basis @ basis.T, atol=1e-4)


def test_huge_vectors_keep_their_direction(resolver):
    """A float32 vector whose norm overflows float32 still has a direction: relative
    strengths and clamp directions are computed with a float64 norm (bug: they were 0)."""
    huge = torch.full((H,), 1e38)
    reg = resolver.registry
    reg.add("huge", SteeringVectorSet("huge", {1: huge}, residual_norms={1: 4.0}))
    clamp = resolver.resolve({"vectors": [{"name": "huge", "op": "clamp", "strength": 0.5, "unit": "relative"}]})
    assert torch.allclose(clamp.plans()[1].directions[0], torch.full((H,), 0.25))
    add = resolver.resolve({"vectors": [{"name": "huge", "strength": 0.5, "unit": "relative"}]})
    assert float(add.plans()[1].add.norm()) == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("a,b", [
    ({"name": "d1"}, {"name": "d1", "norm": "preserve"}),
    ({"name": "d1", "op": "clamp"}, {"name": "d1", "op": "clamp", "strength": 0.5}),
    ({"name": "d1", "op": "clamp"}, {"name": "d1", "op": "ablate"}),
    ({"name": "d1", "strength": 1.0}, {"name": "d1", "strength": 1.0, "unit": "relative"}),
    ({"name": "d1", "op": "clamp", "strength": 0.5}, {"name": "d1", "op": "clamp", "strength": 0.5, "unit": "relative"}),
])
def test_different_operators_never_share_a_fingerprint(resolver, a, b):
    assert resolver.resolve({"vectors": [a]}).fingerprint != resolver.resolve({"vectors": [b]}).fingerprint


def test_clamp_order_is_request_order(resolver):
    """Clamps apply one after another in request order (they need not commute), so two
    orders are two steerings."""
    a = resolver.resolve({"vectors": [{"name": "d1", "op": "clamp"}, {"name": "d2", "op": "clamp"}]})
    b = resolver.resolve({"vectors": [{"name": "d2", "op": "clamp"}, {"name": "d1", "op": "clamp"}]})
    assert a.fingerprint != b.fingerprint
    assert [e.name for e in a.entries] == ["d1", "d2"] and [e.name for e in b.entries] == ["d2", "d1"]


def test_the_operator_table_is_the_one_definition():
    assert set(OPERATORS) == {"add", "ablate", "clamp"}
    assert [o for o, op in OPERATORS.items() if op.projects] == ["ablate", "clamp"]
    assert [o for o, op in OPERATORS.items() if not op.takes_strength] == ["ablate"]
