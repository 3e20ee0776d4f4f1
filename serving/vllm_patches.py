"""Every place vsteer hooks into vLLM, in one table.

Each entry is a ``Patch`` (``vsteer.serving.patching``): a target, its wrapper and the
parameters the wrapper relies on. The table is checked when the plugin loads: every
target must exist with those parameters, or the plugin fails with one error naming every
missing piece (never a silent no-op that serves unsteered). Version-specific paths come
from ``vsteer.serving.compat``; the model-runner patches come from the runner adapters of
the generations this vLLM has (``vsteer.serving.runners``).
"""

from __future__ import annotations

import sys

from vsteer.engine import capture_protocol

from .compat import UnsupportedVLLMError, VLLMCompat, compat_entry
from .keys import WORKER_STATS_METHOD
from .patching import Patch, load, missing_refs, original_of, problems as patch_problems, resolve_target, wrap
from .runners import GENERATIONS


def table(c: VLLMCompat | None = None) -> tuple[Patch, ...]:
    c = c or compat_entry()
    op = c.output_processor
    return (
        # front-end: check the seal, salt, count (frontend); hold leases for each request's lifetime (lifetimes)
        Patch(f"{c.input_processor}.process_inputs", "vsteer.serving.frontend:process_inputs_wrapper",
              ("self", "request_id", "prompt", "params")),
        Patch(f"{op}.add_request", "vsteer.serving.lifetimes:add_request_wrapper", ("self", "request")),
        Patch(f"{op}._finish_request", "vsteer.serving.lifetimes:finish_request_wrapper", ("self", "req_state")),
        Patch(f"{op}.abort_requests", "vsteer.serving.lifetimes:abort_requests_wrapper", ("self", "request_ids")),
        Patch(f"{op}._update_stats_from_finished", "vsteer.serving.lifetimes:finished_stats_wrapper",
              ("self", "req_state", "finish_reason")),
        # engine core: prepare each config's rows off the step, or fail the request (admission);
        # hold back requests whose configs would overflow the tables (scheduling);
        # finish with an error what a worker could not steer (failures)
        Patch(f"{c.engine_core}.preprocess_add_request", "vsteer.serving.admission:preprocess_add_request_wrapper",
              ("self", "request")),
        Patch(f"{c.scheduler}.schedule", "vsteer.serving.scheduling:schedule_wrapper", ("self",)),
        Patch(f"{c.scheduler}.update_from_output", "vsteer.serving.failures:update_from_output_wrapper",
              ("self", "scheduler_output", "model_runner_output")),
        *(Patch(f"{cls}.get_output", "vsteer.serving.failures:get_output_wrapper", ("self",))
          for cls in c.async_outputs),
        # workers: pick the runner adapter and hook the layers (worker); counters and capture RPCs
        Patch(f"{c.worker}.load_model", "vsteer.serving.worker:load_model_wrapper", ("self",)),
        Patch(f"{c.worker}.{WORKER_STATS_METHOD}", "vsteer.serving.worker:vsteer_stats", add=True),
        Patch(f"{c.worker}.{capture_protocol.BEGIN}", "vsteer.serving.capture:vsteer_capture_begin", add=True),
        Patch(f"{c.worker}.{capture_protocol.COLLECT}", "vsteer.serving.capture:vsteer_capture_collect", add=True),
        # the model runner of each generation this vLLM has (runners.v1, runners.v2)
        *(p for name, ref in c.runners.items() for p in GENERATIONS[name].patches(ref)),
        Patch(c.compile_hash, "vsteer.serving.worker:compile_hash_wrapper", ("vllm_config",), optional=True),
        # the OpenAI request classes: attach the request's resolved steering (http.request_fields)
        *(Patch(f"{cls}.to_sampling_params", "vsteer.serving.http.request_fields:to_sampling_params_wrapper",
                ("self",)) for cls in c.request_classes),
        *(Patch(f"{cls}.to_beam_search_params", "vsteer.serving.http.request_fields:to_beam_search_wrapper",
                ("self",), optional=True) for cls in c.request_classes),
        Patch(c.build_app, "vsteer.serving.http.app:build_app_wrapper", ("args",),
              also_bound_in=c.build_app_bound_in, api_server_only=True),
    )


def problems(*, api_server: bool = True, c: VLLMCompat | None = None) -> list[str]:
    """What this vLLM lacks of the table, and of the names ``vsteer serve`` calls."""
    c = c or compat_entry()
    out = patch_problems(table(c), api_server=api_server)
    if api_server:
        out += missing_refs((*c.serve_names.values(), *((c.configure_logging,) if c.configure_logging else ())))
    return out


def check(*, api_server: bool = False) -> None:
    """Raise ``UnsupportedVLLMError`` listing every patch this vLLM cannot take."""
    missing = problems(api_server=api_server)
    if missing:
        from .compat import vllm_version

        raise UnsupportedVLLMError(
            f"vsteer cannot hook into vLLM {vllm_version()}: " + "; ".join(missing)
            + ". Use a supported vLLM (docs/vllm.md) or set VSTEER_DISABLE=1.")


def apply(*, api_server: bool | None = None) -> None:
    """Check, then apply every patch (the API-server ones only where an app is built)."""
    if api_server is None:
        api_server = in_api_server()
    check(api_server=api_server)
    for p in table():
        if p.api_server_only and not api_server:
            continue
        try:
            owner, attr = resolve_target(p.target)
        except LookupError:
            continue  # optional and absent (check() refused the rest)
        if not p.add and not hasattr(owner, attr):
            continue
        fn = load(p.wrapper)
        wrap(owner, attr, fn if p.add else fn(original_of(owner, attr)), also_bound_in=p.also_bound_in)


def in_api_server() -> bool:
    """True in a process that is about to build vLLM's OpenAI app (``vllm serve``,
    ``vsteer serve``, ``python -m vllm.entrypoints.openai.api_server``)."""
    c = compat_entry()
    return any(m in sys.modules for m in c.api_server_modules)


__all__ = ["Patch", "apply", "check", "in_api_server", "problems", "table"]
