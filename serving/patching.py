"""The mechanism behind vsteer's vLLM patches: wrap a target once, check it first.

vsteer is an out-of-tree plugin: like vLLM's own LoRA support hooks its model runner, it
wraps a few vLLM methods. A ``Patch`` names one target and its wrapper; ``problems``
checks that every target exists with the parameters the wrapper relies on (so a vLLM
that moved something fails loudly at load, never as a silent no-op); ``wrap`` applies a
wrapper once per owner and attribute. The table of what vsteer patches is
``vsteer.serving.vllm_patches``.
"""

from __future__ import annotations

import importlib
import inspect
import sys
from dataclasses import dataclass
from typing import Any, Iterable

@dataclass(frozen=True)
class Patch:
    """Wrap ``target`` (``"module:Owner.attr"`` or ``"module:attr"``) with ``wrapper(original)``.

    ``params``: leading parameter names the wrapper relies on (checked at load).
    ``add``: instead of wrapping, add this attribute (it must not exist yet).
    ``also_bound_in``: other modules that imported the same function object by name
    (``from x import f``); the name is replaced there too.
    ``optional``: a missing target is skipped (features vLLM may not have).
    ``api_server_only``: applied only in processes that build vLLM's HTTP app.
    """

    target: str
    wrapper: str
    params: tuple[str, ...] = ()
    add: bool = False
    also_bound_in: tuple[str, ...] = ()
    optional: bool = False
    api_server_only: bool = False


# (id(owner), attr) -> (original, replacement): what ``apply`` did, so it is idempotent.
_APPLIED: dict[tuple[int, str], tuple[Any, Any]] = {}


def resolve_target(target: str) -> tuple[Any, str]:
    """(owner, attribute) of ``module:Owner.attr``; raises ``LookupError`` naming the gap."""
    module_name, _, path = target.partition(":")
    try:
        owner: Any = importlib.import_module(module_name)
    except ImportError as e:
        raise LookupError(f"module {module_name} ({e})") from None
    *owners, attr = path.split(".")
    for name in owners:
        if not hasattr(owner, name):
            raise LookupError(f"{module_name}.{'.'.join(owners)} (no {name})")
        owner = getattr(owner, name)
    return owner, attr


def load(ref: str) -> Any:
    module_name, _, name = ref.partition(":")
    return getattr(importlib.import_module(module_name), name)


def original_of(owner: Any, attr: str) -> Any:
    """The unwrapped target (the same after ``apply`` ran)."""
    done = _APPLIED.get((id(owner), attr))
    return done[0] if done else getattr(owner, attr)


def problems(patches: Iterable[Patch], *, api_server: bool = True) -> list[str]:
    """What is missing or changed in this vLLM for each patch (empty: all fine)."""
    out = []
    for p in patches:
        if p.api_server_only and not api_server:
            continue
        try:
            owner, attr = resolve_target(p.target)
        except LookupError as e:
            if not p.optional:
                out.append(f"{p.target}: missing {e}")
            continue
        if p.add:
            if hasattr(owner, attr) and (id(owner), attr) not in _APPLIED:
                out.append(f"{p.target}: already exists (vsteer would shadow it)")
            continue
        if not hasattr(owner, attr):
            if not p.optional:
                out.append(f"{p.target}: missing")
            continue
        if p.params:
            try:
                names = list(inspect.signature(original_of(owner, attr)).parameters)
            except (TypeError, ValueError):
                continue
            if names[:len(p.params)] != list(p.params):
                out.append(f"{p.target}: parameters {names[:len(p.params)]} differ from {list(p.params)}")
    return out


def missing_refs(refs: Iterable[str]) -> list[str]:
    """The ``module:name`` references that do not exist (names vsteer calls, not patches)."""
    out = []
    for ref in refs:
        try:
            owner, attr = resolve_target(ref)
        except LookupError as e:
            out.append(f"{ref}: missing {e}")
            continue
        if not hasattr(owner, attr):
            out.append(f"{ref}: missing")
    return out


def wrap(owner: Any, attr: str, replacement: Any, *, also_bound_in: tuple[str, ...] = ()) -> None:
    """Set ``owner.attr`` to ``replacement`` once (idempotent per owner and attribute)."""
    key = (id(owner), attr)
    if key in _APPLIED:
        return
    original = getattr(owner, attr, None)
    setattr(owner, attr, replacement)
    _APPLIED[key] = (original, replacement)
    for name in also_bound_in:
        module = sys.modules.get(name)
        if module is not None and original is not None and getattr(module, attr, None) is original:
            setattr(module, attr, replacement)



def missing_fields(obj: Any, paths: Iterable[str]) -> list[str]:
    """The dotted attribute paths ``obj`` lacks."""
    missing = []
    for path in paths:
        cur: Any = obj
        for part in path.split("."):
            if not hasattr(cur, part):
                missing.append(path)
                break
            cur = getattr(cur, part)
    return missing


def check_fields(runner: Any, paths: Iterable[str]) -> None:
    """The model-runner state a runner adapter reads each step must exist (checked at model load)."""
    missing = missing_fields(runner, paths)
    if missing:
        from .compat import UnsupportedVLLMError, vllm_version

        raise UnsupportedVLLMError(f"vsteer reads model-runner fields that vLLM {vllm_version()} does not have: "
                                   f"{', '.join(missing)} ({type(runner).__name__}). Use a supported vLLM "
                                   "(docs/vllm.md) or set VSTEER_DISABLE=1.")
