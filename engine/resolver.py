"""``SteeringResolver``: a ``SteeringSpec`` checked against one model and a registry,
turned into what the injectors apply (``ResolvedSteering``).

Used by the API server once per request (before anything is queued), by every vLLM
worker (with the content versions the server pinned), and by the HF injectors.

What a resolution holds is exactly what will be applied, and its ``fingerprint`` hashes
exactly that: per vector the operator, the norm mode and, per used layer, the layer
number, the hash of that layer's float32 bytes and the absolute coefficient. Two specs
that steer differently never share a fingerprint (it names the prefix-cache namespace
and the worker table row); two that steer identically do, however they were written.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .cache import ByteLRU, tensor_bytes
from .errors import RegistryBusyError, SteeringError, UnknownVectorError, VectorFileError, VersionGoneError
from .operators import OPERATORS, LayerPlan, orthonormalize
from .positions import RULES
from .registry import VectorRegistry
from .settings import settings
from .spec import SteeringSpec, VectorRef
from .vectors import SteeringVectorSet

_OP_ORDER = {"ablate": 0, "clamp": 1, "add": 2}


def residual_norms_of(vs: SteeringVectorSet) -> dict[int, float]:
    """The unit of relative strengths: ``residual_norms`` (sets written before it existed:
    the extraction's ``mean_activation_norm``, recorded at the read token positions)."""
    if vs.residual_norms:
        return vs.residual_norms
    raw = (vs.provenance or {}).get("mean_activation_norm") or {}
    try:
        return {int(k): float(v) for k, v in raw.items() if v and math.isfinite(float(v)) and float(v) > 0}
    except (AttributeError, TypeError, ValueError):
        return {}


def _norm(vec: torch.Tensor) -> float:
    """|v| in float64: a float32 vector's norm can overflow float32 (elements near 1e37),
    which would turn a direction into zeros and a relative strength into 0."""
    return float(vec.double().norm())


def _layer_hash(layer: int, vec: torch.Tensor) -> str:
    h = hashlib.sha256(f"layer.{layer}:{vec.numel()}:".encode())
    h.update(vec.detach().to("cpu", torch.float32).contiguous().numpy().astype("<f4").tobytes())
    return h.hexdigest()


@dataclass(frozen=True)
class AppliedVector:
    """One vector of a request as it will be applied."""

    name: str
    inline: bool
    sha256: str
    op: str
    unit: str
    norm: str
    strength: float
    """As requested (in ``unit``)."""
    layers: tuple[int, ...]
    vectors: Mapping[int, torch.Tensor]
    coefficients: Mapping[int, float]
    """Per layer: the multiplier of the vector (add), the pinned projection (clamp), 0 (ablate)."""
    layer_hashes: Mapping[int, str]
    order: int = 0
    """Position in the request (clamps apply in request order)."""

    def canonical(self) -> dict[str, Any]:
        return {"op": self.op, "norm": self.norm,
                "layers": [[layer, self.layer_hashes[layer], repr(float(self.coefficients[layer]))]
                           for layer in self.layers]}

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"name": self.name, "strength": self.strength, "layers": list(self.layers),
                               "sha256": self.sha256, "inline": self.inline, "op": self.op}
        if self.unit != "raw" or self.op == "clamp":
            key = "target" if self.op == "clamp" else "absolute_strength"
            out[key] = {str(layer): round(float(c), 6) for layer, c in self.coefficients.items()}
            out["unit"] = self.unit
        if self.norm != "keep":
            out["norm"] = self.norm
        return out

    def sort_key(self) -> tuple:
        if self.op == "clamp":
            return (_OP_ORDER["clamp"], self.order)
        return (_OP_ORDER[self.op], self.name, self.sha256, self.layers, self.strength, self.unit, self.norm)


