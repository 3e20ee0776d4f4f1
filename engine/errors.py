"""The errors vsteer raises for bad input, in one place so callers can catch them.

Each carries what a server needs to answer a client: ``SteeringError`` has the request
``field`` and a machine-readable ``reason`` (also the label of the rejection metric).
"""

from __future__ import annotations


class VectorFileError(ValueError):
    """A vector file is missing, malformed, tampered with, or made for another model."""


class VersionGoneError(VectorFileError):
    """A pinned version of a registry set is neither current nor kept any more."""


class UnknownVectorError(KeyError):
    """A name that is not in the registry. ``str()`` lists (some of) the known names."""

    def __init__(self, name: str, known: list[str]):
        self.name, self.known = name, known
        super().__init__(name)

    def __str__(self) -> str:
        shown = ", ".join(self.known[:50]) or "(none)"
        more = f" and {len(self.known) - 50} more" if len(self.known) > 50 else ""
        return f"unknown steering vector {self.name!r}; known vectors: {shown}{more}"


class SteeringError(ValueError):
    """Invalid steering: ``field`` names the offending part (e.g. ``steering.vectors[1].name``),
    ``reason`` is a short code from ``REJECTION_REASONS``."""

    def __init__(self, message: str, field: str = "steering", reason: str = "invalid"):
        self.field, self.reason, self.message = field, reason, message
        super().__init__(f"{field}: {message}")
