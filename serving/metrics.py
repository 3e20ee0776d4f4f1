"""Prometheus metrics for steering, exported on vLLM's own ``/metrics``.

Front-end numbers (requests, their latency, vectors, rejections, failed requests,
registry) are recorded where they happen, in each API-server process. Worker numbers
(steered tokens, steps, configs per step, table-build and step time, resolve failures)
live in the worker processes: one API server (``_api_process_rank`` 0) pulls them with
``collective_rpc`` when ``/metrics`` is scraped (at most once a second) and, while
requests come in or the engine still runs steps, every ``VSTEER_METRICS_REFRESH_S``
seconds; it turns the workers' cumulative counters into monotonic Prometheus counters by
adding the increase since the last pull. With several API servers
(``--api-server-count``), vLLM aggregates the processes' metric files, so exactly one of
them must pull (or every worker count would be multiplied); a scrape another one answers
shows worker counters at most ``VSTEER_METRICS_REFRESH_S`` (plus one pull) old.

Every series carries ``model_name`` (the served name, like vLLM's own metrics), the
worker series also ``engine`` (the data-parallel engine, as on vLLM's own); the
``reason`` label takes only values of ``REJECTION_REASONS``. docs/server.md lists them.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from vsteer.engine.errors import REJECTION_REASONS

from .keys import WORKER_STATS_METHOD

logger = logging.getLogger("vllm.vsteer")

CONFIG_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 60.0, 120.0, 300.0, 600.0)
MIN_PULL_INTERVAL_S = 1.0
ACTIVITY_FILE = "vsteer-activity"
"""In ``PROMETHEUS_MULTIPROC_DIR`` (shared by the API servers of one deployment): touched by
an API server that gets requests, so the one that pulls the workers' counters keeps pulling."""
ACTIVITY_TOUCH_S = 0.25  # at most one touch per process this often
M = ("model_name",)
E = ("model_name", "engine")

REQUESTS = Counter("vsteer_requests", "Generation requests that reached the engine, by whether steering was "
                   "applied (steered=\"true\"/\"false\")", [*M, "steered"])
VECTOR_REQUESTS = Counter("vsteer_vector_requests", "Steered requests per vector: the registry name, or "
                          "\"inline\" for vectors sent as inline data", [*M, "vector"])
REJECTIONS = Counter("vsteer_rejected_requests", "Requests refused (HTTP 400) for invalid steering, by reason "
                     "(a fixed set: docs/server.md)", [*M, "reason"])
FAILED_REQUESTS = Counter("vsteer_failed_requests", "Steered requests vLLM finished with an error (HTTP 500): "
                          "their pinned vectors could not be loaded, or another engine error", M)
STEERED_TOKENS = Counter("vsteer_steered_tokens", "Tokens that had steering applied (workers)", E)
STEPS = Counter("vsteer_steps", "Scheduler steps run by the model (workers)", E)
STEERED_STEPS = Counter("vsteer_steered_steps", "Scheduler steps with at least one steered request (workers)", E)
STEP_CONFIGS = Histogram("vsteer_step_configs", "Distinct steering configs in one steered scheduler step "
                         "(workers)", E, buckets=CONFIG_BUCKETS)
TABLE_BUILD_SECONDS = Counter("vsteer_table_build_seconds", "Time workers spent building the per-step "
                              "steering tables", E)
STEP_SECONDS = Counter("vsteer_step_seconds", "Time workers spent in model steps (execute_model + "
                       "sample_tokens; host time)", E)
WORKER_RESOLVE_FAILURES = Counter("vsteer_worker_resolve_failures", "Steered requests a worker could not "
                                  "steer (they reached it without prepared rows); each is finished with an "
                                  "error, summed over all ranks", E)
STEERED_MODEL_REQUESTS = Counter("vsteer_steered_model_requests", "Requests for a steered model (the model "
                                 "field named an alias: --steered-model or POST /v1/steering/models)",
                                 [*M, "steered_model"])
NEW_CONFIGS = Counter("vsteer_new_configs", "Steering configs written into a worker's tables (new to them)", E)
DEFERRED_REQUESTS = Counter("vsteer_deferred_requests", "Times the scheduler held a waiting steered request "
                            "back for one step: its config would have exceeded VSTEER_MAX_CONFIGS rows or "
                            "VSTEER_MAX_NEW_CONFIGS_PER_STEP", E)
REQUEST_SECONDS = Histogram("vsteer_request_duration_seconds", "Generation requests from arrival to the last "
                            "byte of the response, by whether steering was applied (steered=\"true\"/\"false\")",
                            [*M, "steered"], buckets=LATENCY_BUCKETS)
