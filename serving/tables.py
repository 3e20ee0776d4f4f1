"""Per-step steering tables: the data the model-side op reads.

Two persistent buffers at fixed addresses (so torch.compile graphs and CUDA graphs keep
pointing at them):

* ``tables[slot, row, :]``: for each hooked decoder layer (slot) and each steering config
  resident this step (row), the pre-summed, strength-weighted vector. Row 0 is all zeros.
* ``rows[token]``: the table row each flattened token of the step adds (0 = nothing).

The op adds ``tables[slot].index_select(0, rows[:n])`` after the layer, so its cost does
not depend on how many distinct configs share a batch. All per-token work here is
vectorised numpy on the host; the only per-request Python is the config lookup.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch

from vsteer.engine.positions import steered_mask_by_code
from vsteer.engine.resolver import ResolvedSteering


def steered_token_mask(positions: np.ndarray, prompt_lens: np.ndarray, modes: np.ndarray) -> np.ndarray:
    """Which tokens their request's position rule names (``vsteer.engine.positions``)."""
    return steered_mask_by_code(positions, prompt_lens, modes)


class SteeringTables:
    """Persistent steering buffers for one worker, and the per-step update of them."""

    def __init__(self, layers: list[int], hidden_size: int, *, max_configs: int, max_tokens: int,
                 dtype: torch.dtype, device: torch.device | str):
        self.layers = list(layers)
        self.slot_of: dict[int, int] = {layer: slot for slot, layer in enumerate(self.layers)}
        self.hidden_size, self.max_configs, self.max_tokens = hidden_size, max_configs, max_tokens
        self.dtype, self.device = dtype, torch.device(device)
        self.tables = torch.zeros(len(self.layers), max_configs + 1, hidden_size, dtype=dtype, device=self.device)
        self.rows = torch.zeros(max_tokens, dtype=torch.int64, device=self.device)
        if self.device.type == "cpu":  # the host view is the buffer itself
            self._rows_host = self.rows.numpy()
        else:  # pinned staging, copied asynchronously like vLLM's own CpuGpuBuffers
            self._rows_pinned = torch.zeros(max_tokens, dtype=torch.int64, pin_memory=True)
            self._rows_host = self._rows_pinned.numpy()
        # Read by the op's eager fast path; ignored while a CUDA graph is being captured.
        self.layer_active: list[bool] = [False] * len(self.layers)
        self._dirty_tokens = 0
        self._resident: OrderedDict[str, int] = OrderedDict()   # fingerprint -> row, LRU order
        self._free_rows = list(range(max_configs, 0, -1))
        self._dense: OrderedDict[str, tuple[torch.Tensor, list[int]]] = OrderedDict()

    # -- configs -> table rows -------------------------------------------------------
    def _dense_for(self, resolved: ResolvedSteering) -> tuple[torch.Tensor, list[int]]:
        """[slots, hidden] on the host (zeros where the config does not steer). Kept off the
        device: vLLM sized its KV cache before these exist; only table rows live there."""
        hit = self._dense.get(resolved.fingerprint)
        if hit is None:
            dense = torch.zeros(len(self.layers), self.hidden_size, dtype=torch.float32)
            slots = []
            for layer, vec in resolved.layer_vectors.items():
                slot = self.slot_of.get(layer)
                if slot is not None:  # layers of another pipeline stage are steered there
                    dense[slot] = vec
                    slots.append(slot)
            hit = (dense.to(dtype=self.dtype), slots)
            self._dense[resolved.fingerprint] = hit
            if len(self._dense) > 4 * self.max_configs:
                self._dense.popitem(last=False)
        return hit

    def assign_rows(self, configs: dict[str, ResolvedSteering]) -> dict[str, int]:
        """Make every config of this step resident in a table row; write only new ones."""
        if len(configs) > self.max_configs:
            raise RuntimeError(f"{len(configs)} distinct steering configs in one step, over the table capacity "
                               f"{self.max_configs} (max_num_seqs)")
        out: dict[str, int] = {}
        for fp in configs:
            if fp in self._resident:
                self._resident.move_to_end(fp)
                out[fp] = self._resident[fp]
        for fp, resolved in configs.items():
            if fp in out:
                continue
            if not self._free_rows:
                victim = next(v for v in self._resident if v not in configs)
                self._free_rows.append(self._resident.pop(victim))
            row = self._free_rows.pop()
            self.tables[:, row].copy_(self._dense_for(resolved)[0])
            self._resident[fp] = row
            out[fp] = row
        active = [False] * len(self.layers)
        for fp, resolved in configs.items():
            for slot in self._dense_for(resolved)[1]:
                active[slot] = True
        self.layer_active = active
        return out

    # -- tokens -> rows ----------------------------------------------------------------
    def set_token_rows(self, num_scheduled: np.ndarray, computed: np.ndarray, prompt_lens: np.ndarray,
                       req_rows: np.ndarray, req_modes: np.ndarray) -> int:
        """Fill ``rows`` for one step. Arrays are per request in batch order; returns the
        number of steered tokens."""
        total = int(num_scheduled.sum())
        if total > self.max_tokens:
            raise RuntimeError(f"step has {total} tokens, steering buffers hold {self.max_tokens}")
        token_req = np.repeat(np.arange(len(num_scheduled)), num_scheduled)
        starts = np.cumsum(num_scheduled) - num_scheduled
        positions = computed[token_req] + (np.arange(total) - starts[token_req])
        mask = steered_token_mask(positions, prompt_lens[token_req], req_modes[token_req])
        token_rows = np.where(mask, req_rows[token_req], 0)
        host = self._rows_host
        host[:total] = token_rows
        if self._dirty_tokens > total:
            host[total:self._dirty_tokens] = 0
        upto = max(total, self._dirty_tokens)
        if self.device.type != "cpu":
            self.rows[:upto].copy_(self._rows_pinned[:upto], non_blocking=True)
        self._dirty_tokens = total
        return int(np.count_nonzero(token_rows))

    def clear(self) -> None:
        """No steering this step (or a dummy/profile run): zero rows, mark layers idle."""
        if self._dirty_tokens:
            self._rows_host[: self._dirty_tokens] = 0
            if self.device.type != "cpu":
                self.rows[: self._dirty_tokens].zero_()
            self._dirty_tokens = 0
        self.layer_active = [False] * len(self.layers)
