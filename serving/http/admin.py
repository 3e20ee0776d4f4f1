"""The registry's write operations behind the admin routes: add (from a path or an
upload) and remove a vector set.

Everything is checked before anything is written, and the registry writes atomically
(``vsteer.engine.registry``): a refused or failed request (bad file, full disk, a set the
default steering needs) leaves the registry exactly as it was, with no temporary files.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import errno
import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from vsteer.engine.errors import SteeringError, UnknownVectorError, VectorFileError, VersionGoneError
from vsteer.engine.formats import METADATA_FILE, TENSORS_FILE, load_vector_set
from vsteer.engine.registry import VectorRegistry, check_name
from vsteer.engine.resolver import SteeringResolver
from vsteer.engine.vectors import SteeringVectorSet

from .. import metrics
from .errors import AdminError
from .state import ServerState

logger = logging.getLogger("vllm.vsteer")
_FIELDS = {"name", "path", "safetensors", "metadata", "overwrite"}
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def registry_of(st: ServerState) -> VectorRegistry:
    if st.registry is None:
        raise AdminError(409, "no vector directory is configured (start with --vectors DIR)", "no_registry")
    return st.registry


# -- where a set may come from ------------------------------------------------------------------

def _allowed_roots(reg: VectorRegistry, st: ServerState) -> list[Path]:
    return [reg.root, *st.config.import_dirs]


def source_dir(reg: VectorRegistry, st: ServerState, raw_path: Any) -> Path:
    """A directory inside an allowed root (symlinks resolved). Paths outside the roots get
    403 whether or not they exist: the answer must not reveal the server's files."""
    if not isinstance(raw_path, str) or not raw_path or "\0" in raw_path:
        raise AdminError(400, "path must be a non-empty string", param="path")
    p = Path(raw_path)
    if not p.is_absolute():
        p = reg.root / p
    roots = _allowed_roots(reg, st)
    denied = AdminError(403, f"{raw_path!r} is outside the directories vector sets may be loaded from (the "
                             "--vectors directory and --steering-import-dir)", "path_not_allowed", "path")
    normalized = Path(os.path.normpath(p))  # lexical: nothing outside the roots is touched
    if not any(normalized == r or normalized.is_relative_to(r) for r in roots):
        raise denied
    try:
        real = normalized.resolve(strict=True)
    except (OSError, RuntimeError):
        raise AdminError(404, f"no vector set at {raw_path!r}", "not_found", "path") from None
    if not any(real == r or real.is_relative_to(r) for r in roots):  # a symlink pointing out
        raise denied
    if not real.is_dir():
        raise AdminError(400, f"{raw_path!r} is not a vector set directory ({TENSORS_FILE} + {METADATA_FILE})",
                         "bad_vector_file", "path")
    return real


def load_checked(directory: Path, st: ServerState, where: str) -> SteeringVectorSet:
    try:
        vs = load_vector_set(directory, expect_hidden_size=st.hidden_size, expect_num_layers=st.num_layers)
        if vs.num_layers is not None and vs.num_layers != st.num_layers:
            raise VectorFileError(f"{where}: made for a model with {vs.num_layers} layers; the served model has "
                                  f"{st.num_layers}")
    except (VectorFileError, ValueError, TypeError, KeyError, AttributeError) as e:  # malformed metadata too
        code = "wrong_hidden_size" if "hidden size" in str(e) else "bad_vector_file"
        raise AdminError(400, str(e).replace(str(directory), where), code, "metadata") from None
    return vs


def _from_upload(body: dict[str, Any], st: ServerState) -> SteeringVectorSet:
    meta, blob = body.get("metadata"), body.get("safetensors")
    if not isinstance(meta, dict):
        raise AdminError(400, "metadata must be the vsteer.json object", param="metadata")
    if not isinstance(blob, str):
        raise AdminError(400, "safetensors must be a base64 string", param="safetensors")
    try:
        raw = base64.b64decode(blob, validate=True)
    except (binascii.Error, ValueError):
        raise AdminError(400, "safetensors is not valid base64", param="safetensors") from None
    # Staged outside the registry: nothing of a refused upload ever lands there.
    with tempfile.TemporaryDirectory(prefix="vsteer-upload-") as staging:
        (Path(staging) / TENSORS_FILE).write_bytes(raw)
        (Path(staging) / METADATA_FILE).write_text(json.dumps(meta))
        return load_checked(Path(staging), st, "upload")


# -- the server's default steering must stay resolvable ---------------------------------------------

