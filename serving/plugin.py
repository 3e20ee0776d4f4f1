"""vLLM general plugin (entry point ``vllm.general_plugins: vsteer``).

vLLM calls ``register()`` in every process it starts (front-end, engine core, workers)
before any model loads. Installing vsteer is enough: no fork, no file overlay, no flag.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("vsteer")
DISABLE_ENV = "VSTEER_DISABLE"
_done = False


def register() -> None:
    global _done
    if _done or os.environ.get(DISABLE_ENV) == "1":
        return
    from .compat import check_vllm_version

    version = check_vllm_version()
    # Steering runs in vLLM's V1 model runner; pick it unless the user chose otherwise
    # (a V2 choice is then refused loudly at model load, never ignored).
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "0")
    from .frontend import patch_input_processor
    from .ops import register_op
    from .worker import patch_compile_cache_key, patch_worker

    register_op()
    patch_input_processor()
    patch_worker()
    patch_compile_cache_key()
    try:
        from .openai_protocol import patch_openai_requests
    except ImportError:
        pass
    else:
        patch_openai_requests()
    _done = True
    logger.debug("vsteer plugin registered on vLLM %s", version)
