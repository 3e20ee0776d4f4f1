"""Small helpers for offline users of ``vllm.LLM``."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from vsteer.engine.settings import Settings
from vsteer.engine.spec import SteeringSpec


def steering(spec: SteeringSpec | dict[str, Any] | None = None, /, *, positions: str = "all",
             **strengths: float) -> dict[str, Any]:
    """The ``extra_args`` for ``SamplingParams``::

        SamplingParams(max_tokens=64, extra_args=steering(happy=4.0, formal=-2.0, positions="generated"))
        SamplingParams(extra_args=steering({"vectors": [{"name": "happy", "strength": 4, "layers": [10]}]}))

    The spec is validated here (shape and bounds); names are resolved by the engine.
    """
    if spec is None:
        spec = {"vectors": [{"name": n, "strength": s} for n, s in strengths.items()], "positions": positions}
    elif strengths:
        raise TypeError("pass either a spec or name=strength keywords, not both")
    parsed = SteeringSpec.parse(spec)
    return {"steering": parsed.to_dict() if parsed is not None else None}


def set_vectors_dir(path: str | os.PathLike) -> str:
    """Point this process and the engine processes it starts at a vector registry.
    Call before creating ``vllm.LLM`` (the workers read it when they start)."""
    p = Path(path).resolve()
    if not p.is_dir():
        raise FileNotFoundError(f"vector directory {p} does not exist")
    os.environ[Settings.env_name("vectors_dir")] = str(p)
    return str(p)
