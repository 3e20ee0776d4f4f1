"""The package layers (docs/architecture.md): a lower layer never imports a higher one.

    engine   <- extract <- eval <- cli
    engine   <- serving <- eval
                serving <- cli

Every import counts, including the ones inside functions (lazy imports are still
dependencies). Third-party imports are not checked here.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = {"engine": "engine", "extract": "extract", "eval": "eval", "serving": "serving", "cli": "cli"}
ALLOWED: dict[str, set[str]] = {
    "engine": {"engine"},
    "extract": {"engine", "extract"},
    "serving": {"engine", "serving"},
    "eval": {"engine", "extract", "serving", "eval"},
    "cli": {"engine", "extract", "serving", "eval", "cli"},
}


def _module_name(path: Path, package: str) -> list[str]:
    rel = path.relative_to(ROOT / PACKAGES[package]).with_suffix("")
    parts = [p for p in rel.parts if p != "__init__"]
    return ["vsteer", package, *parts]


def imported_packages(path: Path, package: str, source: str | None = None) -> set[tuple[str, int]]:
    """(vsteer sub-package, line) of every import in ``path``, relative ones resolved."""
    tree = ast.parse(path.read_text() if source is None else source, str(path))
    here = _module_name(path, package)
    is_pkg = path.name == "__init__.py"
    found = set()
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_pkg else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                names = [".".join(base + ([node.module] if node.module else []))]
            elif node.module:
                names = [node.module]
        for name in names:
            parts = name.split(".")
            if parts[0] == "vsteer" and len(parts) > 1:
                found.add((parts[1], node.lineno))
    return found


def test_no_lower_layer_imports_a_higher_one():
    violations = []
    for package, folder in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            for target, line in sorted(imported_packages(path, package)):
                if target not in ALLOWED[package]:
                    violations.append(f"{path.relative_to(ROOT)}:{line}: {package} imports vsteer.{target}")
    assert not violations, "layering violations (docs/architecture.md):\n" + "\n".join(violations)


def test_the_checker_sees_violations():
    """The check above is only worth something if it can fail."""
    source = "def f():\n    from vsteer.serving import steering\n    from ..extract import caa\n"
    found = imported_packages(ROOT / "engine" / "probe.py", "engine", source)
    assert ("serving", 2) in found and ("extract", 3) in found


def test_no_module_is_over_about_400_lines():
    long = []
    for folder in PACKAGES.values():
        for path in (ROOT / folder).rglob("*.py"):
            n = len(path.read_text().splitlines())
            if n > 420:
                long.append(f"{path.relative_to(ROOT)}: {n} lines")
    assert not long, "split these modules (one job each):\n" + "\n".join(long)
