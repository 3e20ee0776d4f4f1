"""Prometheus metrics for steering, exported on vLLM's own ``/metrics``.

Front-end numbers (requests, vectors, rejections, failed requests, registry) are recorded
where they happen, in each API-server process. Worker numbers (steered tokens, steps,
configs per step, table-build and step time, resolve failures) live in the worker
processes: one API server (``_api_process_rank`` 0) pulls them with ``collective_rpc``
when ``/metrics`` is scraped (at most once a second) and every
``VSTEER_METRICS_REFRESH_S`` seconds, and turns the workers' cumulative counters into
monotonic Prometheus counters by adding the increase since the last pull. With several
API servers (``--api-server-count``), vLLM aggregates the processes' metric files, so
exactly one of them must pull (or every worker count would be multiplied).

Every series carries ``model_name`` (the served name, like vLLM's own metrics); the
``reason`` label takes only values of ``REJECTION_REASONS``. docs/server.md lists them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from vsteer.engine.errors import REJECTION_REASONS

from .keys import WORKER_STATS_METHOD

logger = logging.getLogger("vllm.vsteer")

CONFIG_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512)
MIN_PULL_INTERVAL_S = 1.0
M = ("model_name",)

REQUESTS = Counter("vsteer_requests", "Generation requests that reached the engine, by whether steering was "
                   "applied (steered=\"true\"/\"false\")", [*M, "steered"])
VECTOR_REQUESTS = Counter("vsteer_vector_requests", "Steered requests per vector: the registry name, or "
                          "\"inline\" for vectors sent as inline data", [*M, "vector"])
REJECTIONS = Counter("vsteer_rejected_requests", "Requests refused (HTTP 400) for invalid steering, by reason "
                     "(a fixed set: docs/server.md)", [*M, "reason"])
FAILED_REQUESTS = Counter("vsteer_failed_requests", "Steered requests vLLM finished with an error (HTTP 500): "
                          "their pinned vectors could not be loaded, or another engine error", M)
STEERED_TOKENS = Counter("vsteer_steered_tokens", "Tokens that had steering applied (workers)", M)
STEPS = Counter("vsteer_steps", "Scheduler steps run by the model (workers)", M)
STEERED_STEPS = Counter("vsteer_steered_steps", "Scheduler steps with at least one steered request (workers)", M)
STEP_CONFIGS = Histogram("vsteer_step_configs", "Distinct steering configs in one steered scheduler step "
                         "(workers)", M, buckets=CONFIG_BUCKETS)
TABLE_BUILD_SECONDS = Counter("vsteer_table_build_seconds", "Time workers spent building the per-step "
                              "steering tables", M)
STEP_SECONDS = Counter("vsteer_step_seconds", "Time workers spent in model steps (execute_model + "
                       "sample_tokens; host time)", M)
WORKER_RESOLVE_FAILURES = Counter("vsteer_worker_resolve_failures", "Steered requests a worker could not "
                                  "steer (they reached it without prepared rows); each is finished with an "
                                  "error, summed over all ranks", M)
STEERED_MODEL_REQUESTS = Counter("vsteer_steered_model_requests", "Requests for a steered model (the model "
                                 "field named an alias: --steered-model or POST /v1/steering/models)",
                                 [*M, "steered_model"])
NEW_CONFIGS = Counter("vsteer_new_configs", "Steering configs written into a worker's tables (new to them)", M)
DEFERRED_REQUESTS = Counter("vsteer_deferred_requests", "Times the scheduler held a waiting steered request "
                            "back for one step: its config would have exceeded VSTEER_MAX_CONFIGS rows or "
                            "VSTEER_MAX_NEW_CONFIGS_PER_STEP", M)
REGISTRY_VECTORS = Gauge("vsteer_registry_vectors", "Vector sets in the registry directory", M,
                         multiprocess_mode="mostrecent")
REGISTRY_LOADS = Counter("vsteer_registry_loads", "Vector sets added to the registry through "
                         "POST /v1/steering/vectors, by source (path/upload)", [*M, "source"])
REGISTRY_REMOVALS = Counter("vsteer_registry_removals", "Vector sets removed through "
                            "DELETE /v1/steering/vectors/{name}", M)
STATS_PULL_FAILURES = Counter("vsteer_worker_stats_pull_failures", "Failed pulls of the workers' steering "
                              "counters (collective_rpc vsteer_stats)", M)

_model_name = ""


def set_model_name(name: str) -> None:
    """The served model's name (a label on every series); creates every fixed-label series
    at 0, so rates and alerts see the first increment."""
    global _model_name
    _model_name = name
    for steered in ("true", "false"):
        REQUESTS.labels(name, steered)
    for source in ("path", "upload"):
        REGISTRY_LOADS.labels(name, source)
    for reason in REJECTION_REASONS:
        REJECTIONS.labels(name, reason)
    for metric in (FAILED_REQUESTS, STEERED_TOKENS, STEPS, STEERED_STEPS, STEP_CONFIGS, TABLE_BUILD_SECONDS,
                   STEP_SECONDS, WORKER_RESOLVE_FAILURES, REGISTRY_REMOVALS, STATS_PULL_FAILURES, NEW_CONFIGS,
                   DEFERRED_REQUESTS):
        metric.labels(name)


# -- front-end recording ------------------------------------------------------------------------

def record_rejection(reason: str) -> None:
    REJECTIONS.labels(_model_name, reason if reason in REJECTION_REASONS else "invalid").inc()


def record_request(request: Any) -> None:
    """A steered request reached the engine (a ``SteeringRequest``)."""
    REQUESTS.labels(_model_name, "true").inc()
    if request.alias is not None:
        STEERED_MODEL_REQUESTS.labels(_model_name, request.alias).inc()
    for label in request.labels:
        VECTOR_REQUESTS.labels(_model_name, label).inc()


def record_unsteered() -> None:
    REQUESTS.labels(_model_name, "false").inc()


def record_failed_request() -> None:
    FAILED_REQUESTS.labels(_model_name).inc()


def record_registry_load(source: str) -> None:
    REGISTRY_LOADS.labels(_model_name, source).inc()


def record_registry_removal() -> None:
    REGISTRY_REMOVALS.labels(_model_name).inc()


def update_registry_size(registry: Any) -> None:
    try:
        REGISTRY_VECTORS.labels(_model_name).set(len(registry.names()) if registry is not None else 0)
    except OSError:
        pass


# -- worker counters ------------------------------------------------------------------------------

_FIRST_WORKER = {"steps": STEPS, "steered_steps": STEERED_STEPS, "steered_tokens": STEERED_TOKENS,
                 "build_seconds": TABLE_BUILD_SECONDS, "step_seconds": STEP_SECONDS, "new_configs": NEW_CONFIGS,
                 "deferred_requests": DEFERRED_REQUESTS}
"""Counted by one worker per engine (every tensor-parallel rank sees the same batch)."""
_ALL_WORKERS = {"resolve_failures": WORKER_RESOLVE_FAILURES}
"""Counted on every rank (each resolves on its own)."""


def pulls_worker_stats(engine_client: Any) -> bool:
    """Whether this API server pulls the workers' counters: the first of several, or the
    only one (vLLM's internal ``_api_process_rank``: 0, or -1 outside multi-server mode)."""
    config = getattr(getattr(engine_client, "vllm_config", None), "parallel_config", None)
    return getattr(config, "_api_process_rank", 0) in (0, -1)


async def _gather(engine_client: Any, timeout: float) -> list[list[dict[str, Any]]]:
    """Per engine (data-parallel rank), per worker: ``vsteer_stats()``. vLLM's
    ``collective_rpc`` reaches every DP engine but returns only the first one's results;
    its client's ``call_utility_all_async`` returns all of them."""
    core = getattr(engine_client, "engine_core", None)
    gather_all = getattr(core, "call_utility_all_async", None)
    if gather_all is not None and len(getattr(core, "core_engines", ()) or ()) > 1:
        per_engine = await asyncio.wait_for(
            gather_all("collective_rpc", WORKER_STATS_METHOD, None, (), None), timeout)
        return [list(r or []) for r in per_engine]
    results = await asyncio.wait_for(engine_client.collective_rpc(WORKER_STATS_METHOD), timeout)
    return [list(results) if isinstance(results, (list, tuple)) else [results]]


class WorkerStatsPuller:
    """Turns the workers' cumulative counters into Prometheus increments.

    ``vsteer_stats`` returns cumulative counts (and the configs-per-step samples since the
    previous call). We add ``now - last`` per (engine, worker, counter); a value that went
    down means the worker restarted, and then the whole new value is the increase."""

    def __init__(self) -> None:
        self._last: dict[tuple[int, int, str], float] = {}
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None
        self.last_pull: float = 0.0

    def _add(self, key: tuple[int, int, str], value: float, counter: Counter) -> None:
        prev = self._last.get(key, 0.0)
        delta = value - prev if value >= prev else value
        if delta > 0:
            counter.labels(_model_name).inc(delta)
        self._last[key] = value

    def apply(self, stats: dict[str, Any] | list[list[dict[str, Any]]]) -> None:
        per_engine = [[stats]] if isinstance(stats, dict) else stats
        for e, workers in enumerate(per_engine):
            for w, worker in enumerate(workers):
                if not isinstance(worker, dict):
                    continue
                counters = {**_ALL_WORKERS, **(_FIRST_WORKER if w == 0 else {})}
                for key, counter in counters.items():
                    if key in worker:
                        self._add((e, w, key), float(worker[key] or 0), counter)
                if w == 0:
                    for n in worker.get("configs_per_step") or ():
                        STEP_CONFIGS.labels(_model_name).observe(n)

    async def refresh(self, engine_client: Any, timeout: float = 10.0, *, force: bool = False) -> bool:
        """Pull now, unless another pull is younger than ``MIN_PULL_INTERVAL_S`` (every
        unauthenticated scrape must not turn into an RPC to every worker)."""
        if engine_client is None or not pulls_worker_stats(engine_client):
            return False
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            if not force and time.monotonic() - self.last_pull < MIN_PULL_INTERVAL_S:
                return True
            try:
                if getattr(engine_client, "errored", False):
                    return False
                stats = await _gather(engine_client, timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # engine busy/dead: keep the last values, count the miss
                STATS_PULL_FAILURES.labels(_model_name).inc()
                logger.debug("vsteer: worker stats pull failed: %s", e)
                return False
            self.apply(stats)
            self.last_pull = time.monotonic()
            return True

    def start_background(self, engine_client: Any, interval: float) -> None:
        """Pull every ``interval`` seconds too, so configs-per-step samples are not trimmed
        by the worker between rare scrapes, and so the other API servers' scrapes see
        fresh values. Idempotent; needs a running loop."""
        if interval <= 0 or (self._task is not None and not self._task.done()):
            return
        if not pulls_worker_stats(engine_client):
            return

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                if getattr(engine_client, "errored", False):
                    return
                if time.monotonic() - self.last_pull >= interval / 2:
                    await self.refresh(engine_client, force=True)

        self._task = asyncio.get_running_loop().create_task(loop())


PULLER = WorkerStatsPuller()


def refresh_interval() -> float:
    from vsteer.engine.settings import settings

    return settings().metrics_refresh_s
