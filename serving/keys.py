"""Names that cross process or network boundaries, defined once.

The request field, the ``SamplingParams.extra_args`` entries the front-end sets for the
workers, the prefix-cache salt namespace, the response headers and the HTTP routes.
"""

from __future__ import annotations

from vsteer.engine.spec import STEERING_KEY

PINS_KEY = "vsteer"
"""``extra_args`` entry the front-end sets for the workers (fingerprint, pinned content
versions). Never trusted from clients: a client-sent value is dropped."""

SALT_PREFIX = "vsteer-"
"""Cache salts of steered requests; no client salt may start with it."""

FINGERPRINT_HEADER = "x-vsteer-fingerprint"
STEERING_HEADER = "x-vsteer-steering"
ADMIN_KEY_HEADER = "x-vsteer-admin-key"

VECTORS_PATH = "/v1/steering/vectors"
STEERED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/chat/completions/batch")
"""OpenAI routes whose requests may carry steering."""

WORKER_STATS_METHOD = "vsteer_stats"
"""The ``collective_rpc`` method the server calls to pull the workers' counters."""

__all__ = ["ADMIN_KEY_HEADER", "FINGERPRINT_HEADER", "PINS_KEY", "SALT_PREFIX", "STEERED_PATHS", "STEERING_HEADER",
           "STEERING_KEY", "VECTORS_PATH", "WORKER_STATS_METHOD"]
