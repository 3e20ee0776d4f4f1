"""Extraction capture inside vLLM workers (``vsteer extract --engine vllm``).

The driver (``vsteer.extract.vllm_engine``) runs every contrast text through ``vllm.LLM``
as a prefill (``max_tokens=1``), tagging each request with
``extra_args[CAPTURE_KEY] = {"job": id, "group": 0|1}`` (positive / negative side; the
protocol both sides share is ``vsteer.engine.capture_protocol``).
Each worker folds the residual stream at the job's layers into float64 sums per group:

* on the device, ``W @ stream`` per layer and step (one small float32 matmul, folded into
  float64 sums ``[layers, 2, hidden]`` before the next step), where ``W[group, t]`` is
  token t's weight under the position rule (``last``/``first``: 1 at that token of the
  text; ``mean``: 1/len over its tokens, so chunked prefill adds up exactly);
* on the host, from the per-token norms the op leaves in a buffer: the norm at the read
  tokens (``mean_activation_norm``) and the per-token stream norms without each text's
  first token (``residual_norms``), both per group.

Nothing per token leaves the worker; memory is O(layers x hidden) per group. The op is a
custom op like ``vsteer.serving.ops``: graph-safe (persistent buffers, dense per-token
per-step weights), so it works under torch.compile and CUDA graphs.

Prefix caching: tokens of a cached prefix are not recomputed. The driver gives ``first``
and ``mean`` requests their own cache salt (every token is computed); ``last`` requests
share one salt per job, so shared prefixes are computed once. Their stream norms are
completed exactly from per-chunk records this worker kept when the prefix was computed
(the same tokens at the same positions give the same states). A token a rule needs that
was neither computed nor recorded is reported as an error, never guessed.

Hooks exist only in engines started with ``VSTEER_CAPTURE=1`` (the driver sets it for the
engine it creates): serving engines carry no capture op at all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from vsteer.engine.capture_protocol import CAPTURE_KEY, GROUPS, RULES, pack, read_weights

from . import custom_ops
from .runners.base import StepBatch, steering_of
from .uploads import uploader_for

_STATE: "WorkerCapture | None" = None


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _active_slot(layer: int) -> int | None:
    """This layer's buffer slot when the coming forward captures it (always while a CUDA
    graph is captured: a replay must hold the update, which is a no-op when idle)."""
    state = _STATE
    if state is None:
        return None
    slot = state.slot_of.get(layer)
    if slot is None or not (state.layer_active[slot] or _capturing()):
        return None
    return slot


def _accumulate(stream: torch.Tensor, slot: int) -> None:
    """Two kernels per layer (few kernels matter more than their size on a busy CPU): the
    per-token norms and this step's float32 ``weights @ stream``, both into persistent
    buffers the host folds into float64 before the next forward (``WorkerCapture._harvest``)."""
    state = _STATE
    n = stream.shape[0]
    if n > state.weights.shape[1]:
        raise RuntimeError(f"vsteer capture: {n} tokens in one forward, buffers hold {state.weights.shape[1]}")
    torch.linalg.vector_norm(stream, dim=-1, out=state.norms[slot, :n])
    torch.mm(state.weights[:, :n], stream, out=state.partial[slot])


def _float32(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1]) if t.dtype == torch.float32 else t.reshape(-1, t.shape[-1]).float()


def capture_(hidden_states: torch.Tensor, layer: int) -> None:
    """The block's output is the residual stream itself (GPT-2 style)."""
    slot = _active_slot(layer)
    if slot is not None:
        _accumulate(_float32(hidden_states), slot)


