"""What ``--dtype auto`` means: the checkpoint's own dtype, on every engine.

transformers' ``dtype="auto"`` loads the dtype the config names; vLLM's own ``auto``
instead downcasts float32 checkpoints to bfloat16 (and may pick another type per
platform), so the same flags gave two engines different vectors. Every engine gets the
resolved name from here instead of ``auto``.
"""

from __future__ import annotations

from typing import Any

FALLBACK = "float32"  # a config that names no dtype: transformers' default too


def checkpoint_dtype(model: str, revision: str | None = None, *, trust_remote_code: bool = False) -> str:
    """``float32`` / ``bfloat16`` / ``float16`` ...: the dtype ``model``'s config names
    (``dtype``, or the older ``torch_dtype``; for a multimodal config, its text model's)."""
    from transformers import AutoConfig

    from vsteer.engine.models import resolve_model

    kw: dict[str, Any] = {"trust_remote_code": trust_remote_code}
    if revision:
        kw["revision"] = revision
    cfg = AutoConfig.from_pretrained(resolve_model(model, revision), **kw)
    for c in (cfg, getattr(cfg, "get_text_config", lambda: None)()):
        value = (getattr(c, "dtype", None) or getattr(c, "torch_dtype", None)) if c is not None else None
        if value is not None:
            return str(value).replace("torch.", "")
    return FALLBACK


def engine_dtype(dtype: str, model: str, revision: str | None = None, *, trust_remote_code: bool = False) -> str:
    """``dtype`` unless it is ``auto``; then the checkpoint's (``checkpoint_dtype``)."""
    return checkpoint_dtype(model, revision, trust_remote_code=trust_remote_code) if dtype == "auto" else dtype