@dataclass(frozen=True)
class ResolvedSteering:
    """A spec checked against the model. ``plans()`` gives what each layer does."""

    positions: str
    fingerprint: str
    entries: tuple[AppliedVector, ...]
    versions: dict[str, str] = field(default_factory=dict)
    """Registry name -> content sha256 it resolved to: pass to ``resolve(..., versions=)``
    elsewhere (the vLLM workers) to apply exactly this content even if the set changes."""

    @property
    def layers(self) -> list[int]:
        return sorted({layer for e in self.entries for layer in e.layers})

    @property
    def applied(self) -> list[dict[str, Any]]:
        return [e.describe() for e in self.entries]

    @property
    def is_add_only(self) -> bool:
        return all(e.op == "add" and e.norm == "keep" for e in self.entries)

    def describe(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "positions": self.positions, "vectors": self.applied}

    @property
    def inline_bytes(self) -> int:
        return sum(tensor_bytes(*e.vectors.values()) for e in self.entries if e.inline)

    def plans(self) -> dict[int, LayerPlan]:
        """Layer -> what this request does there (computed on demand, not kept: the vLLM
        tables hold the result; the HF injector computes it once when attached)."""
        out: dict[int, LayerPlan] = {}
        for layer in self.layers:
            here = [e for e in self.entries if layer in e.vectors]
            ablate = orthonormalize([e.vectors[layer] for e in here if e.op == "ablate"])
            clamps = [e for e in here if e.op == "clamp"]
            dirs = ablate + [(e.vectors[layer].double() / _norm(e.vectors[layer])).float() for e in clamps]
            targets = [0.0] * len(ablate) + [float(e.coefficients[layer]) for e in clamps]
            add = None
            for e in here:
                if e.op == "add":
                    contrib = e.vectors[layer] * e.coefficients[layer]
                    add = contrib if add is None else add + contrib
            out[layer] = LayerPlan(
                add=add,
                directions=torch.stack(dirs) if dirs else None,
                targets=torch.tensor(targets, dtype=torch.float32) if dirs else None,
                preserve_norm=any(e.op == "add" and e.norm == "preserve" for e in here))
        return out

    @property
    def layer_vectors(self) -> dict[int, torch.Tensor]:
        """Layer -> the summed added vector (the ``add`` part of each plan)."""
        return {layer: p.add for layer, p in self.plans().items() if p.add is not None}


def decode_inline(b64: str, hidden_size: int, where: str) -> torch.Tensor:
    try:
        raw = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise SteeringError("inline data is not valid base64", field=where, reason="bad_inline_data") from None
    if len(raw) != 4 * hidden_size:
        raise SteeringError(f"inline vector has {len(raw) / 4:g} floats, the model's hidden size is {hidden_size}",
                            field=where, reason="wrong_hidden_size")
    t = torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()
    if not torch.isfinite(t).all():
        raise SteeringError("inline vector contains NaN or infinite values", field=where, reason="non_finite_vector")
    return t


def encode_inline(vector: torch.Tensor) -> str:
    """base64 of a float32 little-endian vector, for ``VectorRef.data``."""
    return base64.b64encode(vector.detach().to("cpu", torch.float32).numpy().astype("<f4").tobytes()).decode()


