"""Steered models: a model name that means "the served model with this steering".

vLLM serves LoRA adapters as model names (``--lora-modules``), listed in ``/v1/models``
with their base model as parent and picked by the request's ``model`` field; every
OpenAI client, gateway and router understands that. A steered model is the same for
steering: ``--steered-model happy=happy:2`` lets ``model="happy"`` steer with no
``extra_body``. Aliases come from the command line (``VSTEER_STEERED_MODELS``) or are
created at run time through the admin API; run-time aliases live in the vector
directory (``.models/<name>.json``), so every replica that shares the directory serves
them.

The compact syntax (``--steered-model NAME=SPEC``)::

    SPEC   = VECTOR ["+" VECTOR ...] [";" OPTION ...]      or a JSON SteeringSpec object
    VECTOR = SET [":" STRENGTH]
    OPTION = layers=8,10,12 | layers=8-12 | op=add|ablate|clamp | unit=raw|relative
           | norm=keep|preserve | positions=all|prompt|generated|first|last

Options other than ``positions`` apply to every vector; for anything else use the JSON
form. A request for a steered model may add ``steering``: its vectors are appended to the
alias's (its ``positions``, if given, wins); ``null`` or no vectors add nothing.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from vsteer.engine.errors import SteeringError
from vsteer.engine.registry import check_name
from vsteer.engine.spec import STEERING_KEY, SteeringSpec

ALIASES_DIR = ".models"
"""Run-time steered models, one JSON file each, inside the vector directory."""
_RELOAD_S = 1.0
_VECTOR_OPTIONS = ("layers", "op", "unit", "norm")


@dataclass(frozen=True)
class SteeredModel:
    name: str
    spec: dict[str, Any]
    """The canonical SteeringSpec it stands for."""
    origin: str
    """"flag" (command line / VSTEER_STEERED_MODELS) or "runtime" (admin API)."""

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, STEERING_KEY: self.spec, "origin": self.origin}


def _layers(text: str) -> list[int]:
    if "-" in text and "," not in text:
        lo, _, hi = text.partition("-")
        return list(range(int(lo), int(hi) + 1))
    return [int(x) for x in text.split(",") if x.strip()]


def parse_compact(text: str) -> dict[str, Any]:
    """The SteeringSpec a compact SPEC (or a JSON object) stands for; raises ``ValueError``."""
    text = text.strip()
    if text.startswith("{"):
        try:
            raw = json.loads(text)
        except (json.JSONDecodeError, RecursionError) as e:
            raise ValueError(f"not valid JSON ({e})") from None
    else:
        vectors_part, *options = [part.strip() for part in text.split(";")]
        shared: dict[str, Any] = {}
        raw = {"vectors": []}
        for option in options:
            key, sep, value = option.partition("=")
            if not sep or key not in (*_VECTOR_OPTIONS, "positions"):
                raise ValueError(f"unknown option {option!r} (use layers=, op=, unit=, norm=, positions=)")
            try:
                parsed: Any = _layers(value) if key == "layers" else value
            except ValueError:
                raise ValueError(f"layers={value!r}: use 8,10,12 or 8-12") from None
            (raw if key == "positions" else shared)[key] = parsed
        for vector in vectors_part.split("+"):
            name, sep, strength = vector.strip().partition(":")
            entry: dict[str, Any] = {"name": name, **shared}
            if sep:
                try:
                    entry["strength"] = float(strength)
                except ValueError:
                    raise ValueError(f"strength {strength!r} of {name!r} is not a number") from None
            raw["vectors"].append(entry)
    try:
        spec = SteeringSpec.parse(raw)
    except SteeringError as e:
        raise ValueError(str(e)) from None
    if spec is None or spec.is_empty:
        raise ValueError("a steered model needs at least one vector")
    return spec.to_dict()


def parse_alias(text: str) -> SteeredModel:
    """``NAME=SPEC``; raises ``ValueError`` naming the problem."""
    name, sep, spec = text.partition("=")
    if not sep:
        raise ValueError(f"{text!r}: expected NAME=SPEC (e.g. happy=happy:2)")
    try:
        check_name(name.strip())
    except ValueError as e:
        raise ValueError(f"steered model name {name!r}: {e}") from None
    try:
        return SteeredModel(name.strip(), parse_compact(spec), "flag")
    except ValueError as e:
        raise ValueError(f"steered model {name.strip()!r}: {e}") from None


def parse_flag_aliases(values: Iterable[str]) -> dict[str, SteeredModel]:
    out: dict[str, SteeredModel] = {}
    for value in values:
        if not value.strip():
            continue
        model = parse_alias(value)
        if model.name in out:
            raise ValueError(f"steered model {model.name!r} is defined twice")
        out[model.name] = model
    return out


def combine(alias: dict[str, Any], request: Any) -> dict[str, Any]:
    """The alias's spec plus whatever steering the request adds (see the module doc)."""
    if request is None or (isinstance(request, dict) and not request.get("vectors") and "positions" not in request):
        return alias
    if not isinstance(request, dict):
        raise SteeringError(f"must be an object, got {type(request).__name__}", reason="wrong_type")
    extra = request.get("vectors") or []
    if not isinstance(extra, list):
        raise SteeringError("vectors must be a list", field="steering.vectors", reason="wrong_type")
    combined = {**alias, "vectors": [*alias["vectors"], *extra]}
    if "positions" in request:
        combined["positions"] = request["positions"]
    unknown = set(request) - {"vectors", "positions"}
    if unknown:
        combined.update({k: request[k] for k in unknown})  # refused by the spec's own validation
    return combined


