"""The protocol between ``vsteer extract --engine vllm`` (the driver,
``vsteer.extract.vllm_engine``) and the capture code in each vLLM worker
(``vsteer.serving.capture``), defined once for both sides.

The driver tags every contrast text's request with ``extra_args[CAPTURE_KEY] =
{"job": id, "group": 0|1}`` (positive / negative side) and talks to the workers through
``collective_rpc`` with the two method names below, in plain data: float64 arrays are
``pack``-ed into a dict (shape + bytes) and ``unpack``-ed on the other side.
"""

from __future__ import annotations

from typing import Any

import numpy as np

CAPTURE_KEY = "vsteer_capture"
"""``SamplingParams.extra_args`` entry naming a request's job and group."""
BEGIN = "vsteer_capture_begin"
"""``collective_rpc`` target: start a job (``{"job", "layers", "position", "share_prefix"}``)."""
COLLECT = "vsteer_capture_collect"
"""``collective_rpc`` target: the job's sums; ends the job."""
RULES = ("last", "first", "mean")
"""The token-position rules the workers can pool by (``vsteer.extract.positions``)."""
GROUPS = 2
"""Pair sides: 0 positive, 1 negative."""


def read_weights(rule: str, positions: np.ndarray, n: int) -> np.ndarray:
    """The weight of each position in its text's pooled state (the ``extract.positions`` rules)."""
    if rule == "last":
        return (positions == n - 1).astype(np.float64)
    if rule == "first":
        return (positions == 0).astype(np.float64)
    return np.full(positions.shape, 1.0 / n)


def pack(array: np.ndarray) -> dict[str, Any]:
    """A float64 array as plain data for ``collective_rpc``."""
    array = np.ascontiguousarray(array, dtype=np.float64)
    return {"shape": list(array.shape), "float64": array.tobytes()}


def unpack(packed: dict[str, Any]) -> np.ndarray:
    """The inverse of ``pack``."""
    return np.frombuffer(packed["float64"], dtype=np.float64).reshape(packed["shape"])