class SteeringResolver:
    """Turns specs into ``ResolvedSteering`` for one model.

    Results are cached by (canonical spec, content versions), bounded by bytes
    (``VSTEER_CACHE_BYTES``): a repeated request (the common case) is neither re-decoded
    nor re-summed. ``steerable`` restricts the layers requests may name (``VSTEER_LAYERS``:
    the vLLM workers hook only those). ``dtype`` is the model's: results that overflow in
    it are refused."""

    def __init__(self, registry: VectorRegistry | None, *, hidden_size: int, num_layers: int,
                 model_id: str | None = None, steerable: set[int] | None = None,
                 dtype: torch.dtype = torch.float32):
        self.registry, self.hidden_size, self.num_layers = registry, hidden_size, num_layers
        self.model_id, self.steerable, self.dtype = model_id, steerable, dtype
        self._cache: ByteLRU[ResolvedSteering] = ByteLRU(settings().cache_bytes, lambda r: r.inline_bytes + 256)
        self._lock = threading.Lock()

    # -- the entry point ------------------------------------------------------------------
    def resolve(self, spec: SteeringSpec | dict[str, Any] | None, *,
                versions: dict[str, str] | None = None) -> ResolvedSteering | None:
        """None for no steering (absent, null or no vectors); raises ``SteeringError``.

        ``versions`` pins registry names to content hashes (from another resolver's
        ``ResolvedSteering.versions``); a pinned version that is gone raises
        ``SteeringError`` with reason ``vector_version_gone``."""
        spec = SteeringSpec.parse(spec)
        if spec is None or spec.is_empty:
            return None
        self._check_inline_budget(spec)
        sets = self._registry_sets(spec, versions or {})
        key = hashlib.sha256(json.dumps({"spec": spec.to_dict(), "versions": {n: s for n, (_, s) in sets.items()}},
                                        sort_keys=True).encode()).hexdigest()
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        entries = [self._entry(i, ref, sets.get(ref.name)) for i, ref in enumerate(spec.vectors)]
        self._check_layers(entries)
        entries.sort(key=AppliedVector.sort_key)
        positions = spec.positions or self._recommended_positions(spec, sets)
        canon = json.dumps({"positions": positions, "vectors": [e.canonical() for e in entries]}, sort_keys=True)
        resolved = ResolvedSteering(positions, hashlib.sha256(canon.encode()).hexdigest()[:32], tuple(entries),
                                    {e.name: e.sha256 for e in entries if not e.inline})
        self._check_finite(resolved)
        return self._cache.put(key, resolved)

    # -- registry sets ------------------------------------------------------------------------
    def _registry_sets(self, spec: SteeringSpec,
                       versions: dict[str, str]) -> dict[str, tuple[SteeringVectorSet, str]]:
        out: dict[str, tuple[SteeringVectorSet, str]] = {}
        for i, ref in enumerate(spec.vectors):
            if ref.data is None and ref.name not in out:
                out[ref.name] = self._from_registry(ref.name, f"steering.vectors[{i}].name", versions.get(ref.name))
        return out

    def _from_registry(self, name: str, where: str, pinned: str | None) -> tuple[SteeringVectorSet, str]:
        if self.registry is None:
            raise SteeringError(f"no vector directory is configured, so {name!r} cannot be resolved "
                                "(start with --vectors DIR or VSTEER_VECTORS_DIR)", field=where, reason="no_registry")
        try:
            return self.registry.load_with_hash(name, expect_hidden_size=self.hidden_size, sha256=pinned)
        except UnknownVectorError as e:
            raise SteeringError(str(e), field=where, reason="unknown_vector") from None
        except VersionGoneError as e:
            raise SteeringError(self._clean(e), field=where, reason="vector_version_gone") from None
        except RegistryBusyError as e:  # a writer elsewhere holds the lock: the client may retry (503)
            raise SteeringError(self._clean(e), field=where, reason="registry_busy") from None
        except VectorFileError as e:
            reason = "wrong_hidden_size" if "hidden size" in str(e) else "bad_vector_file"
            raise SteeringError(self._clean(e), field=where, reason=reason) from None
        except ValueError as e:
            raise SteeringError(self._clean(e), field=where, reason="invalid_name") from None

    def _clean(self, err: Exception) -> str:
        """Error text for clients: no server paths."""
        text = str(err)
        if self.registry is not None:
            text = text.replace(str(self.registry.root), "<vectors>")
        return text

    @staticmethod
    def _recommended_positions(spec: SteeringSpec, sets: dict[str, tuple[SteeringVectorSet, str]]) -> str:
        """Positions the vectors' recorded recipes agree on, else ``all``."""
        found = {(sets[r.name][0].recommended or {}).get("positions") for r in spec.vectors
                 if r.data is None and r.op == "add"}
        found.discard(None)
        return found.pop() if len(found) == 1 and found <= set(RULES) else "all"

    # -- one vector -------------------------------------------------------------------------
    def _check_inline_budget(self, spec: SteeringSpec) -> None:
        total = sum(len(s) * 3 // 4 for ref in spec.vectors if ref.data for s in ref.data.values())
        limit = settings().max_request_inline_bytes
        if total > limit:
            raise SteeringError(f"inline vectors total {total} bytes, over the {limit}-byte per-request limit "
                                "(VSTEER_MAX_REQUEST_INLINE_BYTES)", field="steering.vectors", reason="inline_too_large")

    def _entry(self, i: int, ref: VectorRef, registry_set: tuple[SteeringVectorSet, str] | None) -> AppliedVector:
        where = f"steering.vectors[{i}]"
        recipe = (registry_set[0].recommended or {}) if registry_set is not None and ref.op == "add" else {}
        strength = ref.strength if ref.strength is not None else float(recipe.get("strength", 1.0))
        unit = ref.unit or recipe.get("unit", "raw")
        norm = ref.norm or recipe.get("norm", "keep")
        if not math.isfinite(strength):  # models built with model_construct skip validation
            raise SteeringError("strength must be finite", field=f"{where}.strength", reason="non_finite_strength")
        if ref.data is not None:
            layers, vectors, sha, norms = self._inline(ref, where)
        else:
            vs, sha = registry_set  # type: ignore[misc]
            layers = list(ref.layers if ref.layers is not None else recipe.get("layers") or vs.layers)
            missing = [layer for layer in layers if layer not in vs.vectors]
            if missing:
                raise SteeringError(f"vector {ref.name!r} has no layers {missing}; it has {vs.layers}",
                                    field=f"{where}.layers", reason="unknown_layer")
            self._check_in_model(layers, f"{where}.layers")
            vectors = {layer: vs.vectors[layer] for layer in layers}
            norms = residual_norms_of(vs)
        for layer, v in vectors.items():
            if OPERATORS[ref.op].projects and _norm(v) <= 1e-12:
                raise SteeringError(f"{ref.op} needs a direction, but the vector for layer {layer} is zero",
                                    field=f"{where}", reason="zero_vector")
        coefficients = self._coefficients(ref.op, unit, strength, vectors, norms, where)
        return AppliedVector(ref.name, ref.data is not None, sha, ref.op, unit, norm, strength, tuple(sorted(layers)),
                             vectors, coefficients, {layer: _layer_hash(layer, v) for layer, v in vectors.items()}, i)

    def _inline(self, ref: VectorRef, where: str) -> tuple[list[int], dict[int, torch.Tensor], str, dict[int, float]]:
        keys = sorted(int(k) for k in ref.data)  # type: ignore[union-attr]
        self._check_in_model(keys, f"{where}.data")
        if ref.layers is not None:
            unused = [k for k in keys if k not in ref.layers]
            if unused:
                raise SteeringError(f"inline data for layers {unused} that 'layers' {ref.layers} does not apply",
                                    field=f"{where}.data", reason="unused_inline_layer")
            missing = [layer for layer in ref.layers if layer not in keys]
            if missing:
                raise SteeringError(f"no inline data for layers {missing}", field=f"{where}.layers",
                                    reason="unknown_layer")
        vectors = {k: decode_inline(ref.data[k], self.hidden_size, f"{where}.data[{k}]") for k in keys}  # type: ignore
        sha = hashlib.sha256("".join(_layer_hash(k, v) for k, v in vectors.items()).encode()).hexdigest()
        return keys, vectors, sha, {}

    def _check_in_model(self, layers: list[int], where: str) -> None:
        outside = [layer for layer in layers if not 0 <= layer < self.num_layers]
        if outside:
            raise SteeringError(f"layers {outside} are outside the model's 0..{self.num_layers - 1}",
                                field=where, reason="layer_out_of_range")
        if self.steerable is not None:
            off = [layer for layer in layers if layer not in self.steerable]
            if off:
                raise SteeringError(f"layers {off} are not steerable on this server (VSTEER_LAYERS="
                                    f"{','.join(map(str, sorted(self.steerable)))})", field=where,
                                    reason="layer_out_of_range")

    @staticmethod
    def _coefficients(op: str, unit: str, strength: float, vectors: dict[int, torch.Tensor],
                      norms: dict[int, float], where: str) -> dict[int, float]:
        if op == "ablate":
            return {layer: 0.0 for layer in vectors}
        if unit == "relative":
            lacking = [layer for layer in vectors if not norms.get(layer)]
            if lacking:
                raise SteeringError(f"unit=relative needs the residual-stream norms recorded at extraction; this "
                                    f"vector has none for layers {lacking} (re-extract it with vsteer >= 0.2)",
                                    field=f"{where}.unit", reason="no_residual_norms")
            if op == "clamp":
                return {layer: strength * norms[layer] for layer in vectors}
            return {layer: strength * norms[layer] / _norm(v) if _norm(v) > 0 else 0.0
                    for layer, v in vectors.items()}
        if op == "clamp":
            return {layer: strength * _norm(v) for layer, v in vectors.items()}
        return {layer: strength for layer in vectors}

    # -- the whole request ------------------------------------------------------------------
    def _check_layers(self, entries: list[AppliedVector]) -> None:
        limit = settings().max_projections
        layers = {layer for e in entries for layer in e.layers}
        for layer in sorted(layers):
            projections = [e for e in entries if layer in e.vectors and OPERATORS[e.op].projects]
            if len(projections) > limit:
                raise SteeringError(f"{len(projections)} ablate/clamp directions at layer {layer}, at most {limit} "
                                    "(VSTEER_MAX_PROJECTIONS)", field="steering.vectors", reason="too_many_projections")
            modes = {e.norm for e in entries if layer in e.vectors and e.op == "add"}
            if len(modes) > 1:
                raise SteeringError(f"vectors added at layer {layer} disagree on norm (keep vs preserve)",
                                    field="steering.vectors", reason="conflicting_norm")

    def _check_finite(self, resolved: ResolvedSteering) -> None:
        """Finite data times a legal strength can still overflow (3e38 x 1000, or fp16 at
        100 x 1000): refuse it here rather than steer with inf."""
        for layer, plan in resolved.plans().items():
            parts = [t for t in (plan.add, plan.targets) if t is not None]
            if not all(bool(torch.isfinite(t.to(self.dtype)).all()) for t in parts):
                raise SteeringError(f"the steering at layer {layer} overflows {str(self.dtype).replace('torch.', '')}"
                                    " (strength x vector is too large)", field="steering.vectors",
                                    reason="non_finite_result")