class AliasTable:
    """The steered models of one server: its flag aliases and the run-time ones in the
    vector directory (re-read when the directory changes, at most once a second)."""

    def __init__(self, flags: dict[str, SteeredModel], root: Path | None):
        self.flags = dict(flags)
        self.root = root / ALIASES_DIR if root is not None else None
        self._runtime: dict[str, SteeredModel] = {}
        self._seen: tuple[float, int] | None = None
        self._lock = threading.Lock()

    def _load_runtime(self) -> dict[str, SteeredModel]:
        if self.root is None:
            return {}
        now = time.monotonic()
        try:
            mtime = self.root.stat().st_mtime_ns
        except OSError:
            return {}
        with self._lock:
            if self._seen is not None and self._seen[1] == mtime and now - self._seen[0] < _RELOAD_S:
                return self._runtime
            found = {}
            for path in sorted(self.root.glob("*.json")):
                try:
                    found[path.stem] = SteeredModel(path.stem, json.loads(path.read_text())[STEERING_KEY], "runtime")
                except (OSError, ValueError, KeyError, TypeError):
                    continue  # half-written or hand-edited: skipped, never fatal
            self._runtime, self._seen = found, (now, mtime)
            return found

    def get(self, name: Any) -> SteeredModel | None:
        if not isinstance(name, str):
            return None
        return self.flags.get(name) or self._load_runtime().get(name)

    def all(self) -> list[SteeredModel]:
        runtime = self._load_runtime()
        return [*self.flags.values(), *(m for n, m in runtime.items() if n not in self.flags)]

    def using(self, vector: str) -> list[SteeredModel]:
        return [m for m in self.all() if any(v.get("name") == vector and "data" not in v for v in m.spec["vectors"])]

    # -- run-time aliases ------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive across processes (replicas share the directory): held while a steered
        model is written or removed, and while a vector set it may use is removed or
        replaced, so neither check can be outrun by the other replica."""
        if self.root is None:
            yield
            return
        self.root.mkdir(exist_ok=True)
        with open(self.root / ".lock", "a+b") as fh:
            fcntl.flock(fh, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(fh, fcntl.LOCK_UN)

    def write(self, model: SteeredModel) -> None:
        """(Under ``lock()``.) Atomically, so a reader never sees half a file."""
        assert self.root is not None
        self.root.mkdir(exist_ok=True)
        tmp = self.root / f".{model.name}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps({STEERING_KEY: model.spec}, sort_keys=True))
        os.replace(tmp, self.root / f"{model.name}.json")
        self._seen = None

    def remove(self, name: str) -> bool:
        if self.root is None:
            return False
        try:
            (self.root / f"{check_name(name)}.json").unlink()
        except FileNotFoundError:
            return False
        self._seen = None
        return True


# -- HTTP: the request's model field, the response's, and /v1/models ----------------------------
def may_name_one(body: bytes, table: "AliasTable | None") -> bool:
    """A cheap check before parsing: does the body mention any steered model's name?"""
    if table is None:
        return False
    return any(json.dumps(m.name).encode() in body for m in table.all())


def served_body(request: dict[str, Any], served: str) -> bytes:
    """The request body vLLM gets: the served model's name instead of the steered model's."""
    return json.dumps({**request, "model": served}, ensure_ascii=False).encode()


def renamer(served: str, alias: str):
    """Replaces the served model's name by the steered model's in response bytes (JSON bodies
    and stream chunks alike: vLLM writes ``"model":"<name>"`` without spaces)."""
    old = b'"model":' + json.dumps(served).encode()
    new = b'"model":' + json.dumps(alias).encode()
    return lambda chunk: chunk.replace(old, new)


def model_cards(listing: dict[str, Any], table: "AliasTable", served: str) -> dict[str, Any]:
    """``GET /v1/models`` with a card per steered model, parented like vLLM's LoRA cards."""
    data = listing.get("data")
    if not isinstance(data, list):
        return listing
    base = next((c for c in data if isinstance(c, dict) and c.get("id") == served), None)
    if base is None:
        return listing
    known = {c.get("id") for c in data if isinstance(c, dict)}
    for model in table.all():
        if model.name not in known:
            data.append({**base, "id": model.name, "parent": served, "root": base.get("root", served),
                         "owned_by": "vsteer", STEERING_KEY: model.spec})
    return listing
