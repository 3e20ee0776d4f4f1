"""Per-step steering tables: the data the model-side op reads.

Persistent buffers at fixed addresses (so torch.compile graphs and CUDA graphs keep
pointing at them), indexed by hooked decoder layer (slot) and by steering config
resident this step (row; row 0 is "nothing"):

* ``tables[slot, row, :]``: the summed added vector (``add``; zeros where none);
* ``proj_dirs[slot, row, k, :]`` / ``proj_targets[slot, row, k]``: up to
  ``VSTEER_MAX_PROJECTIONS`` unit directions whose projections are set (ablate, clamp);
  unused slots are zero, which the op turns into an exact no-op;
* ``norm_flags[slot, row]``: rescale the token to its norm before the layer's operators;
* ``general[slot, row]``: the row uses projections or the norm rescale at this layer;
* ``rows[token]``: the table row each flattened token of the step uses.

Tables grow only by what the operators need: ``proj_dirs`` is ``K`` times the add table
(``K = VSTEER_MAX_PROJECTIONS``, default 2; 0 turns ablate/clamp off). The op gathers
rows per token, so its cost does not depend on how many distinct configs share a batch.
All per-token work here is vectorised numpy on the host; the only per-request Python is
the config lookup, run only when the batch's requests change (``WorkerSteering.step``);
decode steps reuse per-request rows (``decode_rows``). bench/step_overhead.py times it.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import TYPE_CHECKING

import numpy as np
import torch

from vsteer.engine.positions import steered_mask_by_code

if TYPE_CHECKING:  # a type only: the GPU check (bench/gpu/check_op.py) imports this without pydantic
    from vsteer.engine.resolver import ResolvedSteering


def steered_token_mask(positions: np.ndarray, prompt_lens: np.ndarray, modes: np.ndarray) -> np.ndarray:
    """Which tokens their request's position rule names (``vsteer.engine.positions``)."""
    return steered_mask_by_code(positions, prompt_lens, modes)


