"""Names that cross process or network boundaries, defined once.

The request field, the ``SamplingParams.extra_args`` entries the front-end sets for the
workers, the prefix-cache salt namespace, the response headers and the HTTP routes.
"""

from __future__ import annotations

from vsteer.engine.spec import STEERING_KEY

PINS_KEY = "vsteer"
"""``extra_args`` entry the front-end sets for the workers (fingerprint, pinned content
versions). Never trusted from clients: a client-sent value is dropped."""

ROWS_KEY = "vsteer_rows"
"""``extra_args`` entry the engine core sets for the workers: the request's config as table
rows (``PreparedSteering``), built once per fingerprint off the step. Never from clients:
the front-end drops it from whatever a client sent."""

INLINE_LABEL = "inline"
"""The metric label of inline vectors (registry sets are labelled by name)."""

SALT_PREFIX = "vsteer-"
"""Cache salts of steered requests; no client salt may start with it."""

FINGERPRINT_HEADER = "x-vsteer-fingerprint"
STEERING_HEADER = "x-vsteer-steering"
ADMIN_KEY_HEADER = "x-vsteer-admin-key"

VECTORS_PATH = "/v1/steering/vectors"
MODELS_PATH = "/v1/steering/models"
"""Steered models: list (GET), add (POST) and remove (DELETE /{name}) run-time ones."""
STEERED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/chat/completions/batch",
                 "/v1/messages")
"""Generation routes whose requests may carry steering (the Anthropic-compatible
``/v1/messages`` runs through the chat request class). Every other route refuses a
``steering`` field (docs/server.md, "Routes")."""

WORKER_STATS_METHOD = "vsteer_stats"
"""The ``collective_rpc`` method the server calls to pull the workers' counters."""

__all__ = ["ADMIN_KEY_HEADER", "FINGERPRINT_HEADER", "INLINE_LABEL", "MODELS_PATH", "PINS_KEY", "ROWS_KEY", "SALT_PREFIX", "STEERED_PATHS", "STEERING_HEADER",
           "STEERING_KEY", "VECTORS_PATH", "WORKER_STATS_METHOD"]
