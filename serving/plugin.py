"""vLLM general plugin (entry point ``vllm.general_plugins: vsteer``).

vLLM calls ``register()`` in every process it starts (front-end, engine core, workers,
Ray actors) before any model loads. Installing vsteer is enough: no fork, no file
overlay, no flag. ``VSTEER_DISABLE=1`` keeps it from loading.
"""

from __future__ import annotations

import logging
import os

from vsteer.engine.settings import ENV_PREFIX, settings

logger = logging.getLogger("vllm.vsteer")
_done = False


def register() -> None:
    global _done
    if _done or settings().disable:
        return
    from . import vllm_patches
    from .compat import check_vllm_version
    from .ops import register_op

    version = check_vllm_version()
    # Whichever model runner vLLM builds (V1 or V2) is steered through its adapter, picked
    # from the runner object at model load (vsteer.serving.runners); vsteer does not choose.
    copy_settings_to_ray_workers()
    register_op()
    vllm_patches.apply()
    _done = True
    logger.debug("vsteer plugin registered on vLLM %s", version)


RAY_PREFIXES_ENV = "VLLM_RAY_EXTRA_ENV_VAR_PREFIXES_TO_COPY"


def copy_settings_to_ray_workers() -> None:
    """vLLM's Ray executors (V1, and Ray data-parallel engine actors) copy only variables
    with known prefixes to workers on other nodes; without ``VSTEER_`` among them a worker
    would not find the registry and serve unsteered. The list is a ``VLLM_*`` variable, so
    it travels to every process vLLM starts (Ray's V2 executor copies the whole
    environment anyway)."""
    prefixes = [p.strip() for p in os.environ.get(RAY_PREFIXES_ENV, "").split(",") if p.strip()]
    if ENV_PREFIX not in prefixes:
        os.environ[RAY_PREFIXES_ENV] = ",".join([*prefixes, ENV_PREFIX])


def ensure_api_server_patches() -> None:
    """Apply the app patches in an API-server process whose plugin loaded before the
    launcher modules were imported (``vsteer serve`` imports them itself)."""
    from . import vllm_patches

    vllm_patches.apply(api_server=True)
