"""What vsteer adds to vLLM's OpenAI-compatible app (``vsteer serve`` and plain ``vllm serve``).

* ``GET /v1/steering/vectors`` (+ ``/{name}``): the vector registry.
* ``POST /v1/steering/vectors`` and ``DELETE /v1/steering/vectors/{name}``: admin routes
  (``Authorization: Bearer <admin key>``) that add a vector set, from a path inside an
  allowed directory or uploaded as JSON (base64 safetensors + metadata), or remove one.
  Workers read the registry directory lazily by name, so changes apply at once.
* A pure ASGI middleware that adds ``x-vsteer-fingerprint`` / ``x-vsteer-steering``
  headers (and a top-level ``"steering"`` field in non-streaming JSON bodies) to steered
  responses, authenticates the admin routes, and pulls the workers' steering counters
  into Prometheus before ``/metrics`` is served.

``install(app, args, model_config)`` does all of it; ``patch_build_app()`` makes vLLM's
launcher call it for every app it builds. Configuration comes from ``configure()``
(``vsteer serve`` flags) or, under plain ``vllm serve``, from the environment:
``VSTEER_VECTORS_DIR``, ``VSTEER_DEFAULT_STEERING`` (a JSON file, or inline JSON),
``VSTEER_ADMIN_KEY``, ``VSTEER_IMPORT_DIRS`` (``os.pathsep``-separated).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import functools
import hmac
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from starlette.datastructures import Headers, MutableHeaders
from starlette.responses import JSONResponse

from vsteer.engine.formats import (
    METADATA_FILE,
    TENSORS_FILE,
    VectorFileError,
    load_vector_set,
)
from vsteer.engine.registry import UnknownVectorError, VectorRegistry, check_name
from vsteer.engine.spec import SteeringError, SteeringSpec

from . import metrics
from .openai_protocol import RESPONSE_INFO, STEERING_KEY, set_default_steering, set_model_shape

logger = logging.getLogger("vsteer")

FINGERPRINT_HEADER = "x-vsteer-fingerprint"
STEERING_HEADER = "x-vsteer-steering"
ADMIN_KEY_HEADER = "x-vsteer-admin-key"
VECTORS_PATH = "/v1/steering/vectors"
STEERED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses", "/v1/chat/completions/batch")
DEFAULT_STEERING_ENV = "VSTEER_DEFAULT_STEERING"
ADMIN_KEY_ENV = "VSTEER_ADMIN_KEY"
IMPORT_DIRS_ENV = "VSTEER_IMPORT_DIRS"
MAX_UPLOAD_ENV = "VSTEER_MAX_UPLOAD_BYTES"


@dataclass
class ServerConfig:
    default_steering: dict[str, Any] | None = None
    default_steering_source: str | None = None
    admin_key: str | None = None
    import_dirs: list[Path] = field(default_factory=list)
    banner: bool = False  # print the start-up summary to stdout (vsteer serve)
    max_upload_bytes: int = 64 << 20


_config: ServerConfig | None = None


def load_default_steering(value: str) -> dict[str, Any] | None:
    """A SteeringSpec from a JSON file path (or inline JSON); raises ``ValueError`` with a
    message naming the problem."""
    text = value
    if not value.lstrip().startswith("{"):
        try:
            text = Path(value).read_text()
        except OSError as e:
            raise ValueError(f"cannot read the default steering file {value}: {e}") from None
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"default steering {value}: not valid JSON ({e})") from None
    if isinstance(raw, dict) and set(raw) == {STEERING_KEY}:  # also accept {"steering": {...}}
        raw = raw[STEERING_KEY]
    try:
        spec = SteeringSpec.parse(raw)
    except SteeringError as e:
        raise ValueError(f"default steering {value}: {e}") from None
    return spec.to_dict() if spec is not None and not spec.is_empty else None


def configure(*, default_steering: str | dict[str, Any] | None = None, admin_key: str | None = None,
              import_dirs: list[str] | None = None, banner: bool = False) -> ServerConfig:
    """Set the server configuration (``vsteer serve``); unset parts fall back to the env."""
    global _config
    env = config_from_env()
    if isinstance(default_steering, str):
        spec, source = load_default_steering(default_steering), default_steering
    elif isinstance(default_steering, dict):
        parsed = SteeringSpec.parse(default_steering)
        spec, source = (parsed.to_dict() if parsed and not parsed.is_empty else None), "inline"
    else:
        spec, source = env.default_steering, env.default_steering_source
    dirs = [Path(d).resolve() for d in import_dirs] if import_dirs else env.import_dirs
    _config = ServerConfig(spec, source, admin_key or env.admin_key, dirs, banner, env.max_upload_bytes)
    set_default_steering(spec)
    return _config


def config_from_env() -> ServerConfig:
    raw = os.environ.get(DEFAULT_STEERING_ENV)
    spec = load_default_steering(raw) if raw else None
    dirs = [Path(d).resolve() for d in os.environ.get(IMPORT_DIRS_ENV, "").split(os.pathsep) if d.strip()]
    return ServerConfig(spec, raw if spec else None, os.environ.get(ADMIN_KEY_ENV) or None, dirs,
                        max_upload_bytes=int(os.environ.get(MAX_UPLOAD_ENV, 64 << 20)))


def get_config() -> ServerConfig:
    global _config
    if _config is None:
        _config = config_from_env()
        set_default_steering(_config.default_steering)
    return _config


def registry() -> VectorRegistry | None:
    return VectorRegistry.from_env()


# ---------------------------------------------------------------------------------------------
# state shared by the routes and the middleware
# ---------------------------------------------------------------------------------------------

@dataclass
class SteeringState:
    hidden_size: int
    num_layers: int
    model_name: str
    admin_keys: list[str]          # keys that authorise the admin routes
    api_keys: list[str]            # vLLM's --api-key values (its own middleware checks them)
    config: ServerConfig
    write_lock: threading.Lock = field(default_factory=threading.Lock)


def _error(status: int, message: str, err_type: str, param: str | None = None) -> JSONResponse:
    """OpenAI-style error body, like vLLM's own."""
    return JSONResponse({"error": {"message": message, "type": err_type, "param": param, "code": status}},
                        status_code=status)


