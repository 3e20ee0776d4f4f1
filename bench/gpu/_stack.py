"""Pieces of bench/gpu/check_op.py: Llama-shaped stacks whose layers call the steering op
through ``vsteer.serving.ops.hook_output``, steering configs built as the resolver builds
them (``vsteer.engine.operators``), and per-step table fills. Imported after check_op.py
has put the checkout's ``vsteer`` modules on the path (torch and transformers only)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vsteer.engine.operators import LayerPlan, orthonormalize
from vsteer.serving import ops
from vsteer.serving.prepared import PreparedSteering

CONFIG_NAMES = ["add", "add2", "ablate", "clamp", "clamp_neg", "preserve", "two_ablations", "composed",
                "add3", "clamp2"]


@dataclass(frozen=True)
class Config:
    """What ``SteeringTables.assign_rows`` needs of a ``ResolvedSteering``: ``plans()``."""

    name: str
    by_layer: dict

    def plans(self) -> dict[int, LayerPlan]:
        return self.by_layer

    def prepared(self, tables) -> PreparedSteering:
        """What the engine core ships to the workers for this config."""
        hidden = tables.hidden_size
        return PreparedSteering.from_plans(self.name, "all", self.by_layer, hidden=hidden, dtype=tables.dtype,
                                           max_projections=tables.max_projections)


def _plan(kind: str, vecs: list[torch.Tensor], scale: float) -> LayerPlan:
    unit = [v / v.norm() for v in vecs]
    if kind in ("add", "add2", "add3"):
        return LayerPlan(add=vecs[0] * (0.5 if kind != "add2" else -0.7))
    if kind == "ablate":
        return LayerPlan(directions=torch.stack(orthonormalize(vecs[:1])), targets=torch.zeros(1))
    if kind in ("clamp", "clamp_neg", "clamp2"):
        target = {"clamp": 2.0, "clamp_neg": -1.5, "clamp2": 0.5}[kind] * scale
        return LayerPlan(directions=unit[0][None], targets=torch.tensor([target]))
    if kind == "preserve":
        return LayerPlan(add=vecs[0] * 0.8, preserve_norm=True)
    if kind == "two_ablations":
        return LayerPlan(directions=torch.stack(orthonormalize(vecs[:2])), targets=torch.zeros(2))
    if kind == "composed":  # ablate two, clamp one, add, rescale: every part at once
        dirs = orthonormalize(vecs[:2]) + [unit[2]]
        return LayerPlan(add=vecs[3] * 0.6, directions=torch.stack(dirs), targets=torch.tensor([0.0, 0.0, scale]),
                         preserve_norm=True)
    raise ValueError(kind)


def make_configs(layers: list[int], hidden: int, g: torch.Generator) -> dict[str, Config]:
    """Every operator, on every layer (clamp2 and add3 only on the middle one)."""
    scale = hidden ** 0.5
    out = {}
    for name in CONFIG_NAMES:
        use = layers[1:2] if name in ("add3", "clamp2") else layers
        out[name] = Config(name, {layer: _plan(name, [torch.randn(hidden, generator=g) for _ in range(4)], scale)
                                  for layer in use})
    return out


def random_step(tables, configs: dict[str, Config], n: int, g: torch.Generator):
    """Fill the tables for one step after another; yields (step name, row -> config name).
    Requests of random lengths, configs, position rules and progress; rows get reordered,
    evicted (more configs than table rows) and rewritten between steps."""
    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=g)))
    first8 = CONFIG_NAMES[:8]
    steps = [("unsteered", None), ("add_only", ["add", "add2"]), ("mixed", first8), ("composed_only", ["composed"]),
             ("mixed_reordered", first8[::-1]), ("evict_and_rewrite", ["add3", "clamp2", "composed", "ablate"]),
             ("mixed_after_evict", first8), ("cleared", None)]
    for name, pool in steps:
        if pool is None:
            tables.clear()
            yield name, {}
            continue
        k = int(min(n, 2 * len(pool) + 1))
        cuts = np.sort(rng.choice(np.arange(1, n), size=k - 1, replace=False)) if k > 1 else np.array([], int)
        lengths = np.diff(np.concatenate([[0], cuts, [n]])).astype(np.int64)
        picks = [pool[i % len(pool)] if i % 5 != 4 else None for i in range(k)]  # every 5th request unsteered
        rows = tables.assign_rows({c: configs[c].prepared(tables) for c in dict.fromkeys(p for p in picks if p)})
        req_rows = np.array([rows[p] if p else 0 for p in picks], dtype=np.int64)
        modes = rng.integers(0, 5, size=k).astype(np.int64)
        computed = rng.integers(0, 8, size=k).astype(np.int64)
        prompt_lens = rng.integers(1, 14, size=k).astype(np.int64)
        tables.set_token_rows(lengths, computed, prompt_lens, req_rows, modes)
        yield name, {row: c for c, row in rows.items()}


def token_plans(rows: list[int], row_config: dict[int, str], configs: dict[str, Config], layer: int):
    return [None if r == 0 else configs[row_config[r]].by_layer.get(layer) for r in rows]


def _stream(out) -> torch.Tensor:
    if isinstance(out, (tuple, list)):
        return out[0].reshape(-1, out[0].shape[-1]).float() + out[1].reshape(-1, out[1].shape[-1]).float()
    return out.reshape(-1, out.shape[-1]).float().clone()


class _Hooked:
    """Registers vLLM's worker hook body on each layer; with ``record`` set, keeps each
    layer's stream before and after the op."""

    record: dict | None = None

    def _hook_layers(self, layers) -> None:
        for i, layer in enumerate(layers):
            layer.register_forward_hook(self._hook(i))

    def _hook(self, index: int):
        def hook(module, args, out):
            pre = _stream(out) if self.record is not None else None
            ops.hook_output(out, index)  # what vsteer.serving.worker's hooks run
            if pre is not None:
                self.record[index] = (pre, _stream(out))
            return out
        return hook


