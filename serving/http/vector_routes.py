"""The vector registry over HTTP.

* ``GET /v1/steering/vectors`` (+ ``/{name}``): list the registry (name, behaviour,
  layers, model, hidden size, hash, and whether it fits the served model).
* ``POST /v1/steering/vectors`` and ``DELETE /v1/steering/vectors/{name}``: admin routes
  (authenticated by ``SteeringMiddleware``) that add a vector set, from a path inside an
  allowed directory or uploaded as JSON (base64 safetensors + metadata), or remove one
  (``admin``). Workers read the registry by name, so changes apply to new requests at
  once; requests already accepted keep the content they were validated with.

Errors are OpenAI-style bodies with a ``code`` string (``errors.ADMIN_CODES``); a registry
another writer keeps locked past ``VSTEER_REGISTRY_LOCK_TIMEOUT_S`` is a 503
``registry_busy``. The work runs on the registry's own threads (``registry_io``).
"""

from __future__ import annotations

import json
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from vsteer.engine.errors import RegistryBusyError, UnknownVectorError, VectorFileError
from vsteer.engine.registry import VectorRegistry

from .. import metrics
from ..keys import VECTORS_PATH
from . import admin
from .errors import AdminError, error_response
from .registry_io import run_registry_read, run_registry_write
from .state import ServerState


def vector_entry(reg: VectorRegistry, name: str, st: ServerState, *, strict: bool = False) -> dict[str, Any]:
    """One listing entry. A set that is broken (or, unless ``strict``, removed or busy
    meanwhile) is an entry with an ``error``; ``strict`` raises the latter two."""
    try:
        meta = reg.metadata(name)
    except (UnknownVectorError, RegistryBusyError) as e:
        if strict:
            raise
        return {"name": name, "error": str(e), "compatible": False}
    except (VectorFileError, OSError, ValueError, KeyError) as e:  # broken
        return {"name": name, "error": str(e).replace(str(reg.root), "<vectors>"), "compatible": False}
    num_layers = meta.get("num_layers")
    layers = list(meta.get("layers") or [])
    compatible = (meta.get("hidden_size") == st.hidden_size and all(0 <= la < st.num_layers for la in layers)
                  and (num_layers is None or num_layers == st.num_layers))
    return {"object": "steering.vector", "name": name, "behaviour": meta.get("behaviour"), "layers": layers,
            "model_id": meta.get("model_id") or None, "hidden_size": meta.get("hidden_size"),
            "num_layers": num_layers, "method": meta.get("method"), "sha256": meta.get("sha256"),
            "norms": meta.get("norms"), "residual_norms": meta.get("residual_norms") or None,
            "recommended": meta.get("recommended"), "created_at": meta.get("created_at"), "compatible": compatible}


def _listing(st: ServerState) -> dict[str, Any]:
    reg = st.registry
    data = [vector_entry(reg, n, st) for n in reg.names()] if reg is not None else []
    return {"object": "list", "data": data,
            "model": {"name": st.model_name, "hidden_size": st.hidden_size, "num_layers": st.num_layers}}


def _state(request: Request) -> ServerState:
    return request.app.state.vsteer


def _admin_denied(request: Request) -> JSONResponse | None:
    """The middleware authenticates admin requests and marks the scope; refuse otherwise."""
    if request.scope.get("vsteer_admin"):
        return None
    if not _state(request).admin_keys:
        return error_response(403, "the steering admin routes are disabled: set VSTEER_ADMIN_KEY when starting "
                                   "the server", "admin_disabled")
    return error_response(401, "this route needs the steering admin key: Authorization: Bearer <key>",
                          "unauthorized")


async def _bounded_body(request: Request, limit: int) -> bytes | None:
    """The body, or None once it exceeds ``limit`` (checked while reading: a chunked
    upload without Content-Length is never held whole in memory)."""
    size = request.headers.get("content-length")
    if size is not None and size.isdigit() and int(size) > limit:
        return None
    chunks, total = [], 0
    async for chunk in request.stream():
        total += len(chunk)
        if total > limit:
            return None
        chunks.append(chunk)
    return b"".join(chunks)


def _parse(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise AdminError(400, f"the body must be a JSON object ({e})") from None
    except RecursionError:
        raise AdminError(400, "the body is nested too deeply") from None
    if not isinstance(body, dict):
        raise AdminError(400, "the body must be a JSON object")
    return body


router = APIRouter()


def _busy(e: RegistryBusyError) -> JSONResponse:
    return error_response(503, str(e), "registry_busy")


@router.get(VECTORS_PATH)
async def list_vectors(request: Request):
    return JSONResponse(await run_registry_read(_listing, _state(request)))


def _one(st: ServerState, name: str) -> dict[str, Any]:
    if st.registry is None or name not in st.registry:
        raise UnknownVectorError(name)
    return vector_entry(st.registry, name, st, strict=True)


@router.get(VECTORS_PATH + "/{name}")
async def get_vector(name: str, request: Request):
    try:
        return JSONResponse(await run_registry_read(_one, _state(request), name))
    except UnknownVectorError as e:
        return error_response(404, str(e), "not_found", "name")
    except RegistryBusyError as e:
        return _busy(e)


@router.post(VECTORS_PATH)
async def add_vector(request: Request):
    denied = _admin_denied(request)
    if denied is not None:
        return denied
    st = _state(request)
    raw = await _bounded_body(request, st.config.max_upload_bytes)
    if raw is None:
        return error_response(413, f"request body over {st.config.max_upload_bytes} bytes", "payload_too_large")
    try:
        body = await run_registry_write(_parse, raw)
        status, entry = await run_registry_write(admin.add_vector, body, st, vector_entry)
    except AdminError as e:
        return e.response()
    except RegistryBusyError as e:
        return _busy(e)
    await run_registry_read(metrics.update_registry_size, st.registry)
    return JSONResponse(entry, status_code=status)


@router.delete(VECTORS_PATH + "/{name}")
async def delete_vector(name: str, request: Request):
    denied = _admin_denied(request)
    if denied is not None:
        return denied
    st = _state(request)
    try:
        out = await run_registry_write(admin.remove_vector, name, st)
    except AdminError as e:
        return e.response()
    except RegistryBusyError as e:
        return _busy(e)
    await run_registry_read(metrics.update_registry_size, st.registry)
    return JSONResponse(out)