def _vector_entry(reg: VectorRegistry, name: str, st: SteeringState) -> dict[str, Any]:
    try:
        meta = reg.metadata(name)
    except (VectorFileError, OSError, ValueError, KeyError) as e:  # broken, or removed meanwhile
        return {"name": name, "error": str(e).replace(str(reg.root), "<vectors>"), "compatible": False}
    num_layers = meta.get("num_layers")
    layers = list(meta.get("layers") or [])
    compatible = (meta.get("hidden_size") == st.hidden_size and all(0 <= la < st.num_layers for la in layers)
                  and (num_layers is None or num_layers == st.num_layers))
    return {"object": "steering.vector", "name": name, "behaviour": meta.get("behaviour"), "layers": layers,
            "model_id": meta.get("model_id") or None, "hidden_size": meta.get("hidden_size"),
            "num_layers": num_layers, "method": meta.get("method"), "sha256": meta.get("sha256"),
            "norms": meta.get("norms"), "created_at": meta.get("created_at"), "compatible": compatible}


def _listing(st: SteeringState) -> dict[str, Any]:
    reg = registry()
    data = [_vector_entry(reg, n, st) for n in reg.names()] if reg is not None else []
    return {"object": "list", "data": data,
            "model": {"name": st.model_name, "hidden_size": st.hidden_size, "num_layers": st.num_layers}}


# ---------------------------------------------------------------------------------------------
# admin: add / remove vector sets
# ---------------------------------------------------------------------------------------------

class AdminError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param


def _allowed_roots(reg: VectorRegistry, st: SteeringState) -> list[Path]:
    return [reg.root, *st.config.import_dirs]


