"""Host-to-device copies that stay correct under vLLM's async scheduling.

With async scheduling (on by default on GPU) the host prepares step N+1 while the device
still runs step N, and ``_dummy_run`` runs between real steps on idle data-parallel
ranks. A persistent pinned staging buffer written by the host while an earlier
non-blocking copy from it is still pending would hand that copy the new bytes: the
earlier step would read zeros or another step's rows and run unsteered, with no error.

So vsteer keeps no persistent pinned buffer. Every upload stages into a fresh pinned block
from torch's caching host allocator, which records the copy's stream and does not reuse
the block until the copy has completed (what vLLM's own ``async_tensor_h2d`` does for the
V2 runner's inputs). The host keeps plain numpy mirrors it may write at any time, and
clearing device state is a device write, ordered on the stream after the work that reads
it. On CPU the "device" buffer is host memory and the forward has finished before the
host prepares the next step, so uploads are plain copies.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

Uploader = Callable[[torch.Tensor, "np.ndarray | torch.Tensor"], None]
"""``upload(out, host)``: copy ``host`` into the device tensor ``out`` (same shape)."""


def _as_tensor(host: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(host)) if isinstance(host, np.ndarray) else host


def upload_sync(out: torch.Tensor, host: np.ndarray | torch.Tensor) -> None:
    """CPU devices: the destination is host memory and nothing reads it concurrently."""
    out.copy_(_as_tensor(host))


def stage(host: np.ndarray | torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A fresh host copy of ``host`` for one asynchronous copy (pinned where the platform
    has pinned memory); nothing else ever holds it, so nothing can write it while the copy
    is pending."""
    src = _as_tensor(host)
    staged = torch.empty(src.shape, dtype=dtype, pin_memory=torch.cuda.is_available())
    staged.copy_(src)
    return staged


def upload_staged(out: torch.Tensor, host: np.ndarray | torch.Tensor) -> None:
    """Accelerators: stage into a fresh pinned block, then copy without blocking the host."""
    out.copy_(stage(host, out.dtype), non_blocking=True)


def uploader_for(device: torch.device) -> Uploader:
    return upload_sync if device.type == "cpu" else upload_staged
