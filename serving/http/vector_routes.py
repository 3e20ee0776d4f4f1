"""The vector registry over HTTP.

* ``GET /v1/steering/vectors`` (+ ``/{name}``): list the registry (name, behaviour,
  layers, model, hidden size, hash, and whether it fits the served model).
* ``POST /v1/steering/vectors`` and ``DELETE /v1/steering/vectors/{name}``: admin routes
  (authenticated by ``SteeringMiddleware``) that add a vector set, from a path inside an
  allowed directory or uploaded as JSON (base64 safetensors + metadata), or remove one.
  Workers read the registry directory lazily by name, so changes apply at once.

Everything is checked before anything is written: a refused upload leaves the registry
as it was.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import JSONResponse

from vsteer.engine.errors import UnknownVectorError, VectorFileError
from vsteer.engine.formats import METADATA_FILE, TENSORS_FILE, load_vector_set
from vsteer.engine.registry import VectorRegistry, check_name

from .. import metrics
from ..keys import VECTORS_PATH
from .state import ServerState

logger = logging.getLogger("vllm.vsteer")


def _error(status: int, message: str, err_type: str, param: str | None = None) -> JSONResponse:
    """OpenAI-style error body, like vLLM's own."""
    return JSONResponse({"error": {"message": message, "type": err_type, "param": param, "code": status}},
                        status_code=status)


def vector_entry(reg: VectorRegistry, name: str, st: ServerState) -> dict[str, Any]:
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


def _listing(st: ServerState) -> dict[str, Any]:
    reg = st.registry
    data = [vector_entry(reg, n, st) for n in reg.names()] if reg is not None else []
    return {"object": "list", "data": data,
            "model": {"name": st.model_name, "hidden_size": st.hidden_size, "num_layers": st.num_layers}}


class AdminError(Exception):
    def __init__(self, status: int, message: str, err_type: str = "BadRequestError", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.err_type, self.param = status, message, err_type, param


def _allowed_roots(reg: VectorRegistry, st: ServerState) -> list[Path]:
    return [reg.root, *st.config.import_dirs]


def _source_dir(reg: VectorRegistry, st: ServerState, raw_path: Any) -> Path:
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


def _check_model(vs: Any, st: ServerState, where: str) -> None:
    if vs.num_layers is not None and vs.num_layers != st.num_layers:
        raise VectorFileError(f"{where}: made for a model with {vs.num_layers} layers; the served model has "
                              f"{st.num_layers}")


def _load_checked(directory: Path, st: ServerState, where: str):
    try:
        vs = load_vector_set(directory, expect_hidden_size=st.hidden_size, expect_num_layers=st.num_layers)
        _check_model(vs, st, where)
    except (VectorFileError, ValueError, TypeError, KeyError, AttributeError) as e:  # malformed metadata too
        raise AdminError(400, str(e).replace(str(directory), where), param="metadata") from None
    return vs


def _add_vector(body: dict[str, Any], st: ServerState) -> tuple[int, dict[str, Any]]:
    """Runs in a thread: validate and write one vector set into the registry."""
    reg = st.registry
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
                return 200, vector_entry(reg, name, st)
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
        return (200 if exists else 201), vector_entry(reg, name, st)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _remove_vector(name: str, st: ServerState) -> dict[str, Any]:
    reg = st.registry
    if reg is None:
        raise AdminError(409, "no vector directory is configured (start with --vectors DIR)", "ConflictError")
    try:
        with st.write_lock:  # never while an overwrite of the same set is half written
            reg.remove(name)
    except UnknownVectorError as e:
        raise AdminError(404, str(e), "NotFoundError", "name") from None
    except ValueError as e:
        raise AdminError(400, str(e), param="name") from None
    metrics.record_registry_removal()
    logger.info("vsteer: removed vector set %r", name)
    return {"object": "steering.vector.deleted", "name": name, "deleted": True}


def _state(request: Request) -> ServerState:
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


router = APIRouter()


@router.get(VECTORS_PATH)
async def list_vectors(request: Request):
    return JSONResponse(await asyncio.to_thread(_listing, _state(request)))


@router.get(VECTORS_PATH + "/{name}")
async def get_vector(name: str, request: Request):
    st = _state(request)
    reg = st.registry
    if reg is None or name not in reg:
        unknown = UnknownVectorError(name, reg.names() if reg is not None else [])
        return _error(404, str(unknown), "NotFoundError", "name")
    return JSONResponse(await asyncio.to_thread(vector_entry, reg, name, st))


@router.post(VECTORS_PATH)
async def add_vector(request: Request):
    denied = _admin_denied(request)
    if denied is not None:
        return denied
    st = _state(request)
    raw = await _bounded_body(request, st.config.max_upload_bytes)
    if raw is None:
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
    metrics.update_registry_size(st.registry)
    return JSONResponse(entry, status_code=status)


@router.delete(VECTORS_PATH + "/{name}")
async def delete_vector(name: str, request: Request):
    denied = _admin_denied(request)
    if denied is not None:
        return denied
    st = _state(request)
    try:
        out = await asyncio.to_thread(_remove_vector, name, st)
    except AdminError as e:
        return _error(e.status, e.message, e.err_type, e.param)
    metrics.update_registry_size(st.registry)
    return JSONResponse(out)