def _source_dir(reg: VectorRegistry, st: SteeringState, raw_path: Any) -> Path:
    """A directory inside an allowed root (symlinks resolved), else AdminError 403/404."""
    if not isinstance(raw_path, str) or not raw_path or "\0" in raw_path:
        raise AdminError(400, "path must be a non-empty string", param="path")
    p = Path(raw_path)
    if not p.is_absolute():
        p = reg.root / p
    try:
        real = p.resolve(strict=True)
    except (OSError, RuntimeError):
        raise AdminError(404, f"no vector set at {raw_path!r}", "NotFoundError", "path") from None
    roots = _allowed_roots(reg, st)
    if not any(real == r or real.is_relative_to(r) for r in roots):
        raise AdminError(403, f"{raw_path!r} is outside the directories vector sets may be loaded from "
                         f"(the --vectors directory and --steering-import-dir)", "PermissionDeniedError", "path")
    if not real.is_dir():
        raise AdminError(400, f"{raw_path!r} is not a vector set directory ({TENSORS_FILE} + {METADATA_FILE})",
                         param="path")
    return real


def _check_model(vs: Any, st: SteeringState, where: str) -> None:
    if vs.num_layers is not None and vs.num_layers != st.num_layers:
        raise VectorFileError(f"{where}: made for a model with {vs.num_layers} layers; the served model has "
                              f"{st.num_layers}")


def _load_checked(directory: Path, st: SteeringState, where: str):
    try:
        vs = load_vector_set(directory, expect_hidden_size=st.hidden_size, expect_num_layers=st.num_layers)
        _check_model(vs, st, where)
    except (VectorFileError, ValueError, TypeError, KeyError, AttributeError) as e:  # malformed metadata too
        raise AdminError(400, str(e).replace(str(directory), where), param="metadata") from None
    return vs


def _add_vector(body: dict[str, Any], st: SteeringState) -> tuple[int, dict[str, Any]]:
    """Runs in a thread: validate and write one vector set into the registry."""
    reg = registry()
    if reg is None:
        raise AdminError(409, "no vector directory is configured (start with --vectors DIR)", "ConflictError")
    unknown = set(body) - {"name", "path", "safetensors", "metadata", "overwrite"}
    if unknown:
        raise AdminError(400, f"unknown fields {sorted(unknown)}; use name, path | (safetensors, metadata), "
                         "overwrite", param=sorted(unknown)[0])
    has_path, has_upload = "path" in body, ("safetensors" in body or "metadata" in body)
    if has_path == has_upload:
        raise AdminError(400, "give either \"path\" (a vector set directory inside the vectors directory) or "
                         "\"safetensors\" (base64) with \"metadata\" (the vsteer.json object)")
    overwrite = body.get("overwrite", False)
    if not isinstance(overwrite, bool):
        raise AdminError(400, "overwrite must be true or false", param="overwrite")
    name = body.get("name")
    if has_path:
        src = _source_dir(reg, st, body["path"])
        name = name if name is not None else src.name
    if not isinstance(name, str):
        raise AdminError(400, "name is required (a string)", param="name")
    try:
        check_name(name)
        dest = reg.path_for(name)
    except ValueError as e:
        raise AdminError(400, str(e), param="name") from None

    staging: Path | None = None
    try:
        if has_path:
            source = "path"
            vs = _load_checked(src, st, body["path"])
            if src == dest:  # already registered under this name: nothing to copy
                metrics.record_registry_load(source)
                return 200, _vector_entry(reg, name, st)
        else:
            source = "upload"
            meta, blob = body.get("metadata"), body.get("safetensors")
            if not isinstance(meta, dict):
                raise AdminError(400, "metadata must be the vsteer.json object", param="metadata")
            if not isinstance(blob, str):
                raise AdminError(400, "safetensors must be a base64 string", param="safetensors")
            try:
                raw = base64.b64decode(blob, validate=True)
            except (binascii.Error, ValueError):
                raise AdminError(400, "safetensors is not valid base64", param="safetensors") from None
            # Stage inside the registry root under a name the registry never lists.
            staging = Path(tempfile.mkdtemp(prefix=".upload-", dir=reg.root))
            (staging / TENSORS_FILE).write_bytes(raw)
            (staging / METADATA_FILE).write_text(json.dumps(meta))
            vs = _load_checked(staging, st, "upload")
        with st.write_lock:
            exists = name in reg
            if exists and not overwrite:
                raise AdminError(409, f"a vector set named {name!r} already exists (send \"overwrite\": true to "
                                 "replace it)", "ConflictError", "name")
            reg.add(name, vs, overwrite=overwrite)
        metrics.record_registry_load(source)
        logger.info("vsteer: %s vector set %r (%s, layers %s) from %s", "replaced" if exists else "added", name,
                    vs.behaviour, vs.layers, source)
        return (200 if exists else 201), _vector_entry(reg, name, st)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _remove_vector(name: str) -> dict[str, Any]:
    reg = registry()
    if reg is None:
        raise AdminError(409, "no vector directory is configured (start with --vectors DIR)", "ConflictError")
    try:
        reg.remove(name)
    except UnknownVectorError as e:
        raise AdminError(404, str(e), "NotFoundError", "name") from None
    except ValueError as e:
        raise AdminError(400, str(e), param="name") from None
    metrics.record_registry_removal()
    logger.info("vsteer: removed vector set %r", name)
    return {"object": "steering.vector.deleted", "name": name, "deleted": True}


