"""Worker side: hook the decoder layers after the model loads, and fill the steering
tables once per scheduler step from the runner's own batch state.

Mirrors how vLLM's LoRA support works (``lora_model_runner_mixin.set_active_loras``): the
per-token mapping is built on the host from the input batch right after ``_prepare_inputs``
and copied into persistent buffers the model reads.
"""

from __future__ import annotations

import functools
import logging
import socket
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
from torch import nn

from vsteer.engine.errors import SteeringError
from vsteer.engine.layers import decoder_layer_map
from vsteer.engine.positions import POSITION_CODES
from vsteer.engine.registry import VectorRegistry
from vsteer.engine.resolver import ResolvedSteering, SteeringResolver
from vsteer.engine.settings import settings

from . import capture, ops
from .keys import PINS_KEY, STEERING_KEY
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


class WorkerSteering:
    """Per-worker steering state: hooks, tables, resolver and a per-request cache."""

    def __init__(self, runner: Any):
        model = runner.get_model()
        blocks = find_vllm_decoder_layers(model)
        s = settings()
        steerable = s.steerable_layers
        layers = sorted(layer for layer in blocks if steerable is None or layer in steerable)
        mc = runner.model_config
        self.hidden_size = mc.get_hidden_size()
        self.num_layers = mc.get_total_num_hidden_layers()
        self.tables = SteeringTables(layers, self.hidden_size, max_configs=runner.max_num_reqs,
                                     max_tokens=runner.max_num_tokens, dtype=runner.dtype, device=runner.device,
                                     max_projections=s.max_projections)
        if s.vectors_dir is not None and not Path(s.vectors_dir).is_dir():
            # Never serve unsteered because this node lacks the volume: fail the start.
            raise RuntimeError(f"vsteer: VSTEER_VECTORS_DIR={s.vectors_dir} does not exist on this worker "
                               f"(host {socket.gethostname()}); mount the vector registry at the same path on "
                               "every node (docs/scale-out.md)")
        self.resolver = SteeringResolver(VectorRegistry(s.vectors_dir) if s.vectors_dir else None,
                                         hidden_size=self.hidden_size, num_layers=self.num_layers,
                                         steerable=steerable, dtype=runner.dtype)
        self._requests: dict[str, tuple[ResolvedSteering, int] | None] = {}
        # front-end fingerprint -> resolution, held only while some request uses it
        self._by_fingerprint: weakref.WeakValueDictionary[str, ResolvedSteering] = weakref.WeakValueDictionary()
        self._plan: _BatchPlan | None = None  # the last step's batch (reused by decode steps)
        self.failed: set[str] = set()
        """Requests this worker could not steer since the last model output: they finish
        with an error (``vsteer.serving.failures``), never as an unsteered success."""
        self.stats = {"steps": 0, "steered_steps": 0, "steered_tokens": 0, "build_seconds": 0.0,
                      "step_seconds": 0.0, "configs_per_step": [], "resolve_failures": 0}
        for layer in layers:
            blocks[layer].register_forward_hook(_make_hook(layer))
        ops.set_tables(self.tables)
        # extraction (vsteer extract --engine vllm): capture hooks on every block, only in
        # engines started with VSTEER_CAPTURE=1 (serving/capture.py)
        self.capture = capture.WorkerCapture(runner, blocks) if s.capture else None
        logger.info("vsteer: steering hooks on %d decoder layers (%s), tables %.1f MiB (%d projection slots)",
                    len(layers), f"{layers[0]}..{layers[-1]}" if layers else "none",
                    self.tables.nbytes / 2**20, s.max_projections)

    def _build_plan(self, runner: Any, req_ids: list[str], prompt_lens: np.ndarray) -> _BatchPlan:
        """Rows and position rules of this batch's requests (in batch order); makes their
        configs resident in the tables."""
        known, requests = self._requests, runner.requests
        entries = [known[r] if r in known else self._lookup(r, requests.get(r)) for r in req_ids]
        configs = {e[0].fingerprint: e[0] for e in entries if e is not None}
        n = len(req_ids)
        rows, modes = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
        if configs:
            row_of = self.tables.assign_rows(configs)
            rows[:] = [0 if e is None else row_of[e[0].fingerprint] for e in entries]
            modes[:] = [0 if e is None else e[1] for e in entries]
        return _BatchPlan(list(req_ids), prompt_lens.copy(), self.tables.generation, len(configs), rows, modes,
                          SteeringTables.decode_rows(prompt_lens, rows, modes),
                          (self.tables.layer_active, self.tables.general_active))

    def _lookup(self, req_id: str, request_state: Any) -> tuple[ResolvedSteering, int] | None:
        if req_id in self._requests:
            return self._requests[req_id]
        entry = None
        params = getattr(request_state, "sampling_params", None)
        extra = getattr(params, "extra_args", None) or {}
        spec = extra.get(STEERING_KEY)
        if spec:
            pins = extra.get(PINS_KEY) or {}
            pinned = pins.get("fingerprint")
            try:
                # The front-end's fingerprint names exact content (per-layer hashes, coefficients,
                # rule): a request whose config a live request already uses needs no resolution.
                resolved = self._by_fingerprint.get(pinned) if pinned else None
                if resolved is None:
                    resolved = self.resolver.resolve(spec, versions=pins.get("versions"))
                    if resolved is not None and pinned:
                        self._by_fingerprint[pinned] = resolved
                if resolved is not None:
                    entry = (resolved, POSITION_CODES[resolved.positions])
            except (SteeringError, OSError) as e:  # the pinned version vanished (deleted by hand?)
                self.stats["resolve_failures"] += 1
                self.failed.add(req_id)
                logger.error("vsteer: request %s cannot be steered and will fail: %s", req_id, e)
        self._requests[req_id] = entry
        return entry

    def step(self, runner: Any, scheduler_output: Any, num_scheduled_tokens: np.ndarray) -> None:
        """Fill rows/tables for this step; called right after ``_prepare_inputs``."""
        t0 = time.perf_counter()
        if self.capture is not None:  # extraction capture (serving/capture.py)
            self.capture.step(runner, num_scheduled_tokens)
        for req_id in getattr(scheduler_output, "finished_req_ids", ()) or ():
            self._requests.pop(req_id, None)
        # vLLM skips _prepare_inputs on steps that schedule no tokens, so the finished ids
        # of such a step never reach us: drop whatever the runner no longer holds.
        if len(self._requests) > len(runner.requests):
            for req_id in [r for r in self._requests if r not in runner.requests]:
                del self._requests[req_id]
        batch = runner.input_batch
        num_reqs = batch.num_reqs
        req_ids = batch.req_ids[:num_reqs]
        prompt_lens = batch.num_prompt_tokens[:num_reqs]
        plan = self._plan
        # Consecutive decode steps keep the same requests in the same order: reuse the last
        # plan (no per-request Python; one list comparison) unless a table row was written
        # or evicted since (tables.generation) or a prompt grew (resumable requests).
        if plan is None or plan.generation != self.tables.generation or plan.req_ids != req_ids \
                or not np.array_equal(plan.prompt_lens, prompt_lens):
            plan = self._plan = self._build_plan(runner, req_ids, prompt_lens)
        self.stats["steps"] += 1
        if not plan.num_configs:
            self.tables.clear()
            return
        self.tables.layer_active, self.tables.general_active = plan.active  # clear() may have reset them
        steered = self.tables.set_token_rows(
            np.asarray(num_scheduled_tokens[:num_reqs]), batch.num_computed_tokens_cpu[:num_reqs],
            prompt_lens, plan.rows, plan.modes, decode_rows=plan.decode_rows)
        self.stats["steered_steps"] += 1
        self.stats["steered_tokens"] += steered
        self.stats["configs_per_step"].append(plan.num_configs)
        if len(self.stats["configs_per_step"]) > 10000:
            del self.stats["configs_per_step"][:5000]
        self.stats["build_seconds"] += time.perf_counter() - t0

    def take_failed(self) -> set[str]:
        failed, self.failed = self.failed, set()
        return failed


