"""Prometheus metrics for steering, exported on vLLM's own ``/metrics``.

Front-end numbers (requests, vectors, rejections, registry) are recorded where they
happen, in the API server process. Worker numbers (steered tokens, configs per step,
table build time) live in the worker processes: the server pulls them with
``engine_client.collective_rpc("vsteer_stats")`` when ``/metrics`` is scraped (and every
``VSTEER_METRICS_REFRESH_S`` seconds in the background), and turns the cumulative worker
counters into monotonic Prometheus counters by adding the increase since the last pull.

All metrics live in prometheus_client's default registry, which vLLM serves at
``/metrics`` (with ``PROMETHEUS_MULTIPROC_DIR`` set, prometheus_client writes them to the
multiprocess directory that vLLM aggregates). docs/server.md lists them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from prometheus_client import Counter, Gauge, Histogram

from .keys import WORKER_STATS_METHOD

logger = logging.getLogger("vllm.vsteer")

INLINE_LABEL = "inline"
CONFIG_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512)

REQUESTS = Counter("vsteer_requests", "Generation requests that reached the engine, by whether steering was "
                   "applied (steered=\"true\"/\"false\")", ["steered"])
VECTOR_REQUESTS = Counter("vsteer_vector_requests", "Steered requests per vector: the registry name, or "
                          "\"inline\" for vectors sent as inline data", ["vector"])
REJECTIONS = Counter("vsteer_rejected_requests", "Requests refused (HTTP 400) for invalid steering, by reason",
                     ["reason"])
STEERED_TOKENS = Counter("vsteer_steered_tokens", "Tokens that had a steering vector added (workers, TP rank 0)")
STEPS = Counter("vsteer_steps", "Scheduler steps run by the model (workers, TP rank 0)")
STEERED_STEPS = Counter("vsteer_steered_steps", "Scheduler steps with at least one steered request "
                        "(workers, TP rank 0)")
STEP_CONFIGS = Histogram("vsteer_step_configs", "Distinct steering configs in one steered scheduler step "
                         "(workers, TP rank 0)", buckets=CONFIG_BUCKETS)
TABLE_BUILD_SECONDS = Counter("vsteer_table_build_seconds", "Time workers spent building the per-step "
                              "steering tables (TP rank 0)")
WORKER_RESOLVE_FAILURES = Counter("vsteer_worker_resolve_failures", "Requests a worker ran unsteered because "
                                  "it could not resolve their steering (e.g. the vector was deleted meanwhile)")
REGISTRY_VECTORS = Gauge("vsteer_registry_vectors", "Vector sets in the registry directory",
                         multiprocess_mode="livemostrecent")
REGISTRY_LOADS = Counter("vsteer_registry_loads", "Vector sets added to the registry through "
                         "POST /v1/steering/vectors, by source (path/upload)", ["source"])
REGISTRY_REMOVALS = Counter("vsteer_registry_removals", "Vector sets removed through "
                            "DELETE /v1/steering/vectors/{name}")
STATS_PULL_FAILURES = Counter("vsteer_worker_stats_pull_failures", "Failed pulls of the workers' steering "
                              "counters (collective_rpc vsteer_stats)")

for _label in ("true", "false"):
    REQUESTS.labels(steered=_label)
for _source in ("path", "upload"):
    REGISTRY_LOADS.labels(source=_source)

# -- front-end recording (called by vsteer.serving.frontend and the HTTP layer) ---------------

def record_rejection(reason: str) -> None:
    REJECTIONS.labels(reason=reason or "invalid").inc()


def record_request(resolved: Any) -> None:
    """A steered request reached the engine (after validation)."""
    REQUESTS.labels(steered="true").inc()
    labels = {INLINE_LABEL if v.get("inline") else v["name"] for v in getattr(resolved, "applied", []) or []}
    for label in sorted(labels):
        VECTOR_REQUESTS.labels(vector=label).inc()


def record_unsteered() -> None:
    REQUESTS.labels(steered="false").inc()


def record_registry_load(source: str) -> None:
    REGISTRY_LOADS.labels(source=source).inc()


def record_registry_removal() -> None:
    REGISTRY_REMOVALS.inc()


def update_registry_size(registry: Any) -> None:
    try:
        REGISTRY_VECTORS.set(len(registry.names()) if registry is not None else 0)
    except OSError:
        pass


# -- worker counters ------------------------------------------------------------------------------

_CUMULATIVE = {"steps": STEPS, "steered_steps": STEERED_STEPS, "steered_tokens": STEERED_TOKENS,
               "build_seconds": TABLE_BUILD_SECONDS, "resolve_failures": WORKER_RESOLVE_FAILURES}


class WorkerStatsPuller:
    """Turns the workers' cumulative counters into Prometheus increments.

    ``vsteer_stats`` returns cumulative counts (and the configs-per-step samples since the
    previous call). We add ``now - last`` to each counter; a value that went down means the
    worker restarted, and then the whole new value is the increase. One pull at a time.
    """

    def __init__(self) -> None:
        self._last: dict[str, float] = {}
        self._lock: asyncio.Lock | None = None
        self._task: asyncio.Task | None = None
        self.last_pull: float = 0.0

    def apply(self, stats: dict[str, Any]) -> None:
        for key, counter in _CUMULATIVE.items():
            if key not in stats:
                continue
            value = float(stats[key] or 0)
            prev = self._last.get(key, 0.0)
            delta = value - prev if value >= prev else value
            if delta > 0:
                counter.inc(delta)
            self._last[key] = value
        for n in stats.get("configs_per_step") or ():
            STEP_CONFIGS.observe(n)

    async def refresh(self, engine_client: Any, timeout: float = 10.0) -> bool:
        if engine_client is None:
            return False
        if self._lock is None:
            self._lock = asyncio.Lock()
        async with self._lock:
            try:
                if getattr(engine_client, "errored", False):
                    return False
                results = await asyncio.wait_for(engine_client.collective_rpc(WORKER_STATS_METHOD), timeout)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # engine busy/dead: keep the last values, count the miss
                STATS_PULL_FAILURES.inc()
                logger.debug("vsteer: worker stats pull failed: %s", e)
                return False
            stats = results[0] if isinstance(results, (list, tuple)) and results else results
            if isinstance(stats, dict):
                self.apply(stats)
            self.last_pull = time.monotonic()
            return True

    def start_background(self, engine_client: Any, interval: float) -> None:
        """Pull every ``interval`` seconds too, so configs-per-step samples are not trimmed
        by the worker between rare scrapes. Idempotent; needs a running loop."""
        if interval <= 0 or (self._task is not None and not self._task.done()):
            return

        async def loop() -> None:
            while True:
                await asyncio.sleep(interval)
                if getattr(engine_client, "errored", False):
                    return
                if time.monotonic() - self.last_pull >= interval / 2:
                    await self.refresh(engine_client)

        self._task = asyncio.get_running_loop().create_task(loop())


PULLER = WorkerStatsPuller()


def refresh_interval() -> float:
    from vsteer.engine.settings import settings

    return settings().metrics_refresh_s
