"""The vLLM steering ops (``vsteer.serving.ops``) against the operator math
(``vsteer.engine.operators.apply_plan``, what the HF injectors run), on CPU without vLLM's
engine: hand-built ``SteeringTables`` from real resolutions, one mixed batch of flattened
tokens, every operator, both block output shapes (the stream itself; ``hidden_states +
residual``), float32 and bfloat16, and the "full" path that CUDA-graph capture records.

bf16 tolerance: the op computes in float32 from bf16 inputs and rounds once; its table
directions are stored in bf16 (unit length only to ~2^-8). We require every steered token
to match the float32 math on the same bf16 input within 1% of the token's norm (L2; measured:
0.22% worst), and an ablated direction to keep at most 1.5% of the token's norm: a few bf16
ulps of the norm, far below what any operator changes. float32 matches to 1e-5 (measured: 0).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vsteer.engine import SteeringResolver, SteeringVectorSet, VectorRegistry
from vsteer.engine.operators import LayerPlan, apply_plan
from vsteer.engine.positions import POSITION_CODES
from vsteer.serving import ops
from vsteer.serving.prepared import PreparedSteering
from vsteer.serving.tables import SteeringTables

H = 32
LAYERS = [0, 1, 2]
NORMS = {0: 5.0, 1: 7.0, 2: 9.0}


def _vec(seed: int, norm: float) -> torch.Tensor:
    v = torch.randn(H, generator=torch.Generator().manual_seed(seed))
    return v / v.norm() * norm


@pytest.fixture(scope="module")
def resolver(tmp_path_factory):
    reg = VectorRegistry(tmp_path_factory.mktemp("op-math-vectors"))
    for i, name in enumerate(("v1", "v2", "v3", "v4")):
        reg.add(name, SteeringVectorSet(name, {layer: _vec(10 * i + layer, 2.0 + i) for layer in (0, 1)},
                                        residual_norms={0: NORMS[0], 1: NORMS[1]}))
    reg.add("deep", SteeringVectorSet("deep", {2: _vec(99, 3.0)}, residual_norms={2: NORMS[2]}))
    return SteeringResolver(reg, hidden_size=H, num_layers=len(LAYERS))


# name -> (spec, positions); every config steers layers 0 and 1, "late" only layer 2
CONFIGS = {
    "add": {"vectors": [{"name": "v1", "strength": 2.0}]},
    "ablate": {"vectors": [{"name": "v2", "op": "ablate"}]},
    "clamp_raw": {"vectors": [{"name": "v3", "op": "clamp", "strength": 0.5}]},
    "clamp_relative": {"vectors": [{"name": "v3", "op": "clamp", "strength": -0.3, "unit": "relative"}]},
    "add_preserve": {"vectors": [{"name": "v1", "strength": 3.0, "norm": "preserve"}]},
    "add_relative": {"vectors": [{"name": "v4", "strength": 0.4, "unit": "relative"}]},
    "two_ablations": {"vectors": [{"name": "v2", "op": "ablate"}, {"name": "v4", "op": "ablate"}]},
    "composed": {"vectors": [{"name": "v1", "strength": 1.5, "norm": "preserve"}, {"name": "v2", "op": "ablate"},
                             {"name": "v3", "op": "clamp", "strength": 1.2}]},
    "late_add": {"vectors": [{"name": "deep", "strength": -1.0}], "positions": "prompt"},
}
GENERAL = {"ablate", "clamp_raw", "clamp_relative", "add_preserve", "two_ablations", "composed"}
TOKENS_PER_REQUEST = 3


def _batch(resolver, tables: SteeringTables, names: list[str | None]):
    """One step: request i (``names[i]``, None = unsteered) prefills 3 tokens. Returns the
    per-token plans per layer (None: token untouched) and which tokens are add-only."""
    configs = {n: resolver.resolve(CONFIGS[n]) for n in names if n is not None}
    by_fp = {r.fingerprint: PreparedSteering.build(r, dtype=tables.dtype, max_projections=tables.max_projections)
             for r in configs.values()}
    rows = tables.assign_rows(by_fp)
    n = len(names)
    req_rows = np.array([rows[configs[x].fingerprint] if x else 0 for x in names], dtype=np.int64)
    modes = np.array([POSITION_CODES[configs[x].positions] if x else 0 for x in names], dtype=np.int64)
    # the "late_add" request is past its prompt (positions=prompt): its first token is its last prompt token
    computed = np.array([2 if x == "late_add" else 0 for x in names], dtype=np.int64)
    tables.set_token_rows(np.full(n, TOKENS_PER_REQUEST), computed, np.full(n, 3), req_rows, modes)
    plans: dict[int, list[LayerPlan | None]] = {layer: [] for layer in LAYERS}
    for i, x in enumerate(names):
        for t in range(TOKENS_PER_REQUEST):
            steered = x is not None and (x != "late_add" or computed[i] + t < 3)
            for layer in LAYERS:
                plans[layer].append(configs[x].plans().get(layer) if steered else None)
    return plans


def _states(n: int, seed: int, dtype: torch.dtype, resolver) -> torch.Tensor:
    """Tokens with sizeable components along the test directions (so clamps and ablations
    move them), in the model dtype."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, H, generator=g) * 2.0
    dirs = torch.stack([resolver.registry.load(v).vectors[0] for v in ("v2", "v3", "v4")])
    x = x + torch.randn(n, 3, generator=g) @ dirs
    return x.to(dtype)