BUILD_INFO = Gauge("vsteer_build_info", "1 for the running vsteer: its version, vLLM's version and the model "
                   "runner generation vsteer hooks (v1, v2; unknown until the engine reports it)",
                   [*M, "version", "vllm_version", "runner"], multiprocess_mode="max")
REGISTRY_VECTORS = Gauge("vsteer_registry_vectors", "Vector sets in the registry directory", M,
                         multiprocess_mode="mostrecent")
REGISTRY_LOADS = Counter("vsteer_registry_loads", "Vector sets added to the registry through "
                         "POST /v1/steering/vectors, by source (path/upload)", [*M, "source"])
REGISTRY_REMOVALS = Counter("vsteer_registry_removals", "Vector sets removed through "
                            "DELETE /v1/steering/vectors/{name}", M)
STATS_PULL_FAILURES = Counter("vsteer_worker_stats_pull_failures", "Failed pulls of the workers' steering "
                              "counters (collective_rpc vsteer_stats)", M)

_model_name = ""
_runner = "unknown"
_build_labels: tuple[str, ...] | None = None
_WORKER_METRICS = (STEERED_TOKENS, STEPS, STEERED_STEPS, STEP_CONFIGS, TABLE_BUILD_SECONDS, STEP_SECONDS,
                   WORKER_RESOLVE_FAILURES, NEW_CONFIGS, DEFERRED_REQUESTS)


def set_model_name(name: str) -> None:
    """The served model's name (a label on every series); creates every fixed-label series
    at 0 (the worker ones for engine 0; other engines' at their first pull), so rates and
    alerts see the first increment."""
    global _model_name
    _model_name = name
    for steered in ("true", "false"):
        REQUESTS.labels(name, steered)
        REQUEST_SECONDS.labels(name, steered)
    for source in ("path", "upload"):
        REGISTRY_LOADS.labels(name, source)
    for reason in REJECTION_REASONS:
        REJECTIONS.labels(name, reason)
    for metric in (FAILED_REQUESTS, REGISTRY_REMOVALS, STATS_PULL_FAILURES):
        metric.labels(name)
    for metric in _WORKER_METRICS:
        metric.labels(name, "0")
    _set_build_info()


def set_runner(name: str) -> None:
    """The model-runner generation vsteer hooks in this server's engine (``"v1"``, ``"v2"``),
    for ``vsteer_build_info``; ``"unknown"`` until called."""
    global _runner
    _runner = str(name)
    _set_build_info()


def _set_build_info() -> None:
    """One ``vsteer_build_info`` series at 1; a replaced label set (the runner became known)
    is removed, or with several API servers (whose metric files keep every series) set to 0."""
    global _build_labels
    from vsteer.engine.version import __version__

    try:
        from .compat import vllm_version

        vllm = vllm_version()
    except Exception:  # noqa: BLE001 - the metric must not stop a server
        vllm = "unknown"
    labels = (_model_name, __version__, vllm, _runner)
    if _build_labels is not None and _build_labels != labels:
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            BUILD_INFO.labels(*_build_labels).set(0)
        else:
            BUILD_INFO.remove(*_build_labels)
    BUILD_INFO.labels(*labels).set(1)
    _build_labels = labels


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


def observe_request_latency(steered: bool, seconds: float) -> None:
    """A generation request's time from arrival to the end of its response (the
    middleware calls it once per request, steered or not)."""
    REQUEST_SECONDS.labels(_model_name, "true" if steered else "false").observe(max(float(seconds), 0.0))


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


def _engine_label(identity: Any, default: int = 0) -> str:
    """vLLM's engine identity (the data-parallel rank, 2 bytes little-endian) as its
    ``engine`` label value."""
    if isinstance(identity, (bytes, bytearray)) and identity:
        return str(int.from_bytes(identity, "little"))
    return str(default)


async def _gather(engine_client: Any, timeout: float) -> list[tuple[str, list[dict[str, Any]]]]:
    """Per engine (data-parallel rank): its ``engine`` label and, per worker,
    ``vsteer_stats()``. vLLM's ``collective_rpc`` reaches every DP engine but returns only
    the first one's results; its client's ``call_utility_all_async`` returns all of them."""
    core = getattr(engine_client, "engine_core", None)
    engines = list(getattr(core, "core_engines", ()) or ())
    gather_all = getattr(core, "call_utility_all_async", None)
    if gather_all is not None and len(engines) > 1:
        per_engine = await asyncio.wait_for(
            gather_all("collective_rpc", WORKER_STATS_METHOD, None, (), None), timeout)
        return [(_engine_label(ident, i), list(r or [])) for i, (ident, r) in enumerate(zip(engines, per_engine))]
    results = await asyncio.wait_for(engine_client.collective_rpc(WORKER_STATS_METHOD), timeout)
    label = _engine_label(getattr(core, "core_engine", None) or (engines[0] if engines else None))
    return [(label, list(results) if isinstance(results, (list, tuple)) else [results])]