def _state(request: Request) -> SteeringState:
    return request.app.state.vsteer


def _admin_denied(request: Request) -> JSONResponse | None:
    """The middleware authenticates admin requests and marks the scope; refuse otherwise."""
    if request.scope.get("vsteer_admin"):
        return None
    st = _state(request)
    if not st.admin_keys:
        return _error(403, "the steering admin routes are disabled: start the server with --steering-admin-key "
                      "KEY (or VSTEER_ADMIN_KEY, or vLLM's --api-key)", "PermissionDeniedError")
    return _error(401, "this route needs the steering admin key: Authorization: Bearer <key>",
                  "AuthenticationError")


router = APIRouter()


@router.get(VECTORS_PATH)
async def list_vectors(request: Request):
    return JSONResponse(await asyncio.to_thread(_listing, _state(request)))


@router.get(VECTORS_PATH + "/{name}")
async def get_vector(name: str, request: Request):
    st = _state(request)
    reg = registry()
    if reg is None or name not in reg:
        unknown = UnknownVectorError(name, reg.names() if reg is not None else [])
        return _error(404, str(unknown), "NotFoundError", "name")
    return JSONResponse(await asyncio.to_thread(_vector_entry, reg, name, st))


@router.post(VECTORS_PATH)
async def add_vector(request: Request):
    denied = _admin_denied(request)
    if denied is not None:
        return denied
    st = _state(request)
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > st.config.max_upload_bytes:
        return _error(413, f"request body over {st.config.max_upload_bytes} bytes", "RequestTooLargeError")
    raw = await request.body()
    if len(raw) > st.config.max_upload_bytes:
        return _error(413, f"request body over {st.config.max_upload_bytes} bytes", "RequestTooLargeError")
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return _error(400, f"the body must be a JSON object ({e})", "BadRequestError")
    if not isinstance(body, dict):
        return _error(400, "the body must be a JSON object", "BadRequestError")
    try:
        status, entry = await asyncio.to_thread(_add_vector, body, st)
    except AdminError as e:
        return _error(e.status, e.message, e.err_type, e.param)
    metrics.update_registry_size()
    return JSONResponse(entry, status_code=status)


@router.delete(VECTORS_PATH + "/{name}")
async def delete_vector(name: str, request: Request):
    denied = _admin_denied(request)
    if denied is not None:
        return denied
    try:
        out = await asyncio.to_thread(_remove_vector, name)
    except AdminError as e:
        return _error(e.status, e.message, e.err_type, e.param)
    metrics.update_registry_size()
    return JSONResponse(out)


# ---------------------------------------------------------------------------------------------
# middleware
# ---------------------------------------------------------------------------------------------

def _presented_keys(headers: Headers) -> list[str]:
    """``Authorization: Bearer KEY`` and/or ``X-Vsteer-Admin-Key: KEY``."""
    keys = []
    value = headers.get("authorization")
    if value:
        scheme, _, token = value.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            keys.append(token.strip())
    if headers.get(ADMIN_KEY_HEADER):
        keys.append(headers[ADMIN_KEY_HEADER].strip())
    return keys


def _key_matches(token: str | None, keys: list[str]) -> bool:
    if not token:
        return False
    ok = False
    for key in keys:
        ok |= hmac.compare_digest(token.encode(), key.encode())
    return ok


