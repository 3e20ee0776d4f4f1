"""Every place vsteer hooks into vLLM, in one table.

vsteer is an out-of-tree plugin: like vLLM's own LoRA support hooks its model runner, it
wraps a few vLLM methods. They are all listed in ``PATCHES`` as (target, wrapper), applied
by one idempotent helper, and checked when the plugin loads: every target must exist with
the parameters the wrapper relies on, or the plugin fails with one error naming every
missing piece (never a silent no-op that serves unsteered). The runner fields the worker
reads each step are checked when the model loads (``check_runner_fields``).

Version-specific paths come from ``vsteer.serving.compat``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import Any, Callable

from .compat import UnsupportedVLLMError, compat_entry


@dataclass(frozen=True)
class Patch:
    """Wrap ``target`` (``"module:Owner.attr"`` or ``"module:attr"``) with ``wrapper(original)``.

    ``params``: leading parameter names the wrapper relies on (checked at load).
    ``add``: instead of wrapping, add this attribute (it must not exist yet).
    ``also_bound_in``: other modules that imported the same function object by name
    (``from x import f``); the name is replaced there too.
    ``optional``: a missing target is skipped (features vLLM may not have).
    ``api_server_only``: applied only in processes that build vLLM's HTTP app.
    """

    target: str
    wrapper: str
    params: tuple[str, ...] = ()
    add: bool = False
    also_bound_in: tuple[str, ...] = ()
    optional: bool = False
    api_server_only: bool = False


def _table() -> tuple[Patch, ...]:
    c = compat_entry()
    op = c.output_processor
    return (
        # front-end: validate, pin, salt, count (frontend); hold leases for each request's lifetime (lifetimes)
        Patch(f"{c.input_processor}.process_inputs", "vsteer.serving.frontend:process_inputs_wrapper",
              ("self", "request_id", "prompt", "params")),
        Patch(f"{op}.add_request", "vsteer.serving.lifetimes:add_request_wrapper", ("self", "request")),
        Patch(f"{op}._finish_request", "vsteer.serving.lifetimes:finish_request_wrapper", ("self", "req_state")),
        Patch(f"{op}.abort_requests", "vsteer.serving.lifetimes:abort_requests_wrapper", ("self", "request_ids")),
        Patch(f"{op}._update_stats_from_finished", "vsteer.serving.lifetimes:finished_stats_wrapper",
              ("self", "req_state", "finish_reason")),
        # engine core: refuse (with a request error) what cannot be steered (failures)
        Patch(f"{c.engine_core}.preprocess_add_request", "vsteer.serving.failures:admission_wrapper",
              ("self", "request")),
        Patch(f"{c.scheduler}.update_from_output", "vsteer.serving.failures:update_from_output_wrapper",
              ("self", "scheduler_output", "model_runner_output")),
        # workers: hook the layers, fill the tables each step (worker)
        Patch(f"{c.worker}.load_model", "vsteer.serving.worker:load_model_wrapper", ("self",)),
        Patch(f"{c.worker}.vsteer_stats", "vsteer.serving.worker:vsteer_stats", add=True),
        # workers: extraction capture jobs, driven by vsteer.extract.vllm_engine (capture)
        Patch(f"{c.worker}.vsteer_capture_begin", "vsteer.serving.capture:vsteer_capture_begin", add=True),
        Patch(f"{c.worker}.vsteer_capture_collect", "vsteer.serving.capture:vsteer_capture_collect", add=True),
        Patch(f"{c.model_runner}._prepare_inputs", "vsteer.serving.worker:prepare_inputs_wrapper",
              ("self", "scheduler_output", "num_scheduled_tokens")),
        Patch(f"{c.model_runner}._dummy_run", "vsteer.serving.worker:dummy_run_wrapper", ("self",)),
        Patch(f"{c.model_runner}.execute_model", "vsteer.serving.worker:timed_wrapper", ("self",)),
        Patch(f"{c.model_runner}.sample_tokens", "vsteer.serving.failures:sample_tokens_wrapper", ("self",)),
        Patch(c.compile_hash, "vsteer.serving.worker:compile_hash_wrapper", ("vllm_config",), optional=True),
        *(Patch(f"{cls}.to_sampling_params", "vsteer.serving.http.request_fields:to_sampling_params_wrapper",
                ("self",)) for cls in c.request_classes),
        *(Patch(f"{cls}.to_beam_search_params", "vsteer.serving.http.request_fields:to_beam_search_wrapper",
                ("self",), optional=True) for cls in c.request_classes),
        Patch(c.build_app, "vsteer.serving.http.app:build_app_wrapper", ("args",),
              also_bound_in=c.build_app_bound_in, api_server_only=True),
    )


# (id(owner), attr) -> (original, replacement): what ``apply`` did, so it is idempotent.
_APPLIED: dict[tuple[int, str], tuple[Any, Any]] = {}


def _resolve(target: str) -> tuple[Any, str]:
    """(owner, attribute) of ``module:Owner.attr``; raises ``LookupError`` naming the gap."""
    module_name, _, path = target.partition(":")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise LookupError(f"module {module_name} ({e})") from None
    *owners, attr = path.split(".")
    for name in owners:
        if not hasattr(owner, name):
            raise LookupError(f"{module_name}.{'.'.join(owners)} (no {name})")
        owner = getattr(owner, name)
    return owner, attr


def _load(ref: str) -> Any:
    module_name, _, name = ref.partition(":")
    return getattr(importlib.import_module(module_name), name)


def _original(owner: Any, attr: str) -> Any:
    """The unwrapped target (the same after ``apply`` ran)."""
    done = _APPLIED.get((id(owner), attr))
    return done[0] if done else getattr(owner, attr)


def problems(patches: tuple[Patch, ...] | None = None, *, api_server: bool = True) -> list[str]:
    """What is missing or changed in this vLLM for each patch (empty: all fine)."""
    out = []
    for p in patches or _table():
        if p.api_server_only and not api_server:
            continue
        try:
            owner, attr = _resolve(p.target)
        except LookupError as e:
            if not p.optional:
                out.append(f"{p.target}: missing {e}")
            continue
        if p.add:
            if hasattr(owner, attr) and (id(owner), attr) not in _APPLIED:
                out.append(f"{p.target}: already exists (vsteer would shadow it)")
            continue
        if not hasattr(owner, attr):
            if not p.optional:
                out.append(f"{p.target}: missing")
            continue
        if p.params:
            try:
                names = list(inspect.signature(_original(owner, attr)).parameters)
            except (TypeError, ValueError):
                continue
            if names[:len(p.params)] != list(p.params):
                out.append(f"{p.target}: parameters {names[:len(p.params)]} differ from {list(p.params)}")
    if patches is None and api_server:
        # what `vsteer serve` calls (not patched, but version-specific all the same)
        c = compat_entry()
        for ref in (*c.serve_names, *((c.configure_logging,) if c.configure_logging else ())):
            try:
                owner, attr = _resolve(ref)
            except LookupError as e:
                out.append(f"{ref}: missing {e}")
                continue
            if not hasattr(owner, attr):
                out.append(f"{ref}: missing")
    return out


def check(*, api_server: bool = False) -> None:
    """Raise ``UnsupportedVLLMError`` listing every patch this vLLM cannot take."""
    missing = problems(api_server=api_server)
    if missing:
        from .compat import vllm_version

        raise UnsupportedVLLMError(
            f"vsteer cannot hook into vLLM {vllm_version()}: " + "; ".join(missing)
            + ". Use a supported vLLM (docs/vllm.md) or set VSTEER_DISABLE=1.")


def wrap(owner: Any, attr: str, replacement: Any, *, also_bound_in: tuple[str, ...] = ()) -> None:
    """Set ``owner.attr`` to ``replacement`` once (idempotent per owner and attribute)."""
    key = (id(owner), attr)
    if key in _APPLIED:
        return
    original = getattr(owner, attr, None)
    setattr(owner, attr, replacement)
    _APPLIED[key] = (original, replacement)
    for name in also_bound_in:
        module = sys.modules.get(name)
        if module is not None and original is not None and getattr(module, attr, None) is original:
            setattr(module, attr, replacement)


def apply(*, api_server: bool | None = None) -> None:
    """Check, then apply every patch (the API-server ones only where an app is built)."""
    if api_server is None:
        api_server = in_api_server()
    check(api_server=api_server)
    for p in _table():
        if p.api_server_only and not api_server:
            continue
        try:
            owner, attr = _resolve(p.target)
        except LookupError:
            continue  # optional and absent (check() refused the rest)
        if not p.add and not hasattr(owner, attr):
            continue
        fn = _load(p.wrapper)
        wrap(owner, attr, fn if p.add else fn(_original(owner, attr)), also_bound_in=p.also_bound_in)


def in_api_server() -> bool:
    """True in a process that is about to build vLLM's OpenAI app (``vllm serve``,
    ``vsteer serve``, ``python -m vllm.entrypoints.openai.api_server``)."""
    c = compat_entry()
    return any(m in sys.modules for m in c.api_server_modules)


def check_runner_fields(runner: Any) -> None:
    """The model-runner state the worker reads each step must exist (checked at model load)."""
    missing = []
    for path in compat_entry().runner_fields:
        obj: Any = runner
        for part in path.split("."):
            if not hasattr(obj, part):
                missing.append(path)
                break
            obj = getattr(obj, part)
    if missing:
        from .compat import vllm_version

        raise UnsupportedVLLMError(f"vsteer reads model-runner fields that vLLM {vllm_version()} does not have: "
                                   f"{', '.join(missing)} ({type(runner).__name__}). Use a supported vLLM "
                                   "(docs/vllm.md) or set VSTEER_DISABLE=1.")


__all__ = ["Patch", "apply", "check", "check_runner_fields", "in_api_server", "problems", "wrap"]
