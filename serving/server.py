"""What vsteer adds to vLLM's OpenAI-compatible app (``vsteer serve`` and plain ``vllm serve``).

``install(app, args, model_config)`` adds the vector registry routes
(``vector_routes``), the response headers / admin auth / metrics pull middleware
(``middleware``) and prints what it serves; ``patch_build_app()`` makes vLLM's launcher
call it for every app it builds. Settings come from ``server_config``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from typing import Any

from fastapi import FastAPI

from vsteer.engine.spec import SteeringError

from . import metrics
from .middleware import FINGERPRINT_HEADER, STEERING_HEADER, SteeringMiddleware
from .openai_protocol import set_model_shape
from .server_config import ServerConfig, configure, get_config, load_default_steering
from .vector_routes import VECTORS_PATH, SteeringState, vector_entry, registry, router

logger = logging.getLogger("vsteer")


def _api_keys(args: Any) -> list[str]:
    keys = getattr(args, "api_key", None) or []
    if isinstance(keys, str):
        keys = [keys]
    keys = [k for k in keys if k]
    if not keys and os.environ.get("VLLM_API_KEY"):
        keys = [os.environ["VLLM_API_KEY"]]
    return keys


def _model_shape(model_config: Any) -> tuple[int, int]:
    return int(model_config.get_hidden_size()), int(model_config.get_total_num_hidden_layers())


def _served_name(args: Any, model_config: Any) -> str:
    names = getattr(args, "served_model_name", None)
    if names:
        return names[0] if isinstance(names, (list, tuple)) else str(names)
    return str(getattr(model_config, "served_model_name", None) or getattr(args, "model", ""))


def _say(config: ServerConfig, text: str) -> None:
    if config.banner:
        print(f"vsteer: {text}", flush=True)
    else:  # plain `vllm serve`: through vLLM's configured logger
        logging.getLogger("vllm.vsteer").info("vsteer: %s", text)


def _add_outer_middleware(app: FastAPI, cls: type, **kwargs: Any) -> None:
    """Outermost middleware; vLLM's build_app may already have built the stack (the
    SageMaker bootstrap does), in which case it is rebuilt, as that bootstrap does."""
    from starlette.middleware import Middleware

    app.user_middleware.insert(0, Middleware(cls, **kwargs))
    if app.middleware_stack is not None:
        app.middleware_stack = app.build_middleware_stack()


def install(app: FastAPI, args: Any, model_config: Any) -> FastAPI:
    """Add the steering routes, headers, admin auth and metrics pull to vLLM's app."""
    if getattr(app.state, "vsteer", None) is not None:
        return app
    config = get_config()
    if model_config is None:
        logger.warning("vsteer: no model config given to build_app; steering routes not installed")
        return app
    hidden, layers = _model_shape(model_config)
    set_model_shape(hidden, layers)
    api_keys = _api_keys(args)
    admin_keys = [config.admin_key] if config.admin_key else list(api_keys)
    st = SteeringState(hidden, layers, _served_name(args, model_config), admin_keys, api_keys, config)
    # A default that does not resolve on this model fails the start, not every request.
    if config.default_steering is not None:
        from .frontend import resolver_for

        try:
            resolved = resolver_for(hidden, layers).resolve(config.default_steering)
        except SteeringError as e:
            raise RuntimeError(f"vsteer: the default steering ({config.default_steering_source}) does not apply "
                               f"to this model: {e}") from None
    app.state.vsteer = st
    app.include_router(router)
    _add_outer_middleware(app, SteeringMiddleware, state=st)
    metrics.update_registry_size()

    host = getattr(args, "host", None) or "0.0.0.0"
    where = f"unix:{args.uds}" if getattr(args, "uds", None) else f"http://{host}:{getattr(args, 'port', 8000)}"
    _say(config, f"OpenAI-compatible server with steering at {where}/v1 (model {st.model_name!r}: hidden size "
                 f"{hidden}, {layers} layers)")
    reg = registry()
    if reg is None:
        _say(config, "no vector directory (--vectors / VSTEER_VECTORS_DIR): only inline vectors can be used")
    else:
        entries = [vector_entry(reg, n, st) for n in reg.names()]
        shown = ", ".join(f"{e['name']} (layers {e.get('layers')}"
                          f"{'' if e.get('compatible') else ', NOT for this model'})" for e in entries) or "(none yet)"
        _say(config, f"vectors from {reg.root}: {shown}")
    if config.default_steering is not None:
        _say(config, f"default steering ({config.default_steering_source}): fingerprint {resolved.fingerprint} "
                     f"{json.dumps(config.default_steering, separators=(',', ':'))}")
    _say(config, "admin routes POST/DELETE " + VECTORS_PATH + (" enabled (Bearer key)" if admin_keys else
                                                               " disabled (no --steering-admin-key / --api-key)"))
    return app


def _is_wrapped(fn: Any) -> bool:
    return getattr(fn, "_vsteer", False)


def patch_build_app() -> None:
    """Make vLLM's API server launcher install the steering additions into its app.

    ``entry.py`` did ``from ..app import build_app``, so the name is replaced wherever the
    original function object is bound (the launcher modules and ``__main__`` when run with
    ``python -m``)."""
    from vllm.entrypoints.launchers import app as app_module

    orig = app_module.build_app
    if _is_wrapped(orig):
        orig = orig.__wrapped__
    wrapped = _wrap_build_app(orig)
    for name in ("vllm.entrypoints.launchers.app", "vllm.entrypoints.launchers.api_server.entry",
                 "vllm.entrypoints.openai.api_server", "__main__"):
        module = sys.modules.get(name)
        current = getattr(module, "build_app", None) if module is not None else None
        if current is orig or (current is not None and _is_wrapped(current)):
            setattr(module, "build_app", wrapped)


@functools.lru_cache(maxsize=None)
def _wrap_build_app(orig: Any) -> Any:
    @functools.wraps(orig)
    def build_app(args, supported_tasks=None, model_config=None, *rest, **kwargs):
        app = orig(args, supported_tasks, model_config, *rest, **kwargs)
        if supported_tasks is not None and "generate" not in supported_tasks:
            return app
        return install(app, args, model_config)

    build_app._vsteer = True  # type: ignore[attr-defined]
    return build_app


__all__ = ["FINGERPRINT_HEADER", "STEERING_HEADER", "ServerConfig", "SteeringMiddleware", "configure", "install",
           "load_default_steering", "patch_build_app", "router"]
