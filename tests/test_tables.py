"""Host-side per-step tables: the position rule from absolute positions, chunked prefill
equivalence, row reuse and eviction. No vLLM needed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vsteer.engine.positions import POSITION_CODES
from vsteer.engine.resolver import SteeringResolver, encode_inline
from vsteer.serving.prepared import PreparedSteering
from vsteer.serving.tables import SteeringTables, steered_token_mask


def _resolved(fp: str, layers: dict[int, float], positions: str = "all") -> PreparedSteering:
    """A real resolution of inline vectors (``value`` at every element of each layer), as
    the engine core prepares it for the tables."""
    resolver = SteeringResolver(None, hidden_size=4, num_layers=16)
    resolved = resolver.resolve({"vectors": [{"name": fp, "data": {layer: encode_inline(torch.full((4,), value))}}
                                             for layer, value in layers.items()], "positions": positions})
    return PreparedSteering.build(resolved, dtype=torch.float32, max_projections=2)


@pytest.mark.parametrize("mode,expected", [
    ("all", list(range(8))), ("prompt", [0, 1, 2, 3, 4]), ("generated", [5, 6, 7]), ("first", [0]), ("last", [4]),
])
def test_position_rule(mode, expected):
    positions = np.arange(8)
    mask = steered_token_mask(positions, np.full(8, 5), np.full(8, POSITION_CODES[mode]))
    assert np.flatnonzero(mask).tolist() == expected


def _rows_for(tables, chunks, computed, prompt_len, mode):
    """Run a request's prompt through the tables in chunks; collect the rows per position."""
    out = []
    row = tables.assign_rows({"x": _resolved("x", {0: 1.0}, mode)})["x"]
    for n in chunks:
        tables.set_token_rows(np.array([n]), np.array([computed]), np.array([prompt_len]), np.array([row]),
                              np.array([POSITION_CODES[mode]]))
        out += tables.rows[:n].tolist()
        computed += n
    return out


@pytest.mark.parametrize("mode", ["all", "prompt", "generated", "first", "last"])
def test_chunked_prefill_equals_one_pass(mode):
    tables = SteeringTables([0, 1], 4, max_configs=4, max_tokens=32, dtype=torch.float32, device="cpu")
    whole = _rows_for(tables, [10, 1, 1], 0, 10, mode)
    chunked = _rows_for(tables, [3, 3, 4, 1, 1], 0, 10, mode)
    assert whole == chunked


def test_mixed_batch_rows_and_tables():
    tables = SteeringTables([0, 1, 2], 4, max_configs=4, max_tokens=32, dtype=torch.float32, device="cpu")
    configs = {"p": _resolved("p", {0: 1.0, 2: 2.0}, "prompt"), "g": _resolved("g", {1: -1.0}, "generated")}
    rows = tables.assign_rows(configs)
    # request 0: unsteered 3-token prefill; request 1: 'p' 4-token prefill; request 2: 'g' decode at position 6
    steered = tables.set_token_rows(np.array([3, 4, 1]), np.array([0, 0, 6]), np.array([3, 4, 6]),
                                    np.array([0, rows["p"], rows["g"]]),
                                    np.array([0, POSITION_CODES["prompt"], POSITION_CODES["generated"]]))
    assert tables.rows[:8].tolist() == [0, 0, 0, rows["p"], rows["p"], rows["p"], rows["p"], rows["g"]]
    assert steered == 5
    assert torch.equal(tables.tables[:, 0], torch.zeros(3, 4))
    assert tables.tables[0, rows["p"], 0] == 1.0 and tables.tables[2, rows["p"], 0] == 2.0
    assert tables.tables[1, rows["p"], 0] == 0.0 and tables.tables[1, rows["g"], 0] == -1.0
    assert tables.layer_active == [True, True, True]
    # a smaller next step zeroes the stale tail
    tables.set_token_rows(np.array([2]), np.array([0]), np.array([2]), np.array([0]), np.array([0]))
    assert tables.rows.tolist() == [0] * 32


def test_rows_are_reused_and_evicted_lru():
    tables = SteeringTables([0], 4, max_configs=2, max_tokens=8, dtype=torch.float32, device="cpu")
    a, b, c = (_resolved(k, {0: v}) for k, v in (("a", 1.0), ("b", 2.0), ("c", 3.0)))
    ra = tables.assign_rows({"a": a})["a"]
    rb = tables.assign_rows({"b": b})["b"]
    assert tables.assign_rows({"a": a})["a"] == ra          # resident: not rewritten
    rc = tables.assign_rows({"c": c})["c"]                    # evicts b (least recently used)
    assert rc == rb and tables.tables[0, rc, 0] == 3.0 and tables.tables[0, ra, 0] == 1.0
    with pytest.raises(RuntimeError, match="table capacity"):
        tables.assign_rows({"a": a, "b": b, "c": c})


def test_layers_of_other_pipeline_stages_are_ignored():
    tables = SteeringTables([4, 5], 4, max_configs=2, max_tokens=8, dtype=torch.float32, device="cpu")
    tables.assign_rows({"x": _resolved("x", {1: 1.0, 5: 2.0})})
    assert tables.layer_active == [False, True]


def test_clear():
    tables = SteeringTables([0], 4, max_configs=2, max_tokens=8, dtype=torch.float32, device="cpu")
    row = tables.assign_rows({"a": _resolved("a", {0: 1.0})})["a"]
    tables.set_token_rows(np.array([3]), np.array([0]), np.array([3]), np.array([row]), np.array([0]))
    tables.clear()
    assert tables.rows.tolist() == [0] * 8 and tables.layer_active == [False]