class SteeringTables:
    """Persistent steering buffers for one worker, and the per-step update of them."""

    def __init__(self, layers: list[int], hidden_size: int, *, max_configs: int, max_tokens: int,
                 dtype: torch.dtype, device: torch.device | str, max_projections: int = 2):
        self.layers = list(layers)
        self.slot_of: dict[int, int] = {layer: slot for slot, layer in enumerate(self.layers)}
        self.hidden_size, self.max_configs, self.max_tokens = hidden_size, max_configs, max_tokens
        self.max_projections = max_projections
        self.dtype, self.device = dtype, torch.device(device)
        slots, rows = len(self.layers), max_configs + 1
        self.tables = torch.zeros(slots, rows, hidden_size, dtype=dtype, device=self.device)
        self.proj_dirs = torch.zeros(slots, rows, max_projections, hidden_size, dtype=dtype, device=self.device)
        self.proj_targets = torch.zeros(slots, rows, max_projections, dtype=torch.float32, device=self.device)
        self.norm_flags = torch.zeros(slots, rows, dtype=torch.bool, device=self.device)
        self.general = torch.zeros(slots, rows, dtype=torch.bool, device=self.device)
        self.rows = torch.zeros(max_tokens, dtype=torch.int64, device=self.device)
        if self.device.type == "cpu":  # the host view is the buffer itself
            self._rows_host = self.rows.numpy()
        else:  # pinned staging, copied asynchronously like vLLM's own CpuGpuBuffers
            self._rows_pinned = torch.zeros(max_tokens, dtype=torch.int64, pin_memory=True)
            self._rows_host = self._rows_pinned.numpy()
        # Read by the op's eager fast paths; ignored while a CUDA graph is being captured.
        self.layer_active: list[bool] = [False] * slots
        self.general_active: list[bool] = [False] * slots
        self._dirty_tokens = 0
        self._resident: OrderedDict[str, int] = OrderedDict()   # fingerprint -> row, LRU order
        self._free_rows = list(range(max_configs, 0, -1))
        self._row_slots: dict[int, tuple[int, int]] = {}  # row -> (active, general) slots as bit masks
        self.generation = 0
        """Bumped whenever a row is written or evicted: a caller's row numbers from an
        earlier ``assign_rows`` stay valid while it is unchanged (the worker's batch plan)."""

    # -- configs -> table rows -------------------------------------------------------
    def _write_row(self, row: int, resolved: ResolvedSteering) -> None:
        """Write one config's plans into ``row`` (layers of another pipeline stage are
        steered there and skipped here)."""
        active = general = 0
        self.tables[:, row].zero_()
        self.proj_dirs[:, row].zero_()
        self.proj_targets[:, row].zero_()
        self.norm_flags[:, row] = False
        self.general[:, row] = False
        for layer, plan in resolved.plans().items():
            slot = self.slot_of.get(layer)
            if slot is None:
                continue
            active |= 1 << slot
            if plan.add is not None:
                self.tables[slot, row].copy_(plan.add.to(self.dtype))
            k = plan.num_directions
            if k > self.max_projections:
                raise RuntimeError(f"{k} projection directions at layer {layer}, tables hold "
                                   f"{self.max_projections} (VSTEER_MAX_PROJECTIONS)")
            if k:
                self.proj_dirs[slot, row, :k].copy_(plan.directions.to(self.dtype))
                self.proj_targets[slot, row, :k].copy_(plan.targets)
            if plan.preserve_norm:
                self.norm_flags[slot, row] = True
            if k or plan.preserve_norm:
                self.general[slot, row] = True
                general |= 1 << slot
        self._row_slots[row] = (active, general)

    def assign_rows(self, configs: dict[str, ResolvedSteering]) -> dict[str, int]:
        """Make every config of this step resident in a table row; write only new ones."""
        if len(configs) > self.max_configs:
            raise RuntimeError(f"{len(configs)} distinct steering configs in one step, over the table capacity "
                               f"{self.max_configs} (max_num_seqs)")
        out: dict[str, int] = {}
        resident, touch = self._resident, self._resident.move_to_end
        for fp in configs:
            row = resident.get(fp)
            if row is not None:
                touch(fp)
                out[fp] = row
        if len(out) < len(configs):
            self.generation += 1
            for fp, resolved in configs.items():
                if fp in out:
                    continue
                if not self._free_rows:
                    victim = next(v for v in resident if v not in configs)
                    self._free_rows.append(resident.pop(victim))
                row = self._free_rows.pop()
                self._write_row(row, resolved)
                resident[fp] = row
                out[fp] = row
        active = general = 0
        for row in out.values():
            row_active, row_general = self._row_slots[row]
            active |= row_active
            general |= row_general
        slots = range(len(self.layers))
        self.layer_active = [bool(active >> slot & 1) for slot in slots]
        self.general_active = [bool(general >> slot & 1) for slot in slots]
        return out

    # -- tokens -> rows ----------------------------------------------------------------
    @staticmethod
    def decode_rows(prompt_lens: np.ndarray, req_rows: np.ndarray, req_modes: np.ndarray) -> np.ndarray:
        """Per request: its row for any token past its prompt, else 0. Every position rule
        is constant past the prompt (tests/test_tables.py checks each rule), so a decode
        step needs no per-token rule evaluation."""
        return np.where(steered_token_mask(prompt_lens, prompt_lens, req_modes), req_rows, 0)

    def set_token_rows(self, num_scheduled: np.ndarray, computed: np.ndarray, prompt_lens: np.ndarray,
                       req_rows: np.ndarray, req_modes: np.ndarray, decode_rows: np.ndarray | None = None) -> int:
        """Fill ``rows`` for one step. Arrays are per request in batch order (any integer
        dtype); ``decode_rows`` (from ``decode_rows()``) speeds up decode steps. Returns
        the number of steered tokens."""
        n = len(num_scheduled)
        total = int(num_scheduled.sum())
        if total > self.max_tokens:
            raise RuntimeError(f"step has {total} tokens, steering buffers hold {self.max_tokens}")
        if decode_rows is not None and total == n and n and num_scheduled.min() == 1 \
                and (computed >= prompt_lens).all():
            token_rows = decode_rows  # one token per request, each past its prompt
        else:
            num_scheduled = np.asarray(num_scheduled, dtype=np.int64)
            token_req = np.repeat(np.arange(n), num_scheduled)
            starts = np.cumsum(num_scheduled) - num_scheduled
            positions = computed.astype(np.int64)[token_req] + (np.arange(total) - starts[token_req])
            mask = steered_token_mask(positions, prompt_lens.astype(np.int64)[token_req], req_modes[token_req])
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
        self.general_active = [False] * len(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.tables, self.proj_dirs, self.proj_targets,
                                                           self.norm_flags, self.general, self.rows))
