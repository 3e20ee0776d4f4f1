"""``SteeringResolver``: a ``SteeringSpec`` checked against one model and a registry,
turned into what the injectors apply (``ResolvedSteering``).

Used by the server before a request is queued, by every vLLM worker (with the content
versions the server pinned), and by the HF injectors.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import threading
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import SteeringError, UnknownVectorError, VectorFileError, VersionGoneError
from .registry import VectorRegistry
from .spec import SteeringSpec, VectorRef

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
                                    [{k: e[k] for k in ("name", "strength", "layers", "sha256", "inline")} for e in entries],
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
