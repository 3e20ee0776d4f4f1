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
decode steps reuse per-request rows (``decode_rows``). A config is written from its
``PreparedSteering`` (built off the step, ``vsteer.serving.prepared``): the new configs of
a step are written together, a few indexed copies per step whatever their number.
bench/step_overhead.py times it.

Host-to-device traffic follows ``vsteer.serving.uploads``: no persistent pinned buffer,
host mirrors written freely, device state cleared by device writes. That keeps every step
correct under async scheduling and between the dummy runs of idle data-parallel ranks.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping

import numpy as np
import torch

from vsteer.engine.positions import steered_mask_by_code

from .prepared import PreparedSteering
from .uploads import Uploader, upload_sync, uploader_for


def _mask(slots: np.ndarray) -> int:
    """Slots as a bit mask."""
    out = 0
    for slot in slots.tolist():
        out |= 1 << slot
    return out


def steered_token_mask(positions: np.ndarray, prompt_lens: np.ndarray, modes: np.ndarray) -> np.ndarray:
    """Which tokens their request's position rule names (``vsteer.engine.positions``)."""
    return steered_mask_by_code(positions, prompt_lens, modes)


class SteeringTables:
    """Persistent steering buffers for one worker, and the per-step update of them."""

    def __init__(self, layers: list[int], hidden_size: int, *, max_configs: int, max_tokens: int,
                 dtype: torch.dtype, device: torch.device | str, max_projections: int = 2,
                 uploader: Uploader | None = None):
        self.layers = list(layers)
        self.slot_of: dict[int, int] = {layer: slot for slot, layer in enumerate(self.layers)}
        self._slot_lut = np.full(max(self.layers, default=0) + 2, -1, dtype=np.int64)  # layer -> slot, or -1
        self._slot_lut[self.layers] = np.arange(len(self.layers))
        self.hidden_size, self.max_configs, self.max_tokens = hidden_size, max_configs, max_tokens
        self.max_projections = max_projections
        self.dtype, self.device = dtype, torch.device(device)
        self.upload = uploader or uploader_for(self.device)
        slots, rows = len(self.layers), max_configs + 1
        self.tables = torch.zeros(slots, rows, hidden_size, dtype=dtype, device=self.device)
        self.proj_dirs = torch.zeros(slots, rows, max_projections, hidden_size, dtype=dtype, device=self.device)
        self.proj_targets = torch.zeros(slots, rows, max_projections, dtype=torch.float32, device=self.device)
        self.norm_flags = torch.zeros(slots, rows, dtype=torch.bool, device=self.device)
        self.general = torch.zeros(slots, rows, dtype=torch.bool, device=self.device)
        # (slot, row) flattened: one index per entry, for indexed copies and fills
        self._rows_per_slot = rows
        self._flat = tuple(buf.view(slots * rows, *buf.shape[2:]) for buf in (
            self.tables, self.proj_dirs, self.proj_targets, self.norm_flags, self.general))
        if self.device.type == "cpu":  # fault the pages in now, not in the first steps that write rows
            for buf in (self.tables, self.proj_dirs):
                buf.zero_()
        self.rows = torch.zeros(max_tokens, dtype=torch.int64, device=self.device)
        self._rows_host = np.zeros(max_tokens, dtype=np.int64)  # a mirror, never read by a copy
        # Read by the op's eager fast paths; ignored while a CUDA graph is being captured.
        self.layer_active: list[bool] = [False] * slots
        self.general_active: list[bool] = [False] * slots
        self._dirty_tokens = 0
        self._resident: OrderedDict[str, int] = OrderedDict()   # fingerprint -> row, LRU order
        self._free_rows = list(range(max_configs, 0, -1))
        self._row_slots: dict[int, tuple[np.ndarray, bool]] = {}  # row -> (the slots it wrote, projections?)
        self._scratches: dict[str, torch.Tensor] = {}
        self._row_masks: dict[int, tuple[int, int]] = {}  # row -> (active, general) slots as bit masks
        self.last_written = 0
        """Configs the last ``assign_rows`` wrote (new to the tables)."""
        self.generation = 0
        """Bumped whenever a row is written or evicted: a caller's row numbers from an
        earlier ``assign_rows`` stay valid while it is unchanged (the worker's batch plan)."""

    # -- configs -> table rows -------------------------------------------------------
    def _slots_of(self, prepared: PreparedSteering) -> tuple[np.ndarray | None, np.ndarray]:
        """(indices into ``prepared.layers`` or None for all of them, table slots) of the
        layers this worker hooks (layers of another pipeline stage are steered there)."""
        slots = self._slot_lut[np.minimum(prepared.layers, len(self._slot_lut) - 1)]
        keep = slots >= 0
        if keep.all():
            return None, slots
        return np.flatnonzero(keep), slots[keep]

    def _write_rows(self, new: list[tuple[int, PreparedSteering]]) -> None:
        """Write several configs at once: clear what the rows' previous occupants wrote, then
        copy the new data, one indexed copy per buffer (the projection buffers only for
        configs that project, the flags only where set)."""
        stale = [(row, self._row_slots.pop(row)) for row, _ in new if row in self._row_slots]
        if stale:
            self._zero(stale)
        parts: list[tuple[np.ndarray | None, np.ndarray, PreparedSteering]] = []
        for row, prepared in new:
            if prepared.max_projections != self.max_projections:
                raise RuntimeError(f"config {prepared.fingerprint} was prepared for {prepared.max_projections} "
                                   f"projection slots, the tables hold {self.max_projections} (VSTEER_MAX_PROJECTIONS "
                                   "must be the same in every vLLM process)")
            idx, slots = self._slots_of(prepared)
            general = prepared.general if idx is None else prepared.general[idx]
            self._row_slots[row] = (slots, prepared.projects)
            self._row_masks[row] = (_mask(slots), _mask(slots[general]))
            if len(slots):
                parts.append((idx, slots * self._rows_per_slot + row, prepared))  # flat (slot, row) entries
        if not parts:
            return
        self._put(self._flat[0], parts, "add")
        projecting = [p for p in parts if p[2].projects]
        if projecting:
            self._put(self._flat[1], projecting, "directions")
            self._put(self._flat[2], projecting, "targets")
        for buf, field in ((self._flat[3], "preserve_norm"), (self._flat[4], "general")):
            picked = [flat[f] for idx, flat, p in parts
                      for f in [getattr(p, field) if idx is None else getattr(p, field)[idx]] if f.any()]
            if picked:
                buf.index_fill_(0, self._index(np.concatenate(picked)), True)

    def _zero(self, stale: list[tuple[int, tuple[np.ndarray, bool]]]) -> None:
        """Zero the entries earlier occupants of these rows wrote."""
        flat = np.concatenate([slots * self._rows_per_slot + row for row, (slots, _) in stale])
        if not len(flat):
            return
        index = self._index(flat)
        projected = any(p for _, (_, p) in stale)
        for buf in (self._flat if projected else (self._flat[0], self._flat[3], self._flat[4])):
            buf.index_fill_(0, index, 0)

    def _put(self, flat_buf: torch.Tensor, parts: list, field: str) -> None:
        """One indexed copy of ``field`` of every part (gathered into host scratch that is
        reused, so no step pays fresh page faults)."""
        chunks = [getattr(p, field) if idx is None else getattr(p, field).index_select(0, torch.from_numpy(idx))
                  for idx, _, p in parts]
        data = chunks[0].to(flat_buf.dtype) if len(chunks) == 1 else None
        if data is None:
            data = self._scratch(field, (sum(c.shape[0] for c in chunks), *flat_buf.shape[1:]), flat_buf.dtype)
            torch.cat([c.to(flat_buf.dtype) for c in chunks], out=data)
        flat_buf.index_copy_(0, self._index(np.concatenate([p[1] for p in parts])), self._on_device(data))

    def _scratch(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        held = self._scratches.get(name)
        if held is None or held.shape[0] < shape[0] or held.dtype != dtype:
            held = torch.zeros((max(shape[0], 64), *shape[1:]), dtype=dtype)
            self._scratches[name] = held
        return held[: shape[0]]

    def _index(self, values: np.ndarray) -> torch.Tensor:
        return self._on_device(torch.from_numpy(values))

    def _on_device(self, host: torch.Tensor) -> torch.Tensor:
        if self.upload is upload_sync:  # the device is the host
            return host
        out = torch.empty(host.shape, dtype=host.dtype, device=self.device)
        self.upload(out, host)
        return out

    def assign_rows(self, configs: Mapping[str, PreparedSteering]) -> dict[str, int]:
        """Make every config of this step resident in a table row; write only new ones."""
        if len(configs) > self.max_configs:
            raise RuntimeError(f"{len(configs)} distinct steering configs in one step, over the table capacity "
                               f"{self.max_configs} (VSTEER_MAX_CONFIGS / max_num_seqs)")
        out: dict[str, int] = {}
        resident, touch = self._resident, self._resident.move_to_end
        self.last_written = 0
        for fp in configs:
            row = resident.get(fp)
            if row is not None:
                touch(fp)
                out[fp] = row
        if len(out) < len(configs):
            self.generation += 1
            new: list[tuple[int, PreparedSteering]] = []
            for fp, prepared in configs.items():
                if fp in out:
                    continue
                if not self._free_rows:
                    victim = next(v for v in resident if v not in configs)
                    self._free_rows.append(resident.pop(victim))
                row = self._free_rows.pop()
                new.append((row, prepared))
                resident[fp] = row
                out[fp] = row
            self._write_rows(new)
            self.last_written = len(new)
        active = general = 0
        for row in out.values():
            row_active, row_general = self._row_masks[row]
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
        upto = max(total, self._dirty_tokens)
        if self._dirty_tokens > total:
            host[total:self._dirty_tokens] = 0  # padding tokens of this step add row 0
        self.upload(self.rows[:upto], host[:upto])
        self._dirty_tokens = total
        return int(np.count_nonzero(token_rows))

    def clear(self) -> None:
        """No steering this step (or a dummy/profile run): zero rows, mark layers idle.
        A device write, ordered after whatever still reads the rows."""
        if self._dirty_tokens:
            self._rows_host[: self._dirty_tokens] = 0
            self.rows[: self._dirty_tokens].zero_()
            self._dirty_tokens = 0
        self.layer_active = [False] * len(self.layers)
        self.general_active = [False] * len(self.layers)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.tables, self.proj_dirs, self.proj_targets,
                                                           self.norm_flags, self.general, self.rows))
