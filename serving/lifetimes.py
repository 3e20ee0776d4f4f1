"""Hold the pinned vector versions of every request this front-end accepted until it
finishes, and count steered requests that ended in an error.

vLLM's ``OutputProcessor`` (in the process that accepted the request: an API server or
the ``vllm.LLM`` process) registers every request in ``add_request`` and forgets it in
``_finish_request`` or ``abort_requests``: leases (``vsteer.engine.leases``) are taken and
released at exactly those points, so a version is kept on disk for as long as a request
that may still need it exists, and ``VSTEER_LEASE_GRACE_S`` after.
"""

from __future__ import annotations

import functools
import logging
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any, Callable

from vsteer.engine.leases import LeaseKeeper
from vsteer.engine.registry import LEASES_DIR
from vsteer.engine.settings import settings

from . import metrics
from .keys import PINS_KEY

logger = logging.getLogger("vllm.vsteer")

_held: dict[str, tuple[LeaseKeeper, list[tuple[str, str]]]] = {}
_just_finished: OrderedDict[str, None] = OrderedDict()  # steered ids whose stats vLLM records next
_failed: OrderedDict[str, None] = OrderedDict()  # steered ids vLLM finished with an error (recent ones)
_lock = threading.Lock()


def _pins(request: Any) -> dict[str, str]:
    sp = getattr(request, "sampling_params", None)
    extra = (getattr(sp, "extra_args", None) or {}) if sp is not None else {}
    pins = extra.get(PINS_KEY)
    return dict(pins.get("versions") or {}) if isinstance(pins, dict) else {}


def acquire(request_id: str, versions: dict[str, str]) -> None:
    root = settings().vectors_dir
    if not versions or root is None:
        return
    keeper = LeaseKeeper.for_root(Path(root).resolve() / LEASES_DIR)
    pairs = sorted(versions.items())
    for name, sha in pairs:
        keeper.acquire(name, sha)
    with _lock:
        previous = _held.pop(request_id, None)
        _held[request_id] = (keeper, pairs)
    if previous is not None:  # a re-used id: release what the old one held
        _release_pairs(*previous)


def release(request_id: str) -> None:
    with _lock:
        held = _held.pop(request_id, None)
        if held is not None:
            _just_finished[request_id] = None
            while len(_just_finished) > 4096:
                _just_finished.popitem(last=False)
    if held is not None:
        _release_pairs(*held)


def _release_pairs(keeper: LeaseKeeper, pairs: list[tuple[str, str]]) -> None:
    for name, sha in pairs:
        keeper.release(name, sha)


def steering_failed(request_ids: Any) -> bool:
    """Whether one of these engine requests was steered and finished with an error (its
    pinned steering could not be applied: ``vsteer.serving.failures``)."""
    with _lock:
        return any(rid in _failed for rid in request_ids)


def held_requests() -> int:
    with _lock:
        return len(_held)


def add_request_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def add_request(self, request, *args, **kwargs):
        out = original(self, request, *args, **kwargs)
        versions = _pins(request)
        if versions:
            acquire(request.request_id, versions)
        return out

    return add_request


def finish_request_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _finish_request(self, req_state, *args, **kwargs):
        try:
            return original(self, req_state, *args, **kwargs)
        finally:
            release(req_state.request_id)

    return _finish_request


def abort_requests_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def abort_requests(self, *args, **kwargs):
        aborted = original(self, *args, **kwargs)
        for request_id in aborted or ():
            release(request_id)
        return aborted

    return abort_requests


def finished_stats_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    """``OutputProcessor._update_stats_from_finished``: count steered requests that vLLM
    finished with an error (their steering could not be applied, or another engine error)."""

    @functools.wraps(original)
    def _update_stats_from_finished(self, req_state, finish_reason, *args, **kwargs):
        try:
            from vllm.v1.engine import FinishReason

            with _lock:
                steered = _just_finished.pop(req_state.request_id, 0) is None
            if steered and finish_reason == FinishReason.ERROR:
                metrics.record_failed_request()
                with _lock:
                    _failed[req_state.request_id] = None
                    while len(_failed) > 4096:
                        _failed.popitem(last=False)
        except Exception:  # never let bookkeeping break vLLM's output path
            logger.debug("vsteer: failed-request accounting skipped", exc_info=True)
        return original(self, req_state, finish_reason, *args, **kwargs)

    return _update_stats_from_finished
