"""What vsteer adds to vLLM's OpenAI-compatible app (``vsteer serve`` and plain ``vllm serve``).

``build_app_wrapper`` wraps vLLM's ``build_app`` (``vsteer.serving.vllm_patches``): for
every app it builds, ``install`` creates the ``ServerState``, adds the vector registry
routes (``vector_routes``) and the outermost middleware (response headers, admin auth,
metrics pull) and prints what it serves.

Why a wrapper rather than vLLM's ``vllm.endpoint_plugins``: that interface loads only when
``VLLM_PLUGINS`` names it (which also filters vLLM's general plugins), and middleware it
adds sits inside vLLM's auth/CORS middleware; vsteer's must be outermost to authenticate
its admin routes and to rewrite response headers and bodies.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from typing import Any, Callable

from fastapi import FastAPI

from vsteer.engine.errors import SteeringError
from vsteer.engine.registry import VectorRegistry
from vsteer.engine.settings import settings

from .. import metrics
from ..keys import VECTORS_PATH
from .. import request_context
from ..resolvers import resolver_for_model
from . import state as state_module
from .config import ServerConfig, get_config
from .middleware import SteeringMiddleware
from .alias_routes import router as alias_router
from .aliases import AliasTable, parse_flag_aliases
from .resolution import RequestResolver
from .state import ServerState
from .vector_routes import router, vector_entry

logger = logging.getLogger("vllm.vsteer")


def _api_keys(args: Any) -> list[str]:
    keys = getattr(args, "api_key", None) or []
    if isinstance(keys, str):
        keys = [keys]
    keys = [k for k in keys if k]
    if not keys and os.environ.get("VLLM_API_KEY"):
        keys = [os.environ["VLLM_API_KEY"]]
    return keys


def _served_name(args: Any, model_config: Any) -> str:
    names = getattr(args, "served_model_name", None)
    if names:
        return names[0] if isinstance(names, (list, tuple)) else str(names)
    return str(getattr(model_config, "served_model_name", None) or getattr(args, "model", ""))


def _say(config: ServerConfig, text: str) -> None:
    if config.banner:
        print(f"vsteer: {text}", flush=True)
    else:  # plain `vllm serve`: through vLLM's configured logger
        logger.info("vsteer: %s", text)


def _add_outer_middleware(app: FastAPI, cls: type, **kwargs: Any) -> None:
    """Outermost middleware; vLLM's build_app may already have built the stack (the
    SageMaker bootstrap does), in which case it is rebuilt, as that bootstrap does."""
    from starlette.middleware import Middleware

    app.user_middleware.insert(0, Middleware(cls, **kwargs))
    if app.middleware_stack is not None:
        app.middleware_stack = app.build_middleware_stack()


def create_state(args: Any, model_config: Any, config: ServerConfig) -> ServerState:
    """The server state for one app; a default steering that does not resolve on this
    model fails the start, not every request."""
    hidden, layers = int(model_config.get_hidden_size()), int(model_config.get_total_num_hidden_layers())
    api_keys = _api_keys(args)
    root = settings().vectors_dir
    resolver = resolver_for_model(model_config)  # the model's dtype too: overflow checks depend on it
    st = ServerState(config=config, hidden_size=hidden, num_layers=layers,
                     model_name=_served_name(args, model_config),
                     admin_keys=[config.admin_key] if config.admin_key else list(api_keys), api_keys=api_keys,
                     registry=resolver.registry if root else None, resolver=resolver)
    if config.default_steering is not None:
        try:
            st.default_resolved = resolver.resolve(config.default_steering)
        except SteeringError as e:
            raise RuntimeError(f"vsteer: the default steering ({config.default_steering_source}) does not apply "
                               f"to this model: {e}") from None
    st.aliases = steered_models(st, resolver)
    st.requests = RequestResolver(st)
    return st


def steered_models(st: ServerState, resolver: Any) -> AliasTable:
    """The server's steered models; one that does not resolve on this model, or that takes
    the served model's own name, fails the start (not every request)."""
    try:
        flags = parse_flag_aliases((settings().steered_models or "").splitlines())
    except ValueError as e:
        raise RuntimeError(f"vsteer: --steered-model: {e}") from None
    for model in flags.values():
        if model.name == st.model_name:
            raise RuntimeError(f"vsteer: steered model {model.name!r} has the served model's own name")
        try:
            resolver.resolve(model.spec)
        except SteeringError as e:
            raise RuntimeError(f"vsteer: steered model {model.name!r} does not apply to this model: {e}") from None
    return AliasTable(flags, st.registry.root if st.registry is not None else None)


def install(app: FastAPI, args: Any, model_config: Any) -> FastAPI:
    """Add the steering routes, headers, admin auth and metrics pull to vLLM's app."""
    if getattr(app.state, "vsteer", None) is not None:
        return app
    if model_config is None:
        logger.warning("vsteer: no model config given to build_app; steering routes not installed")
        return app
    config = get_config()
    st = create_state(args, model_config, config)
    state_module.set_current(st)
    request_context.mark_serving_http()
    metrics.set_model_name(st.model_name)
    _clean_registry(st.registry)
    app.state.vsteer = st
    app.include_router(router)
    app.include_router(alias_router)
    _add_outer_middleware(app, SteeringMiddleware, state=st)
    metrics.update_registry_size(st.registry)
    _banner(st, args)
    return app


def _clean_registry(reg: VectorRegistry | None) -> None:
    """Remove what a crashed writer left behind (taking the write lock does that)."""
    if reg is None:
        return
    try:
        with reg.write_lock():
            pass
    except OSError as e:  # a read-only volume: this server will not write either
        logger.warning("vsteer: cannot lock the vector directory %s (%s); the admin routes will fail", reg.root, e)


def _banner(st: ServerState, args: Any) -> None:
    config = st.config
    host = getattr(args, "host", None) or "0.0.0.0"
    where = f"unix:{args.uds}" if getattr(args, "uds", None) else f"http://{host}:{getattr(args, 'port', 8000)}"
    _say(config, f"OpenAI-compatible server with steering at {where}/v1 (model {st.model_name!r}: hidden size "
                 f"{st.hidden_size}, {st.num_layers} layers)")
    reg: VectorRegistry | None = st.registry
    if reg is None:
        _say(config, "no vector directory (--vectors / VSTEER_VECTORS_DIR): only inline vectors can be used")
    else:
        entries = [vector_entry(reg, n, st) for n in reg.names()]
        shown = ", ".join(f"{e['name']} (layers {e.get('layers')}"
                          f"{'' if e.get('compatible') else ', NOT for this model'})" for e in entries) or "(none yet)"
        _say(config, f"vectors from {reg.root}: {shown}")
    for model in st.aliases.all():
        _say(config, f"steered model {model.name!r} ({model.origin}): {json.dumps(model.spec, separators=(',', ':'))}")
    if st.default_resolved is not None:
        _say(config, f"default steering ({config.default_steering_source}): fingerprint "
                     f"{st.default_resolved.fingerprint} {json.dumps(config.default_steering, separators=(',', ':'))}")
    _say(config, "admin routes POST/DELETE " + VECTORS_PATH + (" enabled (Bearer key)" if st.admin_keys else
                                                               " disabled (no VSTEER_ADMIN_KEY / --api-key)"))


def build_app_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def build_app(args, supported_tasks=None, model_config=None, *rest, **kwargs):
        app = original(args, supported_tasks, model_config, *rest, **kwargs)
        if supported_tasks is not None and "generate" not in supported_tasks:
            return app
        return install(app, args, model_config)

    return build_app