class _WithReplacement:
    """The registry as it would be with ``name`` replaced by ``vs`` (or removed)."""

    def __init__(self, reg: VectorRegistry, name: str, vs: SteeringVectorSet | None):
        self.reg, self.name, self.vs, self.root = reg, name, vs, reg.root

    def load_with_hash(self, name: str, **kw: Any) -> tuple[SteeringVectorSet, str]:
        if name != self.name:
            return self.reg.load_with_hash(name, **kw)
        if self.vs is None:
            raise UnknownVectorError(name, [])
        from vsteer.engine.formats import set_sha256

        return self.vs, set_sha256(self.vs)


def check_default_steering(st: ServerState, name: str, replacement: SteeringVectorSet | None) -> None:
    """409 if removing (or replacing with ``replacement``) ``name`` would break the
    default steering, which every plain request gets, or a steered model (a model name
    clients request; replicas sharing the directory see the same run-time ones). The
    caller holds ``st.aliases.lock()``."""
    resolver = SteeringResolver(_WithReplacement(st.registry, name, replacement),  # type: ignore[arg-type]
                                hidden_size=st.hidden_size, num_layers=st.num_layers,
                                steerable=st.resolver.steerable, dtype=st.resolver.dtype)
    what = "removing" if replacement is None else "this replacement of"
    if st.default_resolved is not None and name in st.default_resolved.versions:
        try:
            resolver.resolve(st.default_steering)
        except (SteeringError, VersionGoneError) as e:
            raise AdminError(409, f"{what} {name!r} would break the server's default steering "
                                  f"({st.config.default_steering_source}): {e}", "used_by_default_steering",
                             "name") from None
    for model in (st.aliases.using(name) if st.aliases is not None else ()):
        try:
            resolver.resolve(model.spec)
        except (SteeringError, VersionGoneError) as e:
            raise AdminError(409, f"{what} {name!r} would break the steered model {model.name!r}: {e}",
                             "used_by_steered_model", "name") from None


def _steering_lock(st: ServerState) -> Any:
    return st.aliases.lock() if st.aliases is not None else contextlib.nullcontext()


# -- the operations --------------------------------------------------------------------------------

def _storage_error(e: OSError) -> AdminError:
    if e.errno in _NO_SPACE:
        return AdminError(507, "the vector directory is out of space; nothing was changed", "insufficient_storage")
    return AdminError(500, f"the vector directory could not be written ({e.strerror}); nothing was changed",
                      "storage_error")


def add_vector(body: dict[str, Any], st: ServerState, entry: Any) -> tuple[int, dict[str, Any]]:
    """Runs in a thread: validate and write one vector set into the registry."""
    reg = registry_of(st)
    unknown = set(body) - _FIELDS
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
    src = source_dir(reg, st, body["path"]) if has_path else None
    if name is None and src is not None:
        name = Path(os.path.normpath(body["path"])).name  # the name it has there, not its resolved target
    if not isinstance(name, str):
        raise AdminError(400, "name is required (a string)", param="name")
    try:
        check_name(name)
        dest = reg.path_for(name)
    except ValueError as e:
        raise AdminError(400, str(e), "invalid_name", "name") from None
    source = "path" if has_path else "upload"
    if src is not None:
        vs = load_checked(src, st, body["path"])
        if src == dest.resolve():  # already registered under this name: nothing to copy
            metrics.record_registry_load(source)
            return 200, entry(reg, name, st)
    else:
        vs = _from_upload(body, st)
    exists = name in reg
    if exists and not overwrite:
        raise AdminError(409, f"a vector set named {name!r} already exists (send \"overwrite\": true to replace "
                              "it)", "name_exists", "name")
    try:
        with _steering_lock(st), st.write_lock:
            check_default_steering(st, name, vs)
            reg.add(name, vs, overwrite=overwrite)
    except FileExistsError as e:  # another replica took the name meanwhile
        raise AdminError(409, str(e), "name_exists", "name") from None
    except OSError as e:
        raise _storage_error(e) from None
    metrics.record_registry_load(source)
    logger.info("vsteer: %s vector set %r (%s, layers %s) from %s", "replaced" if exists else "added", name,
                vs.behaviour, vs.layers, source)
    return (200 if exists else 201), entry(reg, name, st)


def remove_vector(name: str, st: ServerState) -> dict[str, Any]:
    reg = registry_of(st)
    try:
        check_name(name)
    except ValueError as e:
        raise AdminError(400, str(e), "invalid_name", "name") from None
    if name not in reg:
        raise AdminError(404, str(UnknownVectorError(name, reg.names())), "not_found", "name")
    try:
        with _steering_lock(st), st.write_lock:
            check_default_steering(st, name, None)
            reg.remove(name)
    except UnknownVectorError as e:
        raise AdminError(404, str(e), "not_found", "name") from None
    except OSError as e:
        raise _storage_error(e) from None
    metrics.record_registry_removal()
    logger.info("vsteer: removed vector set %r", name)
    return {"object": "steering.vector.deleted", "name": name, "deleted": True}
