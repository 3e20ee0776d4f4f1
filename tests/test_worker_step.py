"""The worker's per-step fast paths give the same rows as the general computation:
decode steps reuse the last batch plan and per-request decode rows; configs arrive
prepared (a worker resolves nothing) and a steered request without prepared rows fails.
No vLLM needed: a synthetic V1-style runner with the fields the V1 adapter reads."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from vsteer.engine.positions import RULES
from vsteer.engine.resolver import SteeringResolver, encode_inline
from vsteer.serving import ops
from vsteer.serving.keys import PINS_KEY, ROWS_KEY
from vsteer.serving.prepared import PreparedSteering
from vsteer.serving.runners import v1
from vsteer.serving.tables import SteeringTables, steered_token_mask
from vsteer.serving.worker import WorkerSteering

HIDDEN, LAYERS = 8, 4


@pytest.mark.parametrize("rule", list(RULES))
def test_every_rule_is_constant_past_the_prompt(rule):
    """What ``SteeringTables.decode_rows`` relies on: a token past its prompt is steered or
    not by its rule alone, whatever its position."""
    for plen in range(1, 12):
        pos = np.arange(plen, plen + 40)
        mask = steered_token_mask(pos, np.full_like(pos, plen), np.full_like(pos, RULES[rule].code))
        assert mask.all() or not mask.any(), (rule, plen)


def test_decode_rows_equal_the_general_path():
    rng = np.random.default_rng(0)
    tables = SteeringTables([0], HIDDEN, max_configs=8, max_tokens=256, dtype=torch.float32, device="cpu")
    for _ in range(50):
        n = int(rng.integers(1, 20))
        plen = rng.integers(1, 10, n)
        rows, modes = rng.integers(0, 9, n), rng.integers(0, len(RULES), n)
        # decode (past the prompt), the last prompt token (1 token, still in the prompt), prefill chunks
        for computed, sched in ((plen + rng.integers(0, 5, n), np.ones(n, np.int32)),
                                (plen - 1, np.ones(n, np.int32)),
                                (np.zeros(n, np.int64), plen.astype(np.int32))):
            tables.set_token_rows(sched, computed, plen, rows, modes)
            expected = tables.rows[: int(sched.sum())].clone()
            steered = tables.set_token_rows(sched, computed, plen, rows, modes,
                                            decode_rows=SteeringTables.decode_rows(plen, rows, modes))
            assert torch.equal(tables.rows[: int(sched.sum())], expected)
            assert steered == int(expected.count_nonzero())


# -- the worker's batch plan ------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.self_attn = nn.Identity()


class Runner:
    """The runner fields the worker reads (vllm_patches.check_runner_fields)."""

    def __init__(self, max_reqs: int = 4):
        model = nn.Module()
        model.model = nn.Module()
        model.model.layers = nn.ModuleList(Block() for _ in range(LAYERS))
        self._model = model
        self.model_config = SimpleNamespace(get_hidden_size=lambda: HIDDEN, get_total_num_hidden_layers=lambda: LAYERS)
        self.max_num_reqs, self.max_num_tokens, self.dtype, self.device = max_reqs, 64, torch.float32, "cpu"
        self.requests: dict[str, SimpleNamespace] = {}
        self.input_batch = SimpleNamespace(req_ids=[], num_reqs=0, num_computed_tokens_cpu=np.zeros(max_reqs, np.int32),
                                           num_prompt_tokens=np.zeros(max_reqs, np.int32))

    def get_model(self):
        return self._model

    def add(self, req_id: str, spec: dict | None, prompt_len: int, computed: int, rows: bool = True):
        """A request as the engine core hands it over: its pins and (``rows``) its prepared rows."""
        extra = {}
        if spec:
            prepared = prepare(spec)
            extra[PINS_KEY] = {"fingerprint": prepared.fingerprint}
            if rows:
                extra[ROWS_KEY] = prepared
        self.requests[req_id] = SimpleNamespace(sampling_params=SimpleNamespace(extra_args=extra))
        b, i = self.input_batch, self.input_batch.num_reqs
        b.req_ids.append(req_id)
        b.num_reqs += 1
        b.num_prompt_tokens[i], b.num_computed_tokens_cpu[i] = prompt_len, computed


def spec(strength: float, positions: str = "all", layer: int = 1) -> dict:
    return {"vectors": [{"name": "v", "strength": strength, "layers": [layer],
                         "data": {layer: encode_inline(torch.ones(HIDDEN))}}], "positions": positions}


def prepare(spec: dict) -> PreparedSteering:
    resolved = SteeringResolver(None, hidden_size=HIDDEN, num_layers=LAYERS).resolve(spec)
    return PreparedSteering.build(resolved, dtype=torch.float32, max_projections=2)


@pytest.fixture
def worker_and_runner(monkeypatch):
    monkeypatch.delenv("VSTEER_VECTORS_DIR", raising=False)
    runner = Runner()
    ws = WorkerSteering(runner)
    yield ws, runner
    ops.set_tables(None)


def _step(ws, runner, sched, finished=()):
    """One V1 step, as the adapter's ``_prepare_inputs`` wrapper runs it."""
    sched = np.asarray(sched, dtype=np.int32)
    runner._vsteer = ws
    v1.prepare_inputs_wrapper(lambda *a, **k: None)(runner, SimpleNamespace(finished_req_ids=set(finished)), sched)
    b = runner.input_batch
    b.num_computed_tokens_cpu[: b.num_reqs] += np.asarray(sched, dtype=np.int32)
    return ws.tables.rows[: int(np.sum(sched))].tolist()