def _expected(stream: torch.Tensor, plans: list[LayerPlan | None]) -> torch.Tensor:
    """The operator math per token in float32 (HF's ``apply_plan`` on the same input)."""
    out = stream.float().clone()
    for i, plan in enumerate(plans):
        if plan is not None:
            out[i] = apply_plan(stream[i].float(), plan)
    return out


@pytest.fixture()
def make_tables():
    made = []

    def make(dtype: torch.dtype, max_projections: int = 2) -> SteeringTables:
        tables = SteeringTables(LAYERS, H, max_configs=16, max_tokens=64, dtype=dtype, device="cpu",
                                max_projections=max_projections)
        ops.register_op()
        ops.set_tables(tables)
        made.append(tables)
        return tables

    yield make
    ops.set_tables(None)


MIXED = [None, "add", "ablate", "clamp_raw", "clamp_relative", "add_preserve", "add_relative", "two_ablations",
         "composed", "late_add", None]


def _check_close(got: torch.Tensor, expected: torch.Tensor, plans, dtype: torch.dtype, what: str) -> None:
    for i, plan in enumerate(plans):
        if plan is None:
            continue
        err = float((got[i].float() - expected[i]).norm())
        scale = float(expected[i].norm())
        bound = 1e-5 * max(scale, 1.0) if dtype == torch.float32 else 0.01 * scale
        assert err <= bound, f"{what} token {i}: |error| {err:.3g} > {bound:.3g}"


def _run_stream(layer: int, x: torch.Tensor) -> torch.Tensor:
    out = x.clone()
    torch.ops.vsteer.steer_(out, layer)
    return out