def _activity_file() -> Path | None:
    directory = os.environ.get("PROMETHEUS_MULTIPROC_DIR")  # vLLM's, with --api-server-count > 1
    return Path(directory) / ACTIVITY_FILE if directory else None


class WorkerStatsPuller:
    """Turns the workers' cumulative counters into Prometheus increments.

    ``vsteer_stats`` returns cumulative counts (and the configs-per-step samples since the
    previous call). We add ``now - last`` per (engine, worker, counter); a value that went
    down means the worker restarted, and then the whole new value is the increase.

    The background pull runs only while it has something to read: a request arrived (at
    this API server, or at another one: ``note_activity``) since the last pull, or the
    last pull saw the engine run steps. An idle server is not woken every few seconds."""

    def __init__(self) -> None:
        self._last: dict[tuple[str, int, str], float] = {}
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None
        self.last_pull: float = 0.0
        self.last_pull_wall: float = 0.0
        self.last_activity: float = 0.0
        self.progressed = False  # the last pull saw steps run
        self._touched = 0.0

    def note_activity(self) -> None:
        """A generation request reached this API server. If another one pulls, it is told
        through a file the API servers share (at most one touch per ``ACTIVITY_TOUCH_S``)."""
        now = time.monotonic()
        self.last_activity = now
        if self._task is not None and not self._task.done():
            return  # this process pulls
        path = _activity_file()
        if path is not None and now - self._touched >= ACTIVITY_TOUCH_S:
            self._touched = now
            try:
                path.touch()
            except OSError:
                pass

    def active(self) -> bool:
        """Whether a background pull would find anything new."""
        if self.progressed or self.last_activity >= self.last_pull:
            return True
        path = _activity_file()
        try:
            # a touch skipped by the rate limit is covered by the one before it
            return path is not None and path.stat().st_mtime >= self.last_pull_wall - ACTIVITY_TOUCH_S
        except OSError:
            return False

    def _add(self, key: tuple[str, int, str], value: float, counter: Counter, engine: str) -> float:
        prev = self._last.get(key, 0.0)
        delta = value - prev if value >= prev else value
        if delta > 0:
            counter.labels(_model_name, engine).inc(delta)
        self._last[key] = value
        return delta

    def apply(self, stats: dict[str, Any] | list[tuple[str, list[dict[str, Any]]]]) -> bool:
        """Add one pull's increases; returns whether the engines ran steps since the last."""
        per_engine = [("0", [stats])] if isinstance(stats, dict) else stats
        progressed = False
        for engine, workers in per_engine:
            for w, worker in enumerate(workers):
                if not isinstance(worker, dict):
                    continue
                counters = {**_ALL_WORKERS, **(_FIRST_WORKER if w == 0 else {})}
                for key, counter in counters.items():
                    if key in worker:
                        delta = self._add((engine, w, key), float(worker[key] or 0), counter, engine)
                        progressed |= key == "steps" and delta > 0
                if w == 0:
                    for n in worker.get("configs_per_step") or ():
                        STEP_CONFIGS.labels(_model_name, engine).observe(n)
                    if worker.get("runner"):
                        set_runner(worker["runner"])
        return progressed

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
            started, started_wall = time.monotonic(), time.time()
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
            self.progressed = self.apply(stats)
            self.last_pull, self.last_pull_wall = started, started_wall
            return True

    def start_background(self, engine_client: Any, interval: float) -> None:
        """Note a request (``note_activity``) and make sure the background pull runs: every
        ``interval`` seconds while ``active()``, so configs-per-step samples are not trimmed
        by the worker between rare scrapes, and the other API servers' scrapes see counters
        at most ``interval`` (plus one pull) old. Idempotent; needs a running loop."""
        self.note_activity()
        if interval <= 0 or (self._task is not None and not self._task.done()):
            return
        if not pulls_worker_stats(engine_client):
            return

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                if getattr(engine_client, "errored", False):
                    return
                if self.active() and time.monotonic() - self.last_pull >= interval / 2:
                    await self.refresh(engine_client, force=True)

        self._task = asyncio.get_running_loop().create_task(loop())


PULLER = WorkerStatsPuller()


def refresh_interval() -> float:
    from vsteer.engine.settings import settings

    return settings().metrics_refresh_s


def note_activity() -> None:
    """A generation request arrived (``PULLER.note_activity``)."""
    PULLER.note_activity()
