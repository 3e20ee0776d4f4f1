"""Steering recipes: which layers, how strongly, with which operator, where.

A ``Recipe`` is one way of applying one vector set: a band of layers (one layer or
several), a strength, the operator (add/ablate/clamp), the unit (raw multiplier or
fraction of the layer's residual norm), the norm mode and the token positions. Its
``spec`` is the ``SteeringSpec`` dict the server, ``vllm.LLM`` and the HF injector take.

**Strength over a band is spread**: a recipe of strength ``s`` over ``k`` layers sends
``s / k`` to each of them (the spec's ``strength`` is per layer), so bands of different
widths at the same ``s`` add the same total. ``recommended()`` writes the per-layer
value, which is what a request that names only the vector then gets.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from itertools import product
from typing import Any, Iterable, Sequence

from vsteer.engine.operators import NORMS, OPS, UNITS
from vsteer.engine.positions import POSITIONS


def band_label(layers: Sequence[int]) -> str:
    """``10``, ``6-9`` (contiguous) or ``6,8,10``."""
    ls = sorted(layers)
    if len(ls) == 1:
        return str(ls[0])
    if ls == list(range(ls[0], ls[-1] + 1)):
        return f"{ls[0]}-{ls[-1]}"
    return ",".join(map(str, ls))


def parse_bands(text: str) -> list[tuple[int, ...]]:
    """``6-9;10-13;8`` or ``6-9,10-13`` -> [(6,7,8,9), (10,..,13), (8,)]. A band is one
    layer, ``a-b``, or layers joined by ``+`` (``6+8+10``)."""
    bands = []
    for part in filter(None, (p.strip() for p in text.replace(";", ",").split(","))):
        try:
            if "+" in part:
                band = tuple(sorted({int(x) for x in part.split("+")}))
            elif "-" in part[1:]:
                lo, hi = part.split("-", 1)
                band = tuple(range(int(lo), int(hi) + 1))
            else:
                band = (int(part),)
        except ValueError:
            raise ValueError(f"invalid band {part!r}: use 10, 6-9 or 6+8+10") from None
        if not band or min(band) < 0:
            raise ValueError(f"invalid band {part!r}")
        bands.append(band)
    if not bands:
        raise ValueError("no bands given")
    return bands


@dataclass(frozen=True)
class Recipe:
    """One way to apply the evaluated vector set (see the module doc)."""

    layers: tuple[int, ...]
    strength: float = 0.0
    op: str = "add"
    unit: str = "raw"
    norm: str = "keep"
    positions: str = "all"

    def __post_init__(self) -> None:
        if not self.layers:
            raise ValueError("a recipe needs at least one layer")
        object.__setattr__(self, "layers", tuple(sorted(int(x) for x in self.layers)))
        for value, allowed, what in ((self.op, OPS, "op"), (self.unit, UNITS, "unit"), (self.norm, NORMS, "norm"),
                                     (self.positions, POSITIONS, "positions")):
            if value not in allowed:
                raise ValueError(f"{what} must be one of {', '.join(allowed)}; got {value!r}")
        if self.op != "add" and self.norm != "keep":
            raise ValueError("norm=preserve goes with op=add")
        if self.op == "ablate":
            object.__setattr__(self, "strength", 1.0)
            object.__setattr__(self, "unit", "raw")

    @property
    def band(self) -> str:
        return band_label(self.layers)

    @property
    def per_layer(self) -> float:
        """What each layer of the band gets (ablate: 1)."""
        return self.strength if self.op == "ablate" else self.strength / len(self.layers)

    @property
    def takes_strength(self) -> bool:
        return self.op != "ablate"

    def at(self, strength: float) -> "Recipe":
        return replace(self, strength=float(strength))

    def variant(self) -> "Recipe":
        """The recipe without its strength (what a strength sweep varies over)."""
        return replace(self, strength=0.0) if self.takes_strength else self

    def label(self, axes: Iterable[str] = ("op", "unit", "norm", "positions")) -> str:
        """``6-9`` plus the named axes that are not at their defaults."""
        defaults = {"op": "add", "unit": "raw", "norm": "keep", "positions": "all"}
        extra = [str(getattr(self, a)) for a in axes if getattr(self, a) != defaults[a]]
        return " ".join([self.band, *extra])

    def spec(self, name: str) -> dict[str, Any]:
        ref: dict[str, Any] = {"name": name, "layers": list(self.layers), "op": self.op}
        if self.takes_strength:
            ref["strength"] = self.per_layer
            if self.unit != "raw":
                ref["unit"] = self.unit
        if self.norm != "keep":
            ref["norm"] = self.norm
        return {"vectors": [ref], "positions": self.positions}

    def recommended(self) -> dict[str, Any]:
        """The recipe as ``SteeringVectorSet.recommended`` (add only: the resolver applies a
        recorded recipe to ``add`` requests)."""
        if self.op != "add":
            raise ValueError("only add recipes can be recorded as a set's default")
        return {"strength": round(self.per_layer, 6), "layers": list(self.layers), "unit": self.unit,
                "norm": self.norm, "positions": self.positions}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Recipe":
        """The inverse of ``to_dict`` (a report's ``recipe``); derived keys are ignored."""
        return cls(tuple(d["layers"]), d["strength"], d["op"], d["unit"], d["norm"], d["positions"])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["layers"] = list(self.layers)
        d["band"] = self.band
        d["per_layer_strength"] = self.per_layer
        return d


def variants(bands: Sequence[Sequence[int]], *, ops: Sequence[str] = ("add",), units: Sequence[str] = ("raw",),
             norms: Sequence[str] = ("keep",), positions: Sequence[str] = ("all",)) -> list[Recipe]:
    """Every valid combination (strength 0; ``norm: preserve`` only with ``add``; ablate
    once per band and positions, whatever the unit), in a stable order."""
    out: list[Recipe] = []
    for band, op, unit, norm, pos in product(bands, ops, units, norms, positions):
        if op != "add" and norm != "keep":
            continue
        r = Recipe(tuple(band), 0.0, op, unit, norm, pos)
        if r not in out:
            out.append(r)
    return out


def default_bands(layers: Sequence[int], width: int = 4) -> list[tuple[int, ...]]:
    """Bands to search when none are given: each layer alone when the set has at most 3,
    else windows of ``width`` consecutive layers of the set; plus the whole set."""
    ls = sorted(layers)
    bands = [(x,) for x in ls] if len(ls) <= 3 else [tuple(ls[i:i + width]) for i in range(0, len(ls), width)]
    if len(ls) > 1 and tuple(ls) not in bands:
        bands.append(tuple(ls))
    return bands
