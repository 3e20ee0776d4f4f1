"""vsteer.engine: steering vectors, vector files, per-request specs and HF injection."""

from .formats import (
    VectorFileError,
    load_any,
    load_control_vector_gguf,
    load_seed_format,
    load_vector_set,
    save_control_vector_gguf,
    save_seed_format,
    save_vector_set,
)
from .inject import ActivationInjector, MultiVectorInjector, SpecInjector, SteeringHooks
from .layers import component_module, find_decoder_layers
from .registry import UnknownVectorError, VectorRegistry
from .spec import (
    POSITIONS,
    ResolvedSteering,
    SteeringError,
    SteeringResolver,
    SteeringSpec,
    VectorRef,
    encode_inline,
)
from .vectors import LAYER_CONVENTION, LAYER_CONVENTION_DOC, SteeringVector, SteeringVectorSet

__all__ = [
    "ActivationInjector", "LAYER_CONVENTION", "LAYER_CONVENTION_DOC", "MultiVectorInjector", "POSITIONS",
    "ResolvedSteering", "SpecInjector", "SteeringError", "SteeringHooks", "SteeringResolver", "SteeringSpec",
    "SteeringVector", "SteeringVectorSet", "UnknownVectorError", "VectorFileError", "VectorRef",
    "VectorRegistry", "component_module", "encode_inline", "find_decoder_layers", "load_any",
    "load_control_vector_gguf", "load_seed_format", "load_vector_set", "save_control_vector_gguf",
    "save_seed_format", "save_vector_set",
]
