"""Worker side: hook the decoder layers after the model loads, and fill the steering
tables once per scheduler step from the runner's batch.

Mirrors how vLLM's LoRA support works (``lora_model_runner_mixin.set_active_loras``): the
per-token mapping is built on the host right after the runner prepares its inputs and
copied into persistent buffers the model reads. Which runner methods call in here is the
business of the runner adapters (``vsteer.serving.runners``); this module sees only
``StepBatch`` values and each request's sampling params.

A worker resolves nothing: each steered request arrives with its config already prepared
(``PreparedSteering``, built once per fingerprint in the engine core's input thread,
``vsteer.serving.admission``). Writing a new config into a table row is a copy, batched
per step. A steered request without prepared rows (a path that bypassed the engine core)
is failed, never run unsteered (``vsteer.serving.failures``).
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
from torch import nn

from vsteer.engine.layers import decoder_layer_map
from vsteer.engine.settings import settings

from . import capture, ops
from .keys import PINS_KEY, ROWS_KEY
from .prepared import PreparedSteering
from .runners.base import STATE_ATTR, StepBatch, steering_of
from .tables import SteeringTables

logger = logging.getLogger("vllm.vsteer")


def find_vllm_decoder_layers(model: nn.Module) -> dict[int, nn.Module]:
    """Absolute layer index -> decoder block, for the blocks this pipeline stage owns
    (the shared locator in ``vsteer.engine.layers``, skipping ``PPMissingLayer``)."""
    try:
        from vllm.model_executor.models.utils import PPMissingLayer
        placeholder: tuple[type, ...] = (PPMissingLayer,)
    except ImportError:  # pragma: no cover
        placeholder = ()
    try:
        return decoder_layer_map(model, placeholder=placeholder)
    except ValueError as e:
        raise RuntimeError(f"vsteer: {e}") from None


def _make_hook(layer: int):
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        ops.hook_output(output, layer)  # in place; the output object is unchanged
        return output
    return hook


@dataclass
class _BatchPlan:
    """One batch's per-request steering, in batch order (see ``WorkerSteering.step``)."""

    req_ids: list[str]
    prompt_lens: np.ndarray
    generation: int
    """``SteeringTables.generation`` when the rows were assigned."""
    num_configs: int
    rows: np.ndarray
    modes: np.ndarray
    decode_rows: np.ndarray
    active: tuple[list[bool], list[bool]]
    """The tables' (layer_active, general_active) for these configs."""


Lookup = Callable[[str], Any]
"""req_id -> the runner's request object (with ``sampling_params`` and
``prompt_token_ids``), or None."""


