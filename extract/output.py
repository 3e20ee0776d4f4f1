"""Where a written vector set goes: a plain directory, or a vector registry's entry.

``--out vectors/sentiment`` often names an entry of a registry that a server reads
(``engine/registry.py``): ``vectors/sentiment`` is then a symlink to an immutable version
directory ``vectors/.versions/sentiment/<sha256>``. Writing through that symlink would
change a version in place (pinned requests would read other tensors than the hash they
were promised) and the next prune would delete it. So a destination inside a registry is
written with ``VectorRegistry.add``: a new version and one atomic swap of the name.

A directory is a registry when it holds the registry's ``.versions`` folder. The
destination may be ``<root>/<name>`` (live or new), or a path inside
``<root>/.versions/<name>/...`` (someone followed the symlink): both mean ``<name>``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from vsteer.engine.formats import save_vector_set
from vsteer.engine.registry import VERSIONS_DIR, VectorRegistry, check_name
from vsteer.engine.vectors import SteeringVectorSet


@dataclass(frozen=True)
class Destination:
    """Where ``path`` writes: ``registry`` root and ``name``, or a plain directory."""

    path: Path
    registry: Path | None = None
    name: str | None = None


def is_registry(root: Path) -> bool:
    return (root / VERSIONS_DIR).is_dir()


def destination(out: str | os.PathLike) -> Destination:
    """Classify ``out`` (see the module doc); nothing is written."""
    path = Path(out).expanduser()
    parent = path.absolute().parent
    if is_registry(parent) and path.name != VERSIONS_DIR:
        return Destination(path, parent, check_name(path.name))
    real = path.resolve()
    for anc in real.parents:  # <root>/.versions/<name>/<sha>[/...]
        if anc.name == VERSIONS_DIR and is_registry(anc.parent):
            rel = real.relative_to(anc).parts
            if rel:
                return Destination(path, anc.parent, check_name(rel[0]))
    return Destination(path)


def write_vector_set(vs: SteeringVectorSet, out: str | os.PathLike) -> Destination:
    """Write ``vs`` to ``out``: through the registry when ``out`` is in one (a new version,
    an atomic swap), else as a plain directory (replaced if it holds a set)."""
    dest = destination(out)
    if dest.registry is not None and dest.name is not None:
        VectorRegistry(dest.registry).add(dest.name, vs, overwrite=True)
    else:
        save_vector_set(vs, dest.path, overwrite=True)
    return dest


def describe(dest: Destination) -> str:
    if dest.registry is None:
        return str(dest.path)
    return f"{dest.registry / str(dest.name)} (vector registry {dest.registry}: new version of {dest.name!r})"