class VllmBlock(nn.Module):
    """A Llama decoder block in vLLM's convention: ``(hidden_states, residual)`` in and
    out, the residual add fused into the first norm (so the stream is their sum)."""

    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(hidden, 3 * hidden, bias=False)
        self.o = nn.Linear(hidden, hidden, bias=False)
        self.gate_up = nn.Linear(hidden, 4 * hidden, bias=False)
        self.down = nn.Linear(2 * hidden, hidden, bias=False)
        self.norm1, self.norm2 = nn.RMSNorm(hidden, eps=1e-5), nn.RMSNorm(hidden, eps=1e-5)

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None):
        residual = x if residual is None else x + residual
        n, hidden = residual.shape
        q, k, v = self.qkv(self.norm1(residual)).view(n, 3, self.heads, hidden // self.heads).unbind(1)
        a = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1), is_causal=True)
        residual = self.o(a.transpose(0, 1).reshape(n, hidden)) + residual
        gate, up = self.gate_up(self.norm2(residual)).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up), residual


class VllmStack(_Hooked):
    """Layers return (hidden_states, residual): the op is ``steer_residual_``."""

    def __init__(self, hidden: int, num_layers: int, dtype, device, seed: int):
        torch.manual_seed(seed)
        self.blocks = nn.ModuleList(VllmBlock(hidden, max(1, hidden // 64)) for _ in range(num_layers))
        self.blocks.to(device=device, dtype=dtype).eval()
        self._hook_layers(self.blocks)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        h, residual = x, None
        for block in self.blocks:
            h, residual = block(h, residual)
        return h + residual


def _llama_config(hidden: int, num_layers: int = 1):
    from transformers import LlamaConfig

    shapes = {4096: (14336, 32, 8), 8192: (28672, 64, 8)}  # Llama-3 8B / 70B
    inter, heads, kv = shapes.get(hidden, (2 * hidden, max(1, hidden // 64), 1))
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=kv,
                      head_dim=hidden // heads, num_hidden_layers=num_layers, max_position_embeddings=16384,
                      vocab_size=128)
    cfg._attn_implementation = "sdpa"
    return cfg


class HfStack(_Hooked):
    """transformers ``LlamaDecoderLayer``s: layers return the stream, the op is ``steer_``."""

    def __init__(self, hidden: int, num_layers: int, dtype, device, seed: int):
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

        torch.manual_seed(seed)
        cfg = _llama_config(hidden, num_layers)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(num_layers))
        self.layers.to(device=device, dtype=dtype).eval()
        self.rotary = LlamaRotaryEmbedding(cfg).to(device)
        self._pe: dict[int, tuple] = {}
        self._hook_layers(self.layers)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        if n not in self._pe:  # computed outside any CUDA-graph capture (the warm-up runs first)
            pos = torch.arange(n, device=x.device)[None]
            self._pe[n] = (pos, self.rotary(x[None], pos))
        pos, pe = self._pe[n]
        h = x[None]
        for layer in self.layers:
            h = layer(h, position_embeddings=pe, position_ids=pos)
        return h[0]


def llama_layer(hidden: int, n: int, dtype, device):
    """One transformers LlamaDecoderLayer and a closure running it on one causal sequence
    of ``n`` tokens (the timing denominator)."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    cfg = _llama_config(hidden)
    with torch.device(device):
        layer = LlamaDecoderLayer(cfg, 0).to(dtype).eval()
        rotary = LlamaRotaryEmbedding(cfg)
    x = torch.randn(1, n, hidden, device=device, dtype=dtype)
    pos = torch.arange(n, device=device)[None]
    pe = rotary(x, pos)
    return layer, lambda: layer(x, position_embeddings=pe, position_ids=pos)


def previous_op(hidden_states: torch.Tensor, layer: int) -> None:
    """The op before issue 12 (``add_steering_`` at ea9edf8, called on ``output[0]``): the
    timing baseline. Same tables, same eager skip."""
    tables = ops._TABLES
    slot = tables.slot_of.get(layer) if tables is not None else None
    if slot is None or (not tables.layer_active[slot] and not ops._capturing()):
        return
    flat = hidden_states.view(-1, hidden_states.shape[-1])
    flat.add_(tables.tables[slot].index_select(0, tables.rows[: flat.shape[0]]))


def fill_tables(tables, case: str, n: int, g: torch.Generator) -> None:
    """A serving-like step for the timings: up to 256 requests over 64 configs, all
    add-only ("add_only") or half of them projecting ("mixed"), or nothing ("none")."""
    tables.clear()
    if case == "none":
        return
    hidden, scale = tables.hidden_size, tables.hidden_size ** 0.5
    kinds = ["add"] * 64 if case == "add_only" else ["add", "composed_k2"] * 32
    configs = {}
    for i, kind in enumerate(kinds):
        vecs = [torch.randn(hidden, generator=g) for _ in range(3)]
        if kind == "add":
            plan = LayerPlan(add=vecs[0] * 0.5)
        else:  # ablate + clamp + add + norm: two projection slots
            plan = LayerPlan(add=vecs[2] * 0.5, directions=torch.stack([vecs[0] / vecs[0].norm(),
                                                                        vecs[1] / vecs[1].norm()]),
                             targets=torch.tensor([0.0, scale]), preserve_norm=True)
        configs[f"{case}-{i}"] = Config(f"{case}-{i}", {0: plan})
    rows = tables.assign_rows({name: config.prepared(tables) for name, config in configs.items()})
    k = min(n, 256)
    lengths = np.full(k, n // k, dtype=np.int64)
    lengths[: n % k] += 1
    names = list(configs)
    req_rows = np.array([rows[names[i % len(names)]] for i in range(k)], dtype=np.int64)
    tables.set_token_rows(lengths, np.zeros(k, np.int64), np.full(k, 1 << 20, np.int64), req_rows,
                          np.zeros(k, np.int64))
