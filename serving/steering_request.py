"""One steered request on its way through vLLM's processes, as one type.

A request's steering is parsed and resolved once, where it enters: in the API server (the
HTTP middleware, off the event loop) or, for ``vllm.LLM``, in ``process_inputs``. The
result is a ``SteeringRequest``: the canonical spec, the fingerprint of exactly what will
be applied, the content version pinned for every registry name, the position rule and the
labels metrics use. It travels in ``SamplingParams.extra_args[PINS_KEY]`` as plain data:

* API process: ``seal()`` adds a MAC with a per-process secret, so ``process_inputs`` can
  tell a resolution made here from anything a client put in ``vllm_xargs`` (``unseal``);
  it then salts the prefix cache and counts the request without resolving anything;
* engine core (``vsteer.serving.admission``): ``from_engine`` reads it back (its input
  comes from the front-end only), prepares the table rows once per fingerprint and adds
  them under ``ROWS_KEY`` for the workers;
* workers: copy the prepared rows into their tables.

Client-sent ``steering``/``vsteer``/``vsteer_rows`` keys never pass the front-end
(``without_vsteer_keys``).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from dataclasses import dataclass, field
from typing import Any

from vsteer.engine.positions import RULES
from vsteer.engine.resolver import ResolvedSteering

from .keys import INLINE_LABEL, PINS_KEY, ROWS_KEY, SALT_PREFIX, STEERING_KEY

_SECRET = os.urandom(32)
CLIENT_KEYS = frozenset((STEERING_KEY, PINS_KEY, ROWS_KEY))


@dataclass(frozen=True)
class SteeringRequest:
    spec: dict[str, Any]
    """The canonical spec (``SteeringSpec.to_dict()``): what the engine core resolves."""
    fingerprint: str
    versions: dict[str, str]
    """Registry name -> content sha256 resolved: the engine core loads exactly these."""
    positions: str
    labels: tuple[str, ...]
    """Per-vector metric labels: registry names, ``inline`` for inline data."""
    source: str = "request"
    """request | default | alias: where the steering came from (response headers)."""
    alias: str | None = None
    """The steered model (``model`` field) this request named, if any."""
    resolved: ResolvedSteering | None = field(default=None, compare=False, repr=False)
    """The resolution itself, in the process that made it only (never shipped)."""

    @classmethod
    def of(cls, spec: dict[str, Any], resolved: ResolvedSteering, source: str = "request",
           alias: str | None = None) -> "SteeringRequest":
        labels = sorted({INLINE_LABEL if e.inline else e.name for e in resolved.entries})
        return cls(spec, resolved.fingerprint, dict(resolved.versions), resolved.positions, tuple(labels), source,
                   alias, resolved)

    # -- on the wire ------------------------------------------------------------------------
    def _body(self) -> dict[str, Any]:
        return {"spec": self.spec, "fingerprint": self.fingerprint, "versions": self.versions,
                "positions": self.positions, "labels": list(self.labels), "source": self.source, "alias": self.alias}

    def seal(self) -> dict[str, Any]:
        """The ``extra_args[PINS_KEY]`` value, with a MAC made in this process."""
        body = self._body()
        return {**body, "seal": _mac(body)}

    @classmethod
    def unseal(cls, value: Any) -> "SteeringRequest | None":
        """The request sealed in this process, or None (absent, forged, or from a client)."""
        if not isinstance(value, dict) or not isinstance(value.get("seal"), str):
            return None
        body = {k: v for k, v in value.items() if k != "seal"}
        try:
            expected = _mac(body)
        except (TypeError, ValueError):
            return None
        if not hmac.compare_digest(expected, value["seal"]):
            return None
        return cls.from_engine(body)

    @classmethod
    def from_engine(cls, value: Any) -> "SteeringRequest | None":
        """Read back in the engine core or a worker, whose input comes from the front-end."""
        if not isinstance(value, dict):
            return None
        try:
            alias = value.get("alias")
            return cls(dict(value["spec"]), str(value["fingerprint"]), dict(value["versions"]),
                       str(value["positions"]), tuple(value.get("labels") or ()), str(value.get("source", "request")),
                       str(alias) if alias is not None else None)
        except (KeyError, TypeError, ValueError):
            return None

    # -- what the front-end derives ------------------------------------------------------------
    def cache_salt(self, client_salt: str | None, prompt_len: int) -> str:
        """A salt that separates steered KV by fingerprint (and prompt length where the rule
        depends on it); within vLLM's 128-character salt rules."""
        key = f"{client_salt or ''}\0{self.fingerprint}"
        if RULES[self.positions].prompt_relative:
            key += f"\0{prompt_len}"
        return SALT_PREFIX + hashlib.sha256(key.encode()).hexdigest()[:48]

    def describe(self) -> dict[str, Any]:
        """For the response headers and body (the process that resolved it)."""
        described = self.resolved.describe() if self.resolved is not None else {
            "fingerprint": self.fingerprint, "positions": self.positions}
        out = {**described, "source": self.source}
        if self.alias is not None:
            out["model"] = self.alias
        return out


def _mac(body: dict[str, Any]) -> str:
    data = json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()
    return hmac.new(_SECRET, data, "sha256").hexdigest()


def user_salt(salt: str | None) -> str | None:
    """An unsteered request's own salt, moved out of vsteer's namespace: fingerprints are
    public (response headers), so a client could otherwise send ``vsteer-<hash>`` and
    plant unsteered KV where steered requests will read it."""
    if salt is None or not salt.startswith(SALT_PREFIX):
        return salt
    return "user-" + hashlib.sha256(salt.encode()).hexdigest()[:48]


def without_vsteer_keys(extra: dict[str, Any] | None) -> dict[str, Any] | None:
    """A new dict (vLLM passes a request's own ``vllm_xargs`` as ``extra_args``) without the
    keys vsteer owns, or None when nothing is left."""
    if not extra:
        return None
    rest = {k: v for k, v in extra.items() if k not in CLIENT_KEYS}
    return rest or None


def with_steering(extra: dict[str, Any] | None, request: "SteeringRequest | None") -> dict[str, Any] | None:
    """``extra`` cleaned of client keys, with ``request`` sealed in (None: unsteered)."""
    rest = without_vsteer_keys(extra) or {}
    if request is not None:
        rest[PINS_KEY] = request.seal()
    return rest or None