def load_model_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """``Worker.load_model``: after the model loads, hook its decoder layers."""
    from .compat import check_runner

    @functools.wraps(original)
    def load_model(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        check_runner(self.model_runner, getattr(self, "parallel_config", None))
        self.model_runner._vsteer = WorkerSteering(self.model_runner)
        return out

    return load_model


def prepare_inputs_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """``GPUModelRunner._prepare_inputs``: fill the steering tables for the step just prepared."""

    @functools.wraps(original)
    def _prepare_inputs(self, scheduler_output, num_scheduled_tokens, *args, **kwargs):
        out = original(self, scheduler_output, num_scheduled_tokens, *args, **kwargs)
        state = getattr(self, "_vsteer", None)
        if state is not None:
            state.step(self, scheduler_output, num_scheduled_tokens)
        return out

    return _prepare_inputs


def timed_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """``GPUModelRunner.execute_model`` / ``sample_tokens``: time spent in model steps (the
    denominator of the table-build share; host time, so on GPU with async scheduling it
    is a lower bound)."""

    @functools.wraps(original)
    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            state = getattr(self, "_vsteer", None)
            if state is not None:
                state.stats["step_seconds"] += time.perf_counter() - t0

    return timed


def dummy_run_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """``GPUModelRunner._dummy_run``: profile/warm-up/capture runs carry no requests."""

    @functools.wraps(original)
    def _dummy_run(self, *args, **kwargs):
        state = getattr(self, "_vsteer", None)
        if state is not None:
            state.tables.clear()
            if state.capture is not None:  # a dummy forward captures nothing
                state.capture.idle()
        return original(self, *args, **kwargs)

    return _dummy_run


def vsteer_stats(self) -> dict[str, Any]:
    """``Worker.vsteer_stats``, a ``collective_rpc`` target: this worker's steering counters."""
    state = getattr(self.model_runner, "_vsteer", None)
    if state is None:
        return {}
    stats = dict(state.stats)
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
