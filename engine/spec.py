"""``SteeringSpec``: the per-request steering description, shared by the HF injector,
vLLM's ``SamplingParams.extra_args["steering"]`` and the server's ``"steering"`` field.

Validation happens in two steps: this pydantic model checks what needs no model (shape,
finite bounded strengths, vector count, name syntax, operator fields); the resolver
(``vsteer.engine.resolver``) checks names, layers and hidden size against the registry
and the model. Limits come from ``vsteer.engine.settings`` (``VSTEER_MAX_*``). Every
error carries a ``reason`` from ``vsteer.engine.errors.REJECTION_REASONS``.
"""

from __future__ import annotations

import numbers
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .errors import SteeringError, reason_for_pydantic
from .operators import Norm, Op, Unit
from .positions import POSITIONS, POSITIONS_DOC, Positions
from .registry import check_name
from .settings import settings

STEERING_KEY = "steering"
"""The request field (``extra_body={"steering": ...}``) and ``SamplingParams.extra_args`` key."""


def _number(v: Any) -> Any:
    """Strict numbers: ``true`` or ``"3"`` is a client bug, not a strength of 1 or 3 (an
    int is a number: ``3`` is fine)."""
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise PydanticCustomError("wrong_type", "must be a number, not {t}", {"t": _json_type(v)})
    try:
        return float(v)
    except OverflowError:  # an integer literal beyond any float
        raise PydanticCustomError("strength_out_of_bounds", "an integer of {n} bits is outside any float",
                                  {"n": int(v).bit_length()}) from None


def _integer(v: Any) -> Any:
    """Strict integers (layer numbers): no ``true``, ``"1"`` or ``1.0``."""
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise PydanticCustomError("wrong_type", "must be an integer, not {t}", {"t": _json_type(v)})
    return int(v)


def _json_type(v: Any) -> str:
    names = {bool: "a boolean", str: "a string", float: "a float", type(None): "null", list: "a list", dict: "an object"}
    return next((n for t, n in names.items() if isinstance(v, t)), type(v).__name__)


Number = Annotated[float, BeforeValidator(_number)]
Integer = Annotated[int, BeforeValidator(_integer)]


class VectorRef(BaseModel):
    """One behaviour in a request: a registry name (or inline data), what to do with it
    (``op``), how strongly, and at which layers. Omitted fields take the set's recorded
    recommendation (``vsteer tune``), else the defaults below."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(strict=True, description="registry name (or label for inline data)")
    strength: Number | None = Field(None, allow_inf_nan=False,
                                   description="multiplier (raw) or fraction of the layer's residual norm "
                                               "(relative); default: the set's recommendation, else 1")
    layers: list[Integer] | None = Field(None, min_length=1, description="subset of the set's layers; default all")
    op: Op = Field("add", description="add | ablate | clamp (vsteer.engine.operators)")
    unit: Unit | None = Field(None, description="raw (default) | relative: strength as a fraction of the "
                                                "layer's mean residual-stream norm")
    norm: Norm | None = Field(None, description="keep (default) | preserve: rescale each token to its norm "
                                                "before this layer's operators (add only)")
    data: dict[int, Annotated[str, Field(strict=True)]] | None = Field(
        None, description="inline vectors: layer -> base64 of little-endian float32 [hidden_size]")

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        try:
            return check_name(v)
        except ValueError as e:
            raise PydanticCustomError("invalid_name", str(e).replace("{", "(").replace("}", ")")) from None

    @field_validator("strength")
    @classmethod
    def _strength_bound(cls, v: float | None) -> float | None:
        bound = settings().max_strength
        if v is not None and abs(v) > bound:
            raise PydanticCustomError("strength_out_of_bounds",
                                      "strength {v} is outside -{b}..{b} (VSTEER_MAX_STRENGTH)",
                                      {"v": f"{v:g}", "b": f"{bound:g}"})
        return v

    @field_validator("layers")
    @classmethod
    def _layers_unique(cls, v: list[int] | None) -> list[int] | None:
        if v is None:
            return v
        if any(layer < 0 for layer in v):
            raise PydanticCustomError("layer_out_of_range", "layers must be >= 0")
        if len(set(v)) != len(v):
            raise PydanticCustomError("invalid_value", "layers must not repeat")
        return sorted(v)

    @field_validator("data")
    @classmethod
    def _data_size(cls, v: dict[int, str] | None) -> dict[int, str] | None:
        if v is None:
            return v
        if not v:
            raise PydanticCustomError("invalid_value", "inline data must hold at least one layer")
        size = sum(len(s) for s in v.values()) * 3 // 4
        limit = settings().max_inline_bytes
        if size > limit:
            raise PydanticCustomError("inline_too_large", "inline vectors are {size} bytes, over the {limit}-byte "
                                      "limit (VSTEER_MAX_INLINE_BYTES)", {"size": size, "limit": limit})
        return v

    @model_validator(mode="after")
    def _op_fields(self) -> "VectorRef":
        if self.op == "ablate" and self.strength not in (None, 1.0):
            raise PydanticCustomError("invalid_op_combination", "ablate takes no strength (leave it out or use 1)")
        if self.op == "ablate" and self.unit == "relative":
            raise PydanticCustomError("invalid_op_combination", "ablate takes no unit")
        if self.op != "add" and self.norm == "preserve":
            raise PydanticCustomError("invalid_op_combination", "norm=preserve goes with op=add")
        return self


class SteeringSpec(BaseModel):
    """What to steer with: several behaviours, each with its own operator and strength,
    and at which token positions."""

    model_config = ConfigDict(extra="forbid")

    vectors: list[VectorRef] = Field(default_factory=list)
    positions: Positions | None = Field(None, description="token rule (vsteer.engine.positions); default: the "
                                                          "vectors' recommendation, else all")

    @field_validator("vectors")
    @classmethod
    def _vector_count(cls, v: list[VectorRef]) -> list[VectorRef]:
        limit = settings().max_vectors
        if len(v) > limit:
            raise PydanticCustomError("too_many_vectors", "too many vectors: {n}, at most {limit} "
                                      "(VSTEER_MAX_VECTORS)", {"n": len(v), "limit": limit})
        return v

    @classmethod
    def parse(cls, value: "SteeringSpec | dict[str, Any] | None") -> "SteeringSpec | None":
        """Accept a spec, a dict or None; raise ``SteeringError`` naming the bad field."""
        if value is None or isinstance(value, SteeringSpec):
            return value
        if not isinstance(value, dict):
            raise SteeringError(f"must be an object, got {type(value).__name__}", reason="wrong_type")
        try:
            return cls.model_validate(value)
        except ValidationError as e:
            err = e.errors()[0]
            loc = "steering" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"])
            msg = str(err.get("msg", "")).removeprefix("Value error, ")
            raise SteeringError(msg, field=loc, reason=reason_for_pydantic(err["type"])) from None
        except RecursionError:
            raise SteeringError("nested too deeply", reason="invalid_value") from None

    @property
    def is_empty(self) -> bool:
        return not self.vectors

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True, exclude_defaults=True)


__all__ = ["POSITIONS", "POSITIONS_DOC", "STEERING_KEY", "SteeringError", "SteeringSpec", "VectorRef"]
