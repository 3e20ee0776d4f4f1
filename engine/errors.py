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
        if reason not in REJECTION_REASONS:
            reason = "invalid"
        self.field, self.reason, self.message = field, reason, message
        super().__init__(f"{field}: {message}")


REJECTION_REASONS: dict[str, str] = {
    # the shape of the request
    "invalid_value": "a field holds a value outside what it accepts (positions, op, unit, empty lists, ...)",
    "wrong_type": "a field has the wrong JSON type",
    "missing_field": "a required field is absent (e.g. a vector without a name)",
    "unknown_field": "a field vsteer does not know (typos are refused, not ignored)",
    "invalid_name": "a vector name that is not a plain identifier (paths, '..', control characters)",
    "too_many_vectors": "more vectors than VSTEER_MAX_VECTORS",
    "non_finite_strength": "a NaN or infinite strength",
    "strength_out_of_bounds": "|strength| above VSTEER_MAX_STRENGTH",
    "invalid_op_combination": "fields that do not go together (ablate with a strength, norm=preserve on clamp)",
    # inline vectors
    "inline_too_large": "inline data over VSTEER_MAX_INLINE_BYTES per vector or VSTEER_MAX_REQUEST_INLINE_BYTES",
    "bad_inline_data": "inline data that is not base64 of float32",
    "unused_inline_layer": "inline data for a layer the vector's 'layers' does not apply",
    "non_finite_vector": "an inline vector holding NaN or infinite values",
    # against the model and the registry
    "no_registry": "a vector name on a server started without a vector directory",
    "unknown_vector": "a name that is not in the registry",
    "vector_version_gone": "the pinned content of a name is no longer on disk",
    "bad_vector_file": "a registry entry whose files are unreadable or tampered with",
    "wrong_hidden_size": "a vector whose size is not the model's hidden size",
    "unknown_layer": "a layer the vector set has no vector for",
    "layer_out_of_range": "a layer outside the model (or outside the steerable VSTEER_LAYERS)",
    "no_residual_norms": "unit=relative for a set extracted without residual norms",
    "zero_vector": "ablate or clamp of a zero vector (no direction)",
    "too_many_projections": "more ablate/clamp directions on one layer than VSTEER_MAX_PROJECTIONS",
    "conflicting_norm": "vectors on one layer disagree about norm=preserve",
    "non_finite_result": "strength x vector overflows in the model's dtype",
    # the server
    "unsupported_with_beam_search": "steering on a beam-search request (vLLM's beam search drops it)",
    "unsupported_route": "steering on a route vsteer does not steer (tokenize, /inference/v1/generate, ...)",
    "too_many_new_configs": "HTTP 429: more steering specs new to the server than the client's budget "
                            "(VSTEER_NEW_CONFIGS_PER_S, VSTEER_NEW_CONFIGS_BURST)",
    "registry_busy": "HTTP 503: the vector registry could not be read in time (a writer holds its lock); retry",
    "invalid": "anything else that makes the steering field unusable",
}
"""Every reason a request's steering can be refused for: the ``reason`` of ``SteeringError``,
the ``code`` of the HTTP 400 body and the ``reason`` label of
``vsteer_rejected_requests_total`` (a fixed set, so the label cannot explode)."""

_PYDANTIC_REASONS = {
    "extra_forbidden": "unknown_field", "finite_number": "non_finite_strength", "missing": "missing_field",
    "literal_error": "invalid_value", "string_pattern_mismatch": "invalid_name", "string_too_long": "invalid_name",
    "too_short": "invalid_value", "too_long": "too_many_vectors",
}


def reason_for_pydantic(error_type: str) -> str:
    """The rejection reason for a pydantic error type (ours are raised under their reason)."""
    if error_type in REJECTION_REASONS:
        return error_type
    if error_type in _PYDANTIC_REASONS:
        return _PYDANTIC_REASONS[error_type]
    if error_type.endswith(("_type", "_parsing")) or error_type in ("model_type", "dict_type", "list_type"):
        return "wrong_type"
    return "invalid"