class SteeringMiddleware:
    """Pure ASGI (no extra task): streaming responses pass through untouched but for the
    added headers; non-streaming JSON bodies of steered requests get a ``steering`` field."""

    def __init__(self, app: Any, state: SteeringState):
        self.app, self.state = app, state

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"].removeprefix(scope.get("root_path", "") or "")
        method = scope.get("method", "GET")
        if path == "/metrics" or path.startswith("/metrics/"):
            await self._refresh_metrics(scope)
            return await self.app(scope, receive, send)
        if (path == VECTORS_PATH or path.startswith(VECTORS_PATH + "/")) and method in ("POST", "DELETE"):
            scope = self._authenticate_admin(scope)
            return await self.app(scope, receive, send)
        if method == "POST" and path in STEERED_PATHS:
            self._start_background(scope)
            info: dict[str, Any] = {}
            token = RESPONSE_INFO.set(info)
            try:
                return await self.app(scope, receive, self._wrap_send(send, info))
            finally:
                RESPONSE_INFO.reset(token)
        return await self.app(scope, receive, send)

    def _engine_client(self, scope: dict[str, Any]) -> Any:
        app = scope.get("app")
        return getattr(getattr(app, "state", None), "engine_client", None)

    def _start_background(self, scope: dict[str, Any]) -> None:
        try:
            metrics.PULLER.start_background(self._engine_client(scope), metrics.refresh_interval())
        except RuntimeError:
            pass

    async def _refresh_metrics(self, scope: dict[str, Any]) -> None:
        self._start_background(scope)
        await metrics.PULLER.refresh(self._engine_client(scope))
        await asyncio.to_thread(metrics.update_registry_size)

    def _authenticate_admin(self, scope: dict[str, Any]) -> dict[str, Any]:
        presented = _presented_keys(Headers(scope=scope))
        if not any(_key_matches(k, self.state.admin_keys) for k in presented):
            return scope
        scope = dict(scope)
        scope["vsteer_admin"] = True
        # vLLM's own --api-key check guards every /v1 route and knows nothing of the admin
        # key: an authenticated admin request passes it with one of the API keys.
        if self.state.api_keys and not any(_key_matches(k, self.state.api_keys) for k in presented):
            raw = [(k, v) for k, v in scope["headers"] if k.lower() != b"authorization"]
            raw.append((b"authorization", f"Bearer {self.state.api_keys[0]}".encode("latin-1")))
            scope["headers"] = raw
        return scope

    def _wrap_send(self, send: Any, info: dict[str, Any]) -> Any:
        held: dict[str, Any] = {}
        chunks: list[bytes] = []

        async def wrapped(message: dict[str, Any]) -> None:
            kind = message["type"]
            if kind == "http.response.start":
                described = info.get(STEERING_KEY)
                if described is None or message.get("status") != 200:
                    return await send(message)
                headers = MutableHeaders(scope=message)
                headers[FINGERPRINT_HEADER] = described["fingerprint"]
                headers[STEERING_HEADER] = json.dumps(described, separators=(",", ":"), sort_keys=True)
                if headers.get("content-type", "").startswith("application/json"):
                    held["start"] = message  # add the body field once the body is complete
                    return None
                return await send(message)
            if kind == "http.response.body" and "start" in held:
                chunks.append(message.get("body", b""))
                if message.get("more_body", False):
                    return None
                body = b"".join(chunks)
                try:
                    obj = json.loads(body)
                    if isinstance(obj, dict):
                        obj[STEERING_KEY] = info[STEERING_KEY]
                        body = json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")
                except (json.JSONDecodeError, UnicodeDecodeError):
                    pass
                start = held.pop("start")
                MutableHeaders(scope=start)["content-length"] = str(len(body))
                await send(start)
                return await send({"type": "http.response.body", "body": body, "more_body": False})
            return await send(message)

        return wrapped


# ---------------------------------------------------------------------------------------------
# installing into vLLM's app
# ---------------------------------------------------------------------------------------------

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
        entries = [_vector_entry(reg, n, st) for n in reg.names()]
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


__all__ = ["ServerConfig", "SteeringMiddleware", "configure", "install", "patch_build_app", "router",
           "load_default_steering", "FINGERPRINT_HEADER", "STEERING_HEADER"]