def capture_residual_(hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    """The stream is ``hidden_states + residual`` (the next block's fused add-norm adds them;
    summed in float32, as vLLM's add-norm does)."""
    slot = _active_slot(layer)
    if slot is not None:
        h = hidden_states.reshape(-1, hidden_states.shape[-1])
        r = residual.reshape(h.shape)
        _accumulate(torch.add(h, r) if h.dtype == r.dtype == torch.float32 else h.float().add_(r), slot)


def _fake(hidden_states: torch.Tensor, layer: int) -> None:
    return None


def _fake_residual(hidden_states: torch.Tensor, residual: torch.Tensor, layer: int) -> None:
    return None


def register_capture_ops() -> None:
    """Idempotent. The ops read (never write) their arguments but are declared mutating
    them, so a compiler neither drops them nor moves them past the next block's in-place
    add-norm."""
    custom_ops.register("capture_", capture_, _fake, tensors=("hidden_states",), mutates=("hidden_states",))
    custom_ops.register("capture_residual_", capture_residual_, _fake_residual, tensors=("hidden_states", "residual"),
                        mutates=("hidden_states", "residual"))


def _make_hook(layer: int):
    def hook(module: nn.Module, args: Any, output: Any) -> Any:
        if isinstance(output, (tuple, list)):
            hidden, residual = output[0], (output[1] if len(output) > 1 else None)
            if isinstance(residual, torch.Tensor) and residual.shape == hidden.shape:
                torch.ops.vsteer.capture_residual_(hidden, residual, layer)
            else:
                torch.ops.vsteer.capture_(hidden, layer)
        else:
            torch.ops.vsteer.capture_(output, layer)
        return output
    return hook


@dataclass
class _Text:
    """One captured request (one text of one pair side)."""

    group: int
    n: int                     # prompt tokens
    cached: int                # tokens the prefix cache supplied when first seen
    done: int                  # positions < done are accounted for
    keys: list[int] | None = None


@dataclass
class _Job:
    job: str
    rule: str
    slots: list[int]
    chunk: int
    share_prefix: bool
    texts: dict[str, _Text] = field(default_factory=dict)
    norm_sum: np.ndarray = None        # [slots, groups]: norms at the read tokens (weighted like the vector)
    stream_sum: np.ndarray = None      # [slots, groups]: token norms, first token of each text left out
    stream_count: np.ndarray = None    # [groups]
    tokens: np.ndarray = None          # [groups]: tokens accounted for (computed or from records)
    records: dict[int, np.ndarray] = field(default_factory=dict)   # chunk key -> stream-norm sums [slots]
    pending: dict[tuple[str, int], list] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        k = len(self.slots)
        self.norm_sum, self.stream_sum = np.zeros((k, GROUPS)), np.zeros((k, GROUPS))
        self.stream_count, self.tokens = np.zeros(GROUPS, np.int64), np.zeros(GROUPS, np.int64)


def _chunk_keys(job: str, ids: list[int], chunk: int) -> list[int]:
    """A key per full chunk that names the whole prefix up to its end (like vLLM's block hashes)."""
    keys, prev = [], hash(job)
    for start in range(0, len(ids) - chunk + 1, chunk):
        prev = hash((prev, tuple(ids[start:start + chunk])))
        keys.append(prev)
    return keys


class WorkerCapture:
    """Capture buffers, hooks and the running job of one worker."""

    def __init__(self, runner: Any, blocks: dict[int, nn.Module]):
        global _STATE
        register_capture_ops()
        self.layers = sorted(blocks)
        self.slot_of = {layer: i for i, layer in enumerate(self.layers)}
        hidden, tokens, device = runner.model_config.get_hidden_size(), runner.max_num_tokens, runner.device
        self.device = torch.device(device)
        self.acc = torch.zeros(len(self.layers), GROUPS, hidden, dtype=torch.float64, device=self.device)
        self.partial = torch.zeros(len(self.layers), GROUPS, hidden, dtype=torch.float32, device=self.device)
        self.norms = torch.zeros(len(self.layers), tokens, dtype=torch.float32, device=self.device)
        self.weights = torch.zeros(GROUPS, tokens, dtype=torch.float32, device=self.device)
        self._weights_host = np.zeros((GROUPS, tokens), dtype=np.float32)  # a mirror (serving/uploads.py)
        self.upload = uploader_for(self.device)
        self.layer_active = [False] * len(self.layers)
        block_size = getattr(getattr(runner, "cache_config", None), "block_size", None) or 16
        self.chunk = math.gcd(16, int(block_size))
        self.job: _Job | None = None
        self._slots = torch.zeros(0, dtype=torch.int64, device=self.device)
        self._segments: list[tuple[int, int, int, _Text]] = []   # last step: (token offset, lo, hi, text)
        self._dirty = 0
        for layer, block in blocks.items():
            block.register_forward_hook(_make_hook(layer))
        _STATE = self

    # -- driver calls (collective_rpc) ----------------------------------------------------
    def begin(self, spec: dict[str, Any]) -> dict[str, Any]:
        rule = spec.get("position")
        if rule not in RULES:
            return {"error": f"unknown token position {rule!r}"}
        wanted = [int(x) for x in spec.get("layers") or ()]
        self.idle()
        self.acc.zero_()
        self.job = _Job(str(spec["job"]), rule, [self.slot_of[x] for x in wanted if x in self.slot_of],
                        self.chunk, bool(spec.get("share_prefix")))
        self._slots = torch.tensor(self.job.slots, dtype=torch.int64, device=self.device)
        return {"layers": [x for x in wanted if x in self.slot_of]}

    def collect(self, job: str) -> dict[str, Any]:
        current = self.job
        if current is None or current.job != job:
            return {"error": f"no capture job {job!r} on this worker"}
        self._harvest()
        for text in current.texts.values():
            self._add_cached(current, text)
        slots = current.slots
        out = {"layers": [self.layers[s] for s in slots],
               "sums": pack(self.acc[slots].cpu().numpy() if slots else np.zeros((0, GROUPS, 0))),
               "norm_sums": pack(current.norm_sum), "stream_sums": pack(current.stream_sum),
               "stream_counts": current.stream_count.tolist(), "tokens": current.tokens.tolist(),
               "texts": [sum(t.group == g for t in current.texts.values()) for g in range(GROUPS)],
               "cached_tokens": int(sum(t.cached for t in current.texts.values())),
               "errors": current.errors[:20]}
        self.job = None
        self.idle()
        self.acc.zero_()
        return out

    # -- per step (from WorkerSteering.step, right after _prepare_inputs) -----------------
    def step(self, batch: StepBatch, lookup: Any) -> None:
        """``lookup``: req_id -> the runner's request object (``sampling_params``,
        ``prompt_token_ids``)."""
        self._harvest()
        job = self.job
        if job is None:
            return self.idle()
        sched = np.asarray(batch.num_scheduled, dtype=np.int64)
        computed = batch.num_computed
        starts = np.cumsum(sched) - sched
        weights = self._weights_host
        weights[:, :self._dirty] = 0.0
        segments = []
        for i, req_id in enumerate(batch.req_ids):
            text = job.texts.get(req_id) or self._new_text(job, req_id, lookup(req_id) if lookup else None,
                                                           int(computed[i]))
            if text is None:
                continue
            first = int(computed[i])
            lo, hi = max(first, text.done), min(first + int(sched[i]), text.n)
            text.done = max(text.done, first + int(sched[i]))
            if lo >= hi:
                continue
            off = int(starts[i]) + lo - first
            weights[text.group, off:off + hi - lo] = read_weights(job.rule, np.arange(lo, hi), text.n)
            segments.append((off, lo, hi, text))
        upto, self._dirty = max(self._dirty, int(sched.sum())), int(sched.sum())
        self.upload(self.weights[:, :upto], weights[:, :upto])
        self._segments = segments
        active = {s for s in job.slots} if segments else set()
        self.layer_active = [slot in active for slot in range(len(self.layers))]

    def idle(self) -> None:
        """No capture in the coming forward (dummy/profile runs, no job): account for the
        last step first, then zero the per-token weights."""
        self._harvest()
        if self._dirty:
            self._weights_host[:, :self._dirty] = 0.0
            self.weights[:, :self._dirty].zero_()  # a device write, ordered after its readers
            self._dirty = 0
        self.layer_active = [False] * len(self.layers)

    # -- host accounting ----------------------------------------------------------------------
    def _new_text(self, job: _Job, req_id: str, request: Any, computed: int) -> _Text | None:
        params = getattr(request, "sampling_params", None)
        tag = (getattr(params, "extra_args", None) or {}).get(CAPTURE_KEY)
        if not isinstance(tag, dict) or tag.get("job") != job.job:
            return None
        ids = list(getattr(request, "prompt_token_ids", None) or ())
        text = _Text(group=int(tag.get("group", 0)) % GROUPS, n=len(ids), cached=computed, done=computed)
        if job.share_prefix:
            text.keys = _chunk_keys(job.job, ids, job.chunk)
        job.texts[req_id] = text
        return text

    def _harvest(self) -> None:
        """Fold the last step into the job: its ``weights @ stream`` into the float64 sums, its
        token norms into the host sums (the next forward overwrites both buffers, so this
        runs before it)."""
        segments, self._segments = self._segments, []
        job = self.job
        if not segments or job is None or not job.slots:
            return
        self.acc.index_add_(0, self._slots, self.partial.index_select(0, self._slots).double())
        end = max(off + hi - lo for off, lo, hi, _ in segments)
        norms = self.norms[job.slots, :end].double().cpu().numpy()
        for off, lo, hi, text in segments:
            seg = norms[:, off:off + hi - lo]
            pos = np.arange(lo, hi)
            job.norm_sum[:, text.group] += seg @ read_weights(job.rule, pos, text.n)
            keep = (pos >= 1) | (text.n == 1)
            job.stream_sum[:, text.group] += seg @ keep
            job.stream_count[text.group] += int(keep.sum())
            job.tokens[text.group] += hi - lo
            if text.keys is not None:
                self._record_chunks(job, text, pos, seg * keep)

    def _record_chunks(self, job: _Job, text: _Text, pos: np.ndarray, seg: np.ndarray) -> None:
        chunks = pos // job.chunk
        for c in np.unique(chunks):
            if c >= len(text.keys):
                continue  # the partial tail chunk is never shared
            mask = chunks == c
            entry = job.pending.setdefault((id(text), int(c)), [np.zeros(seg.shape[0]), 0])
            entry[0] += seg[:, mask].sum(axis=1)
            entry[1] += int(mask.sum())
            if entry[1] >= job.chunk:
                job.records[text.keys[c]] = job.pending.pop((id(text), int(c)))[0]

    def _add_cached(self, job: _Job, text: _Text) -> None:
        """Account for the tokens a prefix-cache hit supplied (exactly, from records)."""
        k = text.cached
        if k == 0:
            return
        if job.rule != "last" or text.keys is None:
            job.errors.append(f"{job.rule}: {k} token(s) of a text came from the prefix cache; every token must be "
                              "computed for this rule (give each request its own cache salt)")
            return
        if k % job.chunk:
            job.errors.append(f"a prefix-cache hit of {k} tokens is not a multiple of {job.chunk}")
            return
        for c in range(k // job.chunk):
            record = job.records.get(text.keys[c])
            if record is None:
                job.errors.append("a cached prefix was not computed by this job (its cache salt is shared?)")
                return
            job.stream_sum[:, text.group] += record
        job.stream_count[text.group] += k - 1  # position 0 is never in the stream norms (k < n)
        job.tokens[text.group] += k


def capture_state(worker: Any) -> WorkerCapture | None:
    return getattr(steering_of(worker.model_runner), "capture", None)


_NOT_ENABLED = ("this vLLM engine was started without VSTEER_CAPTURE=1, so its workers have no capture hooks "
                "(create it with vsteer.extract.vllm_engine.capture_llm)")


def vsteer_capture_begin(self, spec: dict[str, Any]) -> dict[str, Any]:
    """``Worker.vsteer_capture_begin`` (``collective_rpc``): start a job, resetting the sums."""
    state = capture_state(self)
    return state.begin(spec) if state is not None else {"error": _NOT_ENABLED}


def vsteer_capture_collect(self, job: str) -> dict[str, Any]:
    """``Worker.vsteer_capture_collect`` (``collective_rpc``): the job's sums; ends the job."""
    state = capture_state(self)
    return state.collect(job) if state is not None else {"error": _NOT_ENABLED}
