"""Steered models over HTTP (``aliases``): list them, and add or remove run-time ones.

* ``GET /v1/steering/models``: every steered model with its steering and origin.
* ``POST /v1/steering/models`` ``{"name": ..., "steering": {...}}`` (or ``"spec":
  "happy:2;positions=generated"``, the compact form; ``"overwrite": true`` to replace) and
  ``DELETE /v1/steering/models/{name}``: admin routes, with the vector routes' key and
  checks. A steered model must resolve on the served model when it is created; the
  vectors it uses cannot be removed or broken while it exists (409
  ``used_by_steered_model``). Run-time models are files in the shared vector directory,
  so every replica serves them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from vsteer.engine.errors import SteeringError
from vsteer.engine.registry import check_name
from vsteer.engine.spec import STEERING_KEY

from ..keys import MODELS_PATH
from .aliases import SteeredModel, parse_compact
from .errors import AdminError, error_response
from .state import ServerState
from .vector_routes import _admin_denied, _bounded_body, _parse, _state

router = APIRouter()
_FIELDS = {"name", STEERING_KEY, "spec", "overwrite"}


def _listing(st: ServerState) -> dict[str, Any]:
    return {"object": "list", "data": [{"object": "steering.model", **m.describe(), "parent": st.model_name}
                                       for m in st.aliases.all()]}


def add_model(body: dict[str, Any], st: ServerState) -> tuple[int, dict[str, Any]]:
    """Runs in a thread: validate, then write one run-time steered model."""
    if st.aliases is None or st.aliases.root is None:
        raise AdminError(409, "no vector directory is configured (start with --vectors DIR)", "no_registry")
    unknown = set(body) - _FIELDS
    if unknown:
        raise AdminError(400, f"unknown fields {sorted(unknown)}; use name, steering | spec, overwrite",
                         param=sorted(unknown)[0])
    name, overwrite = body.get("name"), body.get("overwrite", False)
    if not isinstance(name, str) or not isinstance(overwrite, bool):
        raise AdminError(400, "name (a string) is required; overwrite is true or false", param="name")
    try:
        check_name(name)
    except ValueError as e:
        raise AdminError(400, str(e), "invalid_name", "name") from None
    if (STEERING_KEY in body) == ("spec" in body):
        raise AdminError(400, "give either \"steering\" (a SteeringSpec object) or \"spec\" (the compact form)")
    try:
        spec = parse_compact(body["spec"] if "spec" in body else _json_text(body[STEERING_KEY]))
        st.resolver.resolve(spec)
    except (ValueError, SteeringError) as e:
        raise AdminError(400, f"invalid steering: {e}", getattr(e, "reason", "invalid_request"), STEERING_KEY) from None
    if name == st.model_name or name in st.aliases.flags:
        raise AdminError(409, f"{name!r} is the served model or a --steered-model; it cannot be defined at run time",
                         "defined_by_flag", "name")
    with st.aliases.lock():
        exists = st.aliases.get(name) is not None
        if exists and not overwrite:
            raise AdminError(409, f"a steered model named {name!r} exists (send \"overwrite\": true)", "name_exists",
                             "name")
        try:
            st.aliases.write(SteeredModel(name, spec, "runtime"))
        except OSError as e:
            raise AdminError(507 if e.errno == 28 else 500, f"the steered model could not be written ({e.strerror})",
                             "insufficient_storage" if e.errno == 28 else "storage_error") from None
    return (200 if exists else 201), {"object": "steering.model", **SteeredModel(name, spec, "runtime").describe(),
                                      "parent": st.model_name}


def _json_text(value: Any) -> str:
    import json

    if not isinstance(value, dict):
        raise ValueError(f"steering must be an object, got {type(value).__name__}")
    return json.dumps(value)


def remove_model(name: str, st: ServerState) -> dict[str, Any]:
    if st.aliases is None:
        raise AdminError(404, f"no steered model {name!r}", "not_found", "name")
    if name in st.aliases.flags:
        raise AdminError(409, f"{name!r} comes from --steered-model; restart without it to remove it",
                         "defined_by_flag", "name")
    try:
        with st.aliases.lock():
            removed = st.aliases.remove(name)
    except ValueError as e:
        raise AdminError(400, str(e), "invalid_name", "name") from None
    if not removed:
        raise AdminError(404, f"no steered model {name!r}", "not_found", "name")
    return {"object": "steering.model.deleted", "name": name, "deleted": True}


@router.get(MODELS_PATH)
async def list_models(request: Request):
    return JSONResponse(await asyncio.to_thread(_listing, _state(request)))


@router.post(MODELS_PATH)
async def create_model(request: Request):
    denied = _admin_denied(request)
    if denied is not None:
        return denied
    st = _state(request)
    raw = await _bounded_body(request, st.config.max_upload_bytes)
    if raw is None:
        return error_response(413, f"request body over {st.config.max_upload_bytes} bytes", "payload_too_large")
    try:
        status, entry = await asyncio.to_thread(add_model, await asyncio.to_thread(_parse, raw), st)
    except AdminError as e:
        return e.response()
    return JSONResponse(entry, status_code=status)


@router.delete(MODELS_PATH + "/{name}")
async def delete_model(name: str, request: Request):
    denied = _admin_denied(request)
    if denied is not None:
        return denied
    try:
        return JSONResponse(await asyncio.to_thread(remove_model, name, _state(request)))
    except AdminError as e:
        return e.response()
