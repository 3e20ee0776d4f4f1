"""``SteeringSpec``: the per-request steering description, shared by the HF injector,
vLLM's ``SamplingParams.extra_args["steering"]`` and the server's ``"steering"`` field.

Validation happens in two steps: this pydantic model checks what needs no model (shape,
finite bounded strengths, vector count, name syntax); ``SteeringResolver``
(``vsteer.engine.resolver``) checks names, layers and hidden size against the registry
and the model. Limits come from ``vsteer.engine.settings`` (``VSTEER_MAX_*``).
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import SteeringError
from .positions import POSITIONS, POSITIONS_DOC, Positions
from .registry import NAME_PATTERN
from .settings import settings

STEERING_KEY = "steering"
"""The request field (``extra_body={"steering": ...}``) and ``SamplingParams.extra_args`` key."""


class VectorRef(BaseModel):
    """One behaviour in a request: a registry name (or inline data), a strength, layers."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=NAME_PATTERN, max_length=128, description="registry name (or label for inline data)")
    strength: float = Field(1.0, allow_inf_nan=False)
    layers: list[int] | None = Field(None, min_length=1, description="subset of the set's layers; default all")
    data: dict[int, str] | None = Field(
        None, description="inline vectors: layer -> base64 of little-endian float32 [hidden_size]")

    @field_validator("strength")
    @classmethod
    def _strength_bound(cls, v: float) -> float:
        bound = settings().max_strength
        if abs(v) > bound:
            raise ValueError(f"strength {v:g} is outside -{bound:g}..{bound:g} (VSTEER_MAX_STRENGTH)")
        return v

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
        limit = settings().max_inline_bytes
        if size > limit:
            raise ValueError(f"inline vectors are {size} bytes, over the {limit}-byte limit")
        return v


class SteeringSpec(BaseModel):
    """What to steer with: several behaviours, each with its own strength, and where."""

    model_config = ConfigDict(extra="forbid")

    vectors: list[VectorRef] = Field(default_factory=list)
    positions: Positions = "all"

    @field_validator("vectors")
    @classmethod
    def _vector_count(cls, v: list[VectorRef]) -> list[VectorRef]:
        limit = settings().max_vectors
        if len(v) > limit:
            raise ValueError(f"too many vectors: {len(v)}, at most {limit} (VSTEER_MAX_VECTORS)")
        return v

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
            msg = err.get("msg", "")
            reason = {"extra_forbidden": "unknown_field", "finite_number": "non_finite_strength"}.get(
                err["type"], err["type"])
            if "VSTEER_MAX_STRENGTH" in msg:
                reason = "strength_out_of_bounds"
            elif "VSTEER_MAX_VECTORS" in msg:
                reason = "too_many_vectors"
            elif "over the" in msg:
                reason = "inline_too_large"
            raise SteeringError(msg.removeprefix("Value error, "), field=loc, reason=reason) from None

    @property
    def is_empty(self) -> bool:
        return not self.vectors

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


__all__ = ["POSITIONS", "POSITIONS_DOC", "STEERING_KEY", "SteeringError", "SteeringSpec", "VectorRef"]