def test_decode_steps_reuse_the_plan_and_match_a_fresh_worker(worker_and_runner):
    ws, runner = worker_and_runner
    runner.add("a", spec(1.0), prompt_len=3, computed=0)
    runner.add("b", None, prompt_len=2, computed=0)
    runner.add("c", spec(2.0, "generated"), prompt_len=2, computed=0)
    rows = _step(ws, runner, [3, 2, 2])  # prefill
    ra, rc = rows[0], None
    assert rows[:3] == [ra] * 3 and rows[3:] == [0, 0, 0, 0]  # c: prompt tokens unsteered
    plan = ws._plan
    for _ in range(3):
        rows = _step(ws, runner, [1, 1, 1])  # decode: c now steered
        rc = rows[2]
        assert rows[:2] == [ra, 0] and rc not in (0, ra)
        assert ws._plan is plan  # no per-request work
    # a dummy run clears the tables and their active flags; the next step restores them
    ws.tables.clear()
    assert not any(ws.tables.layer_active)
    assert _step(ws, runner, [1, 1, 1]) == [ra, 0, rc] and ws.tables.layer_active == [False, True, False, False]
    assert ws._plan is plan
    # a new request joins: rebuilt, rows unchanged for the others
    runner.add("d", spec(3.0, "prompt"), prompt_len=2, computed=0)
    rows = _step(ws, runner, [1, 1, 1, 2])
    assert ws._plan is not plan and rows[:3] == [ra, 0, rc] and rows[3] == rows[4] != 0
    assert ws.stats["steered_tokens"] == 3 + 2 * 3 + 2 + 4


def test_plan_rebuilt_when_rows_are_evicted(worker_and_runner):
    ws, runner = worker_and_runner
    runner.add("a", spec(1.0), prompt_len=1, computed=0)
    _step(ws, runner, [1])
    plan, row = ws._plan, ws.tables.rows[0].item()
    # another caller fills every row (the table holds max_num_reqs configs): "a" is evicted
    ws.tables.assign_rows({f"x{i}": prepare(spec(10.0 + i)) for i in range(runner.max_num_reqs)})
    rows = _step(ws, runner, [1])
    assert ws._plan is not plan and rows[0] != 0
    ra = ws.tables.rows[0].item()
    assert torch.equal(ws.tables.tables[1, ra], torch.ones(HIDDEN))  # a's vector was written again
    assert row != 0


def test_new_configs_of_a_step_are_written_together_and_counted(worker_and_runner):
    ws, runner = worker_and_runner
    for i, name in enumerate("abc"):
        runner.add(name, spec(1.0 + i, layer=1 + i % 2), prompt_len=2, computed=0)
    _step(ws, runner, [2, 2, 2])
    assert ws.stats["new_configs"] == 3 and ws.tables.last_written == 3
    rows = ws.tables.rows[:6].tolist()
    for i in range(3):
        layer = 1 + i % 2
        assert torch.equal(ws.tables.tables[layer, rows[2 * i]], torch.full((HIDDEN,), 1.0 + i))
        other = 2 if layer == 1 else 1
        assert not ws.tables.tables[other, rows[2 * i]].any()  # nothing stale at the other layer
    _step(ws, runner, [1, 1, 1])  # decode: nothing new
    assert ws.stats["new_configs"] == 3


def test_a_steered_request_without_rows_fails_and_is_never_steered_blind(worker_and_runner):
    ws, runner = worker_and_runner
    runner.add("a", spec(1.0), prompt_len=2, computed=0, rows=False)
    runner.add("b", spec(2.0), prompt_len=2, computed=0)
    rows = _step(ws, runner, [2, 2])
    assert rows[:2] == [0, 0] and rows[2] == rows[3] != 0
    assert ws.take_failed() == {"a"} and ws.stats["resolve_failures"] == 1


def test_finished_and_vanished_requests_are_forgotten(worker_and_runner):
    ws, runner = worker_and_runner
    runner.add("a", spec(1.0), prompt_len=2, computed=0)
    runner.add("b", spec(2.0), prompt_len=2, computed=0)
    _step(ws, runner, [2, 2])
    assert set(ws._requests) == {"a", "b"}
    # "a" finishes on a step that runs; "b" vanishes on a step vLLM never prepared
    del runner.requests["a"], runner.requests["b"]
    runner.input_batch.req_ids, runner.input_batch.num_reqs = [], 0
    _step(ws, runner, [], finished=("a",))
    assert not ws._requests
