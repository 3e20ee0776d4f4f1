"""vsteer.serving: per-request steering inside vLLM, and the OpenAI-compatible server.

Importing this package does not import vLLM; the plugin (``vsteer.serving.plugin``) is
loaded by vLLM itself through its ``vllm.general_plugins`` entry point.
"""

from vsteer.engine.version import __version__

from .api import set_vectors_dir, steering

__all__ = ["__version__", "set_vectors_dir", "steering"]