class WorkerSteering:
    """Per-worker steering state: hooks, tables and each live request's prepared config."""

    def __init__(self, runner: Any, generation: str = "v1"):
        model = runner.get_model()
        blocks = find_vllm_decoder_layers(model)
        s = settings()
        steerable = s.steerable_layers
        layers = sorted(layer for layer in blocks if steerable is None or layer in steerable)
        mc = runner.model_config
        self.generation = generation
        self.hidden_size = mc.get_hidden_size()
        self.num_layers = mc.get_total_num_hidden_layers()
        self.tables = SteeringTables(layers, self.hidden_size, max_configs=s.table_rows(runner.max_num_reqs),
                                     max_tokens=runner.max_num_tokens, dtype=runner.dtype, device=runner.device,
                                     max_projections=s.max_projections)
        self._requests: dict[str, PreparedSteering | None] = {}
        self._announced: dict[str, Any] = {}
        self._plan: _BatchPlan | None = None  # the last step's batch (reused by decode steps)
        self.failed: set[str] = set()
        """Requests this worker could not steer since the last model output: they finish
        with an error (``vsteer.serving.failures``), never as an unsteered success."""
        self.stats = {"steps": 0, "steered_steps": 0, "steered_tokens": 0, "build_seconds": 0.0,
                      "step_seconds": 0.0, "configs_per_step": [], "resolve_failures": 0, "new_configs": 0,
                      "deferred_requests": 0}
        for layer in layers:
            blocks[layer].register_forward_hook(_make_hook(layer))
        ops.set_tables(self.tables)
        # extraction (vsteer extract --engine vllm): capture hooks on every block, only in
        # engines started with VSTEER_CAPTURE=1 (serving/capture.py)
        self.capture = capture.WorkerCapture(runner, blocks) if s.capture else None
        logger.info("vsteer: steering hooks on %d decoder layers (%s) through Model Runner %s, tables %.1f MiB "
                    "(%d config rows, %d projection slots)", len(layers),
                    f"{layers[0]}..{layers[-1]}" if layers else "none", generation.upper(),
                    self.tables.nbytes / 2**20, self.tables.max_configs, s.max_projections)

    # -- requests --------------------------------------------------------------------------
    def admit(self, req_id: str, request: Any) -> PreparedSteering | None:
        """Learn a request's steering (once per request) from the runner's request object
        (anything with ``sampling_params``: V1's ``CachedRequestState``, V2's ``NewRequestData``)."""
        extra = getattr(getattr(request, "sampling_params", None), "extra_args", None) or {}
        prepared = extra.get(ROWS_KEY)
        if not isinstance(prepared, PreparedSteering):
            prepared = None
            if extra.get(PINS_KEY):  # steered, but its rows never reached this worker
                self.stats["resolve_failures"] += 1
                self.failed.add(req_id)
                logger.error("vsteer: request %s carries steering without prepared rows and will fail (was it "
                             "submitted past vLLM's engine core?)", req_id)
        self._requests[req_id] = prepared
        return prepared

    def remember(self, req_id: str, request: Any) -> None:
        """Runners that announce new requests (V2's ``add_requests``): keep the request
        object (its ``sampling_params``, ``prompt_token_ids``) until the runner drops it."""
        self._announced[req_id] = request
        self._requests.pop(req_id, None)  # a resumed request is announced again: read it anew

    def remembered(self, req_id: str) -> Any:
        return self._announced.get(req_id)

    def forget(self, req_id: str) -> None:
        self._requests.pop(req_id, None)
        self._announced.pop(req_id, None)

    def forget_missing(self, live: Any) -> None:
        """Drop requests the runner no longer holds (``live``: a container of req_ids)."""
        if len(self._requests) > len(live):
            for req_id in [r for r in self._requests if r not in live]:
                del self._requests[req_id]

    # -- steps -----------------------------------------------------------------------------
    def _build_plan(self, batch: StepBatch, lookup: Lookup | None) -> _BatchPlan:
        """Rows and position rules of this batch's requests (in batch order); makes their
        configs resident in the tables."""
        known = self._requests
        entries = [known[r] if r in known else self.admit(r, lookup(r) if lookup else None) for r in batch.req_ids]
        configs = {e.fingerprint: e for e in entries if e is not None}
        n = len(entries)
        rows, modes = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        if configs:
            row_of = self.tables.assign_rows(configs)
            self.stats["new_configs"] += self.tables.last_written
            rows[:] = [0 if e is None else row_of[e.fingerprint] for e in entries]
            modes[:] = [0 if e is None else e.position_code for e in entries]
        prompt_lens = np.asarray(batch.prompt_lens)
        return _BatchPlan(list(batch.req_ids), prompt_lens.copy(), self.tables.generation, len(configs), rows, modes,
                          SteeringTables.decode_rows(prompt_lens, rows, modes),
                          (self.tables.layer_active, self.tables.general_active))

    def step(self, batch: StepBatch, lookup: Lookup | None = None) -> None:
        """Fill rows/tables for the step just prepared (called by the runner adapter)."""
        t0 = time.perf_counter()
        if self.capture is not None:  # extraction capture (serving/capture.py)
            self.capture.step(batch, lookup)
        self.stats["deferred_requests"] += int(getattr(batch.scheduler_output, "vsteer_deferred", 0) or 0)
        plan = self._plan
        # Consecutive decode steps keep the same requests in the same order: reuse the last
        # plan (no per-request Python; one list comparison) unless a table row was written
        # or evicted since (tables.generation) or a prompt grew (resumable requests).
        if plan is None or plan.generation != self.tables.generation or plan.req_ids != list(batch.req_ids) \
                or not np.array_equal(plan.prompt_lens, batch.prompt_lens):
            plan = self._plan = self._build_plan(batch, lookup)
        self.stats["steps"] += 1
        if not plan.num_configs:
            self.tables.clear()
            return
        self.tables.layer_active, self.tables.general_active = plan.active  # clear() may have reset them
        steered = self.tables.set_token_rows(np.asarray(batch.num_scheduled), np.asarray(batch.num_computed),
                                             plan.prompt_lens, plan.rows, plan.modes, decode_rows=plan.decode_rows)
        self.stats["steered_steps"] += 1
        self.stats["steered_tokens"] += steered
        self.stats["configs_per_step"].append(plan.num_configs)
        if len(self.stats["configs_per_step"]) > 10000:
            del self.stats["configs_per_step"][:5000]
        self.stats["build_seconds"] += time.perf_counter() - t0

    def idle(self) -> None:
        """A forward that carries no requests (profile, warm-up, CUDA-graph capture, an idle
        data-parallel rank): no steering, no capture."""
        self.tables.clear()
        if self.capture is not None:
            self.capture.idle()

    def take_failed(self) -> set[str]:
        failed, self.failed = self.failed, set()
        return failed


def load_model_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """``Worker.load_model``: after the model loads, pick the runner adapter for the runner
    vLLM built (refusing one no adapter knows) and hook the decoder layers."""
    from .runners import adapter_for

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        runner = self.model_runner
        adapter = adapter_for(runner)
        adapter.check(runner, getattr(self, "vllm_config", None))
        setattr(runner, STATE_ATTR, WorkerSteering(runner, adapter.name))
        return out

    return load_model


def timed_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """The runner's ``execute_model``: time spent in model steps (the denominator of the
    table-build share; host time, so on GPU with async scheduling it is a lower bound)."""

    @functools.wraps(original)
    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            state = steering_of(self)
            if state is not None:
                state.stats["step_seconds"] += time.perf_counter() - t0

    return timed


def vsteer_stats(self) -> dict[str, Any]:
    """``Worker.vsteer_stats``, a ``collective_rpc`` target: this worker's steering counters."""
    state = steering_of(self.model_runner)
    if state is None:
        return {}
    stats = dict(state.stats)
    stats["runner"] = state.generation
    state.stats["configs_per_step"] = []
    return stats


def compile_hash_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """vLLM's AOT compile cache key ignores plugins: add ours, so a graph compiled without
    the steering op is never loaded into a process that needs it (and vice versa)."""

    @functools.wraps(original)
    def aot_compile_hash_factors(vllm_config):
        from vsteer.engine.version import __version__

        return list(original(vllm_config)) + [f"vsteer={__version__};layers={settings().layers or 'all'}"
                                          f";capture={int(settings().capture)}"]

    return aot_compile_hash_factors
