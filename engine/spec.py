"""``SteeringSpec``: the per-request steering description, shared by the HF injector,
vLLM's ``SamplingParams.extra_args["steering"]`` and the server's ``"steering"`` field.

Validation happens in two steps: the pydantic model checks what needs no model
(shape, finite bounded strengths, vector count, name syntax); ``SteeringResolver`` checks
names, layers and hidden size against the registry and the model, and returns the
per-layer sums that the injectors add.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import threading
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .formats import VectorFileError
from .registry import NAME_PATTERN, UnknownVectorError, VectorRegistry, VersionGoneError

Positions = Literal["all", "prompt", "generated", "first", "last"]
POSITIONS: tuple[str, ...] = ("all", "prompt", "generated", "first", "last")
POSITIONS_DOC = {
    "all": "every token: prompt and generated",
    "prompt": "prompt tokens only",
    "generated": "only tokens produced by generation (the prompt's logits stay unsteered)",
    "first": "the first prompt token only (the seed's 'first', fixed for the KV cache)",
    "last": "the last prompt token only (the seed's 'last', fixed for the KV cache)",
}


def _env_float(name: str, default: float) -> float:
    return float(os.environ.get(name, default))


MAX_VECTORS = int(_env_float("VSTEER_MAX_VECTORS", 16))
MAX_ABS_STRENGTH = _env_float("VSTEER_MAX_STRENGTH", 1000.0)
MAX_INLINE_BYTES = int(_env_float("VSTEER_MAX_INLINE_BYTES", 1 << 20))


class SteeringError(ValueError):
    """Invalid steering: ``field`` names the offending part (e.g. ``vectors[1].name``)."""

    def __init__(self, message: str, field: str = "steering", reason: str = "invalid"):
        self.field, self.reason, self.message = field, reason, message
        super().__init__(f"{field}: {message}")


class VectorRef(BaseModel):
    """One behaviour in a request: a registry name (or inline data), a strength, layers."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, max_length=128, description="registry name (or label for inline data)")
    strength: float = Field(1.0, allow_inf_nan=False, ge=-MAX_ABS_STRENGTH, le=MAX_ABS_STRENGTH)
    layers: list[int] | None = Field(None, min_length=1, description="subset of the set's layers; default all")
    data: dict[int, str] | None = Field(
        None, description="inline vectors: layer -> base64 of little-endian float32 [hidden_size]")

    @field_validator("layers")
    @classmethod
    def _layers_unique(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if any(layer < 0 for layer in v):
            raise ValueError("layers must be >= 0")
        if len(set(v)) != len(v):
            raise ValueError("layers must not repeat")
        return sorted(v)

    @field_validator("data")
    @classmethod
    def _data_size(cls, v: dict[int, str] | None) -> dict[int, str] | None:
        if v is None:
            return v
        if not v:
            raise ValueError("inline data must hold at least one layer")
        size = sum(len(s) for s in v.values()) * 3 // 4
        if size > MAX_INLINE_BYTES:
            raise ValueError(f"inline vectors are {size} bytes, over the {MAX_INLINE_BYTES}-byte limit")
        return v


class SteeringSpec(BaseModel):
    """What to steer with: several behaviours, each with its own strength, and where."""

    model_config = ConfigDict(extra="forbid")

    vectors: list[VectorRef] = Field(default_factory=list, max_length=MAX_VECTORS)
    positions: Positions = "all"

    @classmethod
    def parse(cls, value: "SteeringSpec | dict[str, Any] | None") -> "SteeringSpec | None":
        """Accept a spec, a dict or None; raise ``SteeringError`` naming the bad field."""
        if value is None or isinstance(value, SteeringSpec):
            return value
        if not isinstance(value, dict):
            raise SteeringError(f"must be an object, got {type(value).__name__}")
        try:
            return cls.model_validate(value)
        except ValidationError as e:
            err = e.errors()[0]
            loc = "steering" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            reason = {"extra_forbidden": "unknown_field", "too_long": "too_many_vectors",
                      "finite_number": "non_finite_strength", "greater_than_equal": "strength_out_of_bounds",
                      "less_than_equal": "strength_out_of_bounds"}.get(err["type"], err["type"])
            if "over the" in err.get("msg", ""):
                reason = "inline_too_large"
            raise SteeringError(err["msg"], field=loc, reason=reason) from None

    @property
    def is_empty(self) -> bool:
        return not self.vectors

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


@dataclass(frozen=True)
class ResolvedSteering:
    """A spec checked against the model: strength-weighted vectors summed per layer."""

    positions: str
    layer_vectors: dict[int, torch.Tensor]
    fingerprint: str
    applied: list[dict[str, Any]] = field(default_factory=list)
    versions: dict[str, str] = field(default_factory=dict)
    """Registry name -> content sha256 it resolved to: pass to ``resolve(..., versions=)``
    elsewhere (the vLLM workers) to apply exactly this content even if the set changes."""

    @property
    def layers(self) -> list[int]:
        return sorted(self.layer_vectors)

    def describe(self) -> dict[str, Any]:
        return {"fingerprint": self.fingerprint, "positions": self.positions, "vectors": self.applied}


def decode_inline(data: dict[int, str], hidden_size: int, where: str) -> dict[int, torch.Tensor]:
    out: dict[int, torch.Tensor] = {}
    for layer, b64 in data.items():
        try:
            raw = base64.b64decode(b64, validate=True)
        except Exception:
            raise SteeringError("inline data is not valid base64", field=f"{where}.data[{layer}]",
                                reason="bad_inline_data") from None
        if len(raw) != 4 * hidden_size:
            raise SteeringError(f"inline vector has {len(raw) // 4} floats, the model's hidden size is {hidden_size}",
                                field=f"{where}.data[{layer}]", reason="wrong_hidden_size")
        t = torch.frombuffer(bytearray(raw), dtype=torch.float32).clone()
        if not torch.isfinite(t).all():
            raise SteeringError("inline vector contains NaN or infinite values", field=f"{where}.data[{layer}]",
                                reason="non_finite_vector")
        out[int(layer)] = t
    return out


def encode_inline(vector: torch.Tensor) -> str:
    """base64 of a float32 little-endian vector, for ``VectorRef.data``."""
    return base64.b64encode(vector.detach().to("cpu", torch.float32).numpy().astype("<f4").tobytes()).decode()


class SteeringResolver:
    """Turns specs into ``ResolvedSteering`` for one model; caches by canonical spec."""

    def __init__(self, registry: VectorRegistry | None, *, hidden_size: int, num_layers: int,
                 model_id: str | None = None, cache_size: int = 1024):
        self.registry, self.hidden_size, self.num_layers = registry, hidden_size, num_layers
        self.model_id = model_id
        self._cache: dict[str, ResolvedSteering] = {}
        self._cache_size = cache_size
        self._lock = threading.Lock()  # the server resolves from the event loop and a thread pool

    def resolve(self, spec: SteeringSpec | dict[str, Any] | None, *,
                versions: dict[str, str] | None = None) -> ResolvedSteering | None:
        """None for no steering (absent, null or no vectors); raises ``SteeringError``.

        ``versions`` pins registry names to content hashes (from another resolver's
        ``ResolvedSteering.versions``); a pinned version that is gone raises
        ``SteeringError`` with reason ``vector_version_gone``."""
        spec = SteeringSpec.parse(spec)
        if spec is None or spec.is_empty:
            return None
        versions = versions or {}
        entries = [self._entry(i, ref, versions.get(ref.name)) for i, ref in enumerate(spec.vectors)]
        # A canonical order makes the fingerprint and the float sums independent of how the
        # request listed its vectors.
        entries.sort(key=lambda e: (e["name"], e["sha256"], e["layers"], e["strength"]))
        canon = json.dumps({"positions": spec.positions,
                            "vectors": [{k: e[k] for k in ("name", "sha256", "layers", "strength")} for e in entries]},
                           sort_keys=True)
        fingerprint = hashlib.sha256(canon.encode()).hexdigest()[:32]
        with self._lock:
            cached = self._cache.get(fingerprint)
        if cached is not None:
            return cached
        sums: dict[int, torch.Tensor] = {}
        for e in entries:
            for layer in e["layers"]:
                contrib = e["tensors"][layer] * e["strength"]
                sums[layer] = contrib if layer not in sums else sums[layer] + contrib
        resolved = ResolvedSteering(spec.positions, sums, fingerprint,
                                    [{k: e[k] for k in ("name", "strength", "layers", "sha256")} for e in entries],
                                    {e["name"]: e["sha256"] for e in entries if not e["inline"]})
        with self._lock:
            if len(self._cache) >= self._cache_size:
                self._cache.pop(next(iter(self._cache)))
            self._cache[fingerprint] = resolved
        return resolved

    def _entry(self, i: int, ref: VectorRef, pinned_sha: str | None) -> dict[str, Any]:
        where = f"steering.vectors[{i}]"
        if not math.isfinite(ref.strength):  # models built with model_construct skip validation
            raise SteeringError("strength must be finite", field=f"{where}.strength", reason="non_finite_strength")
        if ref.data is not None:
            tensors = decode_inline(ref.data, self.hidden_size, where)
            sha = hashlib.sha256(b"".join(tensors[k].numpy().tobytes() for k in sorted(tensors))).hexdigest()
        else:
            tensors, sha = self._from_registry(ref.name, where, pinned_sha)
        layers = ref.layers if ref.layers is not None else sorted(tensors)
        missing = [layer for layer in layers if layer not in tensors]
        if missing:
            raise SteeringError(f"vector {ref.name!r} has no layers {missing}; it has {sorted(tensors)}",
                                field=f"{where}.layers", reason="unknown_layer")
        outside = [layer for layer in layers if not 0 <= layer < self.num_layers]
        if outside:
            raise SteeringError(f"layers {outside} are outside the model's 0..{self.num_layers - 1}",
                                field=f"{where}.layers", reason="layer_out_of_range")
        return {"name": ref.name, "strength": float(ref.strength), "layers": list(layers), "sha256": sha,
                "tensors": tensors, "inline": ref.data is not None}

    def _from_registry(self, name: str, where: str,
                       pinned_sha: str | None = None) -> tuple[dict[int, torch.Tensor], str]:
        if self.registry is None:
            raise SteeringError(f"no vector directory is configured, so {name!r} cannot be resolved "
                                "(start with --vectors DIR or VSTEER_VECTORS_DIR)", field=f"{where}.name",
                                reason="no_registry")
        try:
            vs, sha = self.registry.load_with_hash(name, expect_hidden_size=self.hidden_size, sha256=pinned_sha)
        except UnknownVectorError as e:
            raise SteeringError(str(e), field=f"{where}.name", reason="unknown_vector") from None
        except VersionGoneError as e:
            raise SteeringError(str(e), field=f"{where}.name", reason="vector_version_gone") from None
        except VectorFileError as e:
            reason = "wrong_hidden_size" if "hidden size" in str(e) else "bad_vector_file"
            raise SteeringError(str(e), field=f"{where}.name", reason=reason) from None
        except ValueError as e:
            raise SteeringError(str(e), field=f"{where}.name", reason="invalid_name") from None
        return vs.vectors, sha
