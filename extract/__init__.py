"""vsteer.extract: contrast pairs -> steering vector sets (CAA, PCA), and layer choice."""

from .caa import collect_layer_stats, extract_caa
from .hooks import ActivationHook, StopForward, normalize_layers, stop_after_layer
from .layer_select import LayerScore, extract_auto, score_layers, score_vectors, top_layers
from .methods import METHODS, LayerStats, Method, get_method, register_method
from .pairs import ContrastPair, ContrastPairDataset, PairFileError, join_text, load_pairs
from .positions import TOKEN_POSITIONS, pool_tokens, token_norms
from .runner import PairBatch, iter_pair_batches, position_ids_from_mask

__all__ = [
    "ActivationHook", "ContrastPair", "ContrastPairDataset", "LayerScore", "LayerStats", "METHODS", "Method",
    "PairBatch", "PairFileError", "StopForward", "TOKEN_POSITIONS", "collect_layer_stats", "extract_auto",
    "extract_caa", "get_method", "iter_pair_batches", "join_text", "load_pairs", "normalize_layers",
    "pool_tokens", "position_ids_from_mask", "register_method", "score_layers", "score_vectors",
    "stop_after_layer", "token_norms", "top_layers",
]