def _run_residual(layer: int, h: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h2, r2 = h.clone(), r.clone()
    torch.ops.vsteer.steer_residual_(h2, r2, layer)
    return h2, r2


@pytest.mark.parametrize("max_projections", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_stream_output_matches_operator_math(resolver, make_tables, dtype, max_projections):
    """Blocks that return the stream (``steer_``): every token equals ``apply_plan``;
    add-only and unsteered tokens are exactly the plain add / untouched."""
    tables = make_tables(dtype, max_projections)
    plans = _batch(resolver, tables, MIXED)
    for layer in LAYERS:
        x = _states(len(plans[layer]), layer, dtype, resolver)
        got = _run_stream(layer, x)
        _check_close(got, _expected(x, plans[layer]), plans[layer], dtype, f"{dtype} layer {layer}")
        row_of = tables.rows[: len(x)]
        for i, plan in enumerate(plans[layer]):
            if plan is None:
                assert torch.equal(got[i], x[i]), f"unsteered token {i} changed"
            elif plan.is_add_only:
                assert torch.equal(got[i], x[i] + tables.tables[layer, row_of[i]]), f"add-only token {i}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_residual_output_matches_operator_math(resolver, make_tables, dtype):
    """Blocks that return ``(hidden_states, residual)``: the sum is the steered stream; for
    tokens of projecting/norm configs hidden_states is zeroed and residual holds the new
    stream (what the next block's fused add-norm needs); add-only tokens only add to
    hidden_states, bit for bit."""
    tables = make_tables(dtype)
    plans = _batch(resolver, tables, MIXED)
    for layer in LAYERS:
        n = len(plans[layer])
        h, r = _states(n, 100 + layer, dtype, resolver), _states(n, 200 + layer, dtype, resolver)
        stream = h.float() + r.float()  # what the op reads as the stream
        got_h, got_r = _run_residual(layer, h, r)
        summed = got_h.float() + got_r.float()
        _check_close(summed, _expected(stream, plans[layer]), plans[layer], dtype, f"{dtype} layer {layer}")
        row_of = tables.rows[:n]
        for i, plan in enumerate(plans[layer]):
            if plan is None:
                assert torch.equal(got_h[i], h[i]) and torch.equal(got_r[i], r[i]), f"unsteered token {i}"
            elif plan.is_add_only:
                assert torch.equal(got_h[i], h[i] + tables.tables[layer, row_of[i]]), f"add-only token {i}"
                assert torch.equal(got_r[i], r[i]), f"add-only token {i}: residual must not change"
            else:
                assert not got_h[i].any(), f"general token {i}: hidden_states must be zeroed"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_operator_effects(resolver, make_tables, dtype):
    """What each operator promises, measured on the op's output: the ablated directions
    are gone, the clamped projection is the target, preserve keeps each token's norm."""
    tables = make_tables(dtype)
    names = ["ablate", "two_ablations", "clamp_raw", "clamp_relative", "add_preserve", "composed"]
    _batch(resolver, tables, names)
    x = _states(len(names) * TOKENS_PER_REQUEST, 7, dtype, resolver)
    got = _run_stream(0, x).float().view(len(names), TOKENS_PER_REQUEST, H)
    before = x.float().view(len(names), TOKENS_PER_REQUEST, H)
    u = {v: resolver.registry.load(v).vectors[0] / resolver.registry.load(v).vectors[0].norm()
         for v in ("v1", "v2", "v3", "v4")}
    tol = 1e-4 if dtype == torch.float32 else 0.015
    scale = before.norm(dim=-1)
    out = dict(zip(names, got))
    assert ((out["ablate"] @ u["v2"]).abs() <= tol * scale[0]).all()
    assert ((out["two_ablations"] @ torch.stack([u["v2"], u["v4"]]).T).abs() <= tol * scale[1, :, None]).all()
    v3 = resolver.registry.load("v3").vectors[0]
    assert torch.allclose(out["clamp_raw"] @ u["v3"], torch.full((3,), 0.5 * float(v3.norm())), atol=tol * 20)
    assert torch.allclose(out["clamp_relative"] @ u["v3"], torch.full((3,), -0.3 * NORMS[0]), atol=tol * 20)
    assert torch.allclose(out["add_preserve"].norm(dim=-1), scale[4], rtol=tol)
    assert torch.allclose(out["composed"].norm(dim=-1), scale[5], rtol=tol)
    assert not torch.allclose(out["add_preserve"], before[4] + 3.0 * resolver.registry.load("v1").vectors[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_only_tokens_are_bit_identical_beside_projections(resolver, make_tables, dtype):
    """An add-only request gives exactly the previous op's result (``h += table[row]``),
    whether or not other rows of the step use projections or the norm rescale."""
    tables = make_tables(dtype)
    plain = ["add", None, "add_relative"]
    _batch(resolver, tables, plain)
    n = len(plain) * TOKENS_PER_REQUEST
    x, h, r = (_states(n, s, dtype, resolver) for s in (1, 2, 3))
    previous = x + tables.tables[0].index_select(0, tables.rows[:n])  # the add-only op before issue 12
    alone = _run_stream(0, x)
    alone_h, alone_r = _run_residual(0, h, r)
    assert torch.equal(alone, previous)
    _batch(resolver, tables, plain + ["composed", "ablate"])
    mixed = _run_stream(0, torch.cat([x, _states(6, 4, dtype, resolver)]))[:n]
    mixed_h, mixed_r = _run_residual(0, torch.cat([h, _states(6, 5, dtype, resolver)]),
                                     torch.cat([r, _states(6, 6, dtype, resolver)]))
    assert tables.general_active[0]
    assert torch.equal(mixed, alone) and torch.equal(mixed_h[:n], alone_h) and torch.equal(mixed_r[:n], alone_r)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("step", ["mixed", "add_only", "unsteered", "cleared"])
def test_full_path_equals_eager(resolver, make_tables, monkeypatch, dtype, step):
    """While a CUDA graph is captured the op runs its branch-free "full" path for every
    hooked layer; its results must equal the eager path's, bit for bit, whatever the step
    holds (eager skips idle layers and uses the plain add when no row projects)."""
    tables = make_tables(dtype)
    names = {"mixed": MIXED, "add_only": ["add", None, "add_relative", "late_add"],
             "unsteered": [None, None]}.get(step, ["composed"])
    if step == "unsteered":
        tables.clear()
        tables.set_token_rows(np.array([3, 3]), np.array([0, 0]), np.array([3, 3]), np.zeros(2, np.int64),
                              np.zeros(2, np.int64))
    else:
        _batch(resolver, tables, names)
    if step == "cleared":
        tables.clear()
    n = TOKENS_PER_REQUEST * len(names)
    for layer in LAYERS:
        x, h, r = (_states(n, 10 * layer + s, dtype, resolver) for s in (1, 2, 3))
        eager = _run_stream(layer, x), *_run_residual(layer, h, r)
        with monkeypatch.context() as m:
            m.setattr(ops, "_capturing", lambda: True)
            full = _run_stream(layer, x), *_run_residual(layer, h, r)
        for e, f in zip(eager, full):
            assert torch.equal(e, f), f"{step} layer {layer}: full path != eager"


def test_norm_preserve_without_projection_slots(resolver, make_tables):
    """VSTEER_MAX_PROJECTIONS=0 turns ablate/clamp off but keeps norm=preserve working."""
    tables = make_tables(torch.float32, max_projections=0)
    plans = _batch(resolver, tables, ["add_preserve", "add"])
    x = _states(6, 0, torch.float32, resolver)
    got = _run_stream(0, x)
    _check_close(got, _expected(x, plans[0]), plans[0], torch.float32, "K=0")
    with pytest.raises(RuntimeError, match="VSTEER_MAX_PROJECTIONS"):
        _batch(resolver, tables, ["ablate"])
