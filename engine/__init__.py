"""vsteer.engine: steering vectors, vector files, the registry, per-request specs and HF
injection. The bottom layer: it imports nothing from extract, eval or serving."""

from .errors import SteeringError, UnknownVectorError, VectorFileError, VersionGoneError
from .formats import (
    FORMATS,
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
from .positions import POSITIONS
from .registry import VectorRegistry
from .resolver import ResolvedSteering, SteeringResolver, encode_inline
from .spec import SteeringSpec, VectorRef
from .vectors import LAYER_CONVENTION, LAYER_CONVENTION_DOC, SteeringVector, SteeringVectorSet
from .version import __version__

__all__ = [
    "ActivationInjector", "FORMATS", "LAYER_CONVENTION", "LAYER_CONVENTION_DOC", "MultiVectorInjector",
    "POSITIONS", "ResolvedSteering", "SpecInjector", "SteeringError", "SteeringHooks", "SteeringResolver",
    "SteeringSpec", "SteeringVector", "SteeringVectorSet", "UnknownVectorError", "VectorFileError", "VectorRef",
    "VectorRegistry", "VersionGoneError", "__version__", "component_module", "encode_inline",
    "find_decoder_layers", "load_any", "load_control_vector_gguf", "load_seed_format", "load_vector_set",
    "save_control_vector_gguf", "save_seed_format", "save_vector_set",
]
