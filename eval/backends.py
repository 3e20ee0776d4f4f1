"""The two evaluation backends. Each answers only two questions, with the same
``SteeringSpec`` dicts the server and ``vllm.LLM`` take:

* ``logprobs(jobs)``: for each (spec, queries), the per-token log-probabilities of each
  query's continuation after its context, steered by spec;
* ``generate(jobs, max_new_tokens, stop_ids)``: greedy token ids per prompt, steered.

``HFBackend`` (``SpecInjector``) is the reference; ``VLLMBackend`` is the fast path
(per-request ``extra_args=steering(...)``). They agree up to float noise.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import torch

from vsteer.engine.registry import VectorRegistry
from vsteer.engine.resolver import SteeringResolver
from vsteer.engine.settings import Settings

from .inputs import Query, cut_at_stop

VECTORS_DIR_ENV = Settings.env_name("vectors_dir")

LogprobJob = tuple[dict[str, Any] | None, list[Query]]
GenerateJob = tuple[dict[str, Any] | None, list[list[int]]]


class HFBackend:
    """Reference backend: transformers forward passes and ``generate`` under ``SpecInjector``."""

    name = "hf"
    jobs_per_call = 1

    def __init__(self, model: Any, tokenizer: Any, registry: VectorRegistry, *, batch_size: int = 16):
        from vsteer.engine.layers import model_hidden_size, num_decoder_layers

        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.resolver = SteeringResolver(registry, hidden_size=model_hidden_size(model),
                                         num_layers=num_decoder_layers(model))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        self.device = next(model.parameters()).device

    def _injector(self, spec: dict[str, Any] | None):
        from vsteer.engine.inject import SpecInjector

        return SpecInjector(self.model, self.resolver.resolve(spec))

    def logprobs(self, jobs: Sequence[LogprobJob]) -> list[list[list[float]]]:
        out = []
        for spec, queries in jobs:
            with torch.inference_mode(), self._injector(spec):
                out.append(self._logprobs(queries))
        return out

    def _logprobs(self, queries: Sequence[Query]) -> list[list[float]]:
        # One forward per distinct sequence context + continuation[:-1] (single-token
        # continuations of one probe share their context's pass).
        seq_index: dict[tuple[int, ...], int] = {}
        for q in queries:
            if q.continuation:
                seq_index.setdefault(q.context + q.continuation[:-1], len(seq_index))
        seqs = list(seq_index)
        wanted: dict[int, list[tuple[int, list[int], list[int]]]] = {}
        results: list[list[float]] = [[] for _ in queries]
        for qi, q in enumerate(queries):
            if q.continuation:
                positions = [len(q.context) - 1 + j for j in range(len(q.continuation))]
                wanted.setdefault(seq_index[q.context + q.continuation[:-1]], []).append(
                    (qi, positions, list(q.continuation)))
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = max(len(seqs[i]) for i in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # right padding: real tokens keep positions 0..n-1
                ids[row, :len(seqs[i])] = torch.tensor(seqs[i])
                mask[row, :len(seqs[i])] = 1
            logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                use_cache=False).logits
            for row, i in enumerate(chunk):
                for qi, positions, tokens in wanted.get(i, []):
                    rows = logits[row, positions].float()
                    lp = rows[torch.arange(len(tokens)), torch.tensor(tokens)] - torch.logsumexp(rows, dim=-1)
                    results[qi] = [float(x) for x in lp]
        return results

    def generate(self, jobs: Sequence[GenerateJob], max_new_tokens: int, stop_ids: list[int]) -> list[list[list[int]]]:
        out = []
        for spec, prompts in jobs:
            with torch.inference_mode(), self._injector(spec):
                out.append(self._generate(prompts, max_new_tokens, stop_ids))
        return out

    def _generate(self, prompts: Sequence[list[int]], max_new_tokens: int, stop_ids: list[int]) -> list[list[int]]:
        results: list[list[int]] = [[] for _ in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            width = max(len(prompts[i]) for i in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.long)
            for row, i in enumerate(chunk):  # left padding for generation
                ids[row, width - len(prompts[i]):] = torch.tensor(prompts[i])
                mask[row, width - len(prompts[i]):] = 1
            gen = self.model.generate(input_ids=ids.to(self.device), attention_mask=mask.to(self.device),
                                      max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stop_ids,
                                      pad_token_id=self.pad_id)
            for row, i in enumerate(chunk):
                results[i] = cut_at_stop(gen[row, width:].tolist(), stop_ids)
        return results

    def close(self) -> None:
        pass


class VLLMBackend:
    """Fast path: one ``vllm.LLM`` with the vsteer plugin; each job's spec goes into
    ``SamplingParams.extra_args``; log-probabilities come from ``prompt_logprobs=0``."""

    name = "vllm"
    jobs_per_call = 8

    def __init__(self, model_path: str, registry_root: str, *, dtype: str = "auto", enforce_eager: bool = True,
                 max_model_len: int = 2048, seed: int = 0, trust_remote_code: bool = False):
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        from vsteer.extract.checkpoint import engine_dtype
        from vsteer.serving import set_vectors_dir

        dtype = engine_dtype(dtype, model_path, trust_remote_code=trust_remote_code)  # auto: the checkpoint's

        self._previous_dir = os.environ.get(VECTORS_DIR_ENV)
        set_vectors_dir(registry_root)
        from vllm import LLM

        self.llm = None
        try:
            self.llm = LLM(model_path, dtype=dtype, enforce_eager=enforce_eager, gpu_memory_utilization=0.3,
                           max_model_len=max_model_len, seed=seed, enable_prefix_caching=True,
                           trust_remote_code=trust_remote_code)
        except BaseException:
            self.close()
            raise

    @staticmethod
    def _extra(spec: dict[str, Any] | None) -> dict[str, Any] | None:
        from vsteer.serving import steering

        return steering(spec) if spec else None

    def logprobs(self, jobs: Sequence[LogprobJob]) -> list[list[list[float]]]:
        """Single-token continuations that share a context (probe words) go in one request
        with ``logprob_token_ids`` (the next-token log-probabilities of exactly those ids);
        anything longer is its own request with ``prompt_logprobs=0`` over context +
        continuation. Both are log-softmax of the raw logits, like the HF backend."""
        from vllm import SamplingParams

        by_ids = hasattr(SamplingParams(), "logprob_token_ids")  # vLLM >= 0.32
        prompts, params, where = [], [], []
        out: list[list[list[float]]] = [[[] for _ in queries] for _, queries in jobs]
        for j, (spec, queries) in enumerate(jobs):
            extra = self._extra(spec)
            single: dict[tuple[int, ...], list[int]] = {}
            for qi, q in enumerate(queries):
                if not q.continuation:
                    continue
                if by_ids and len(q.continuation) == 1:
                    single.setdefault(q.context, []).append(qi)
                    continue
                prompts.append({"prompt_token_ids": list(q.context + q.continuation)})
                params.append(SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False,
                                             extra_args=extra))
                where.append(("prompt", j, [qi]))
            for ctx, qis in single.items():
                ids = sorted({queries[qi].continuation[0] for qi in qis})
                for start in range(0, len(ids), 128):  # vLLM's MAX_LOGPROB_TOKEN_IDS
                    chunk = ids[start:start + 128]
                    prompts.append({"prompt_token_ids": list(ctx)})
                    params.append(SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=chunk,
                                                 detokenize=False, extra_args=extra))
                    where.append(("next", j, [qi for qi in qis if queries[qi].continuation[0] in chunk]))
        if prompts:
            for (kind, j, qis), res in zip(where, self.llm.generate(prompts, params, use_tqdm=False)):
                for qi in qis:
                    q = jobs[j][1][qi]
                    if kind == "next":
                        out[j][qi] = [float(res.outputs[0].logprobs[0][q.continuation[0]].logprob)]
                    else:
                        n = len(q.context)
                        out[j][qi] = [float(res.prompt_logprobs[n + k][tok].logprob)
                                      for k, tok in enumerate(q.continuation)]
        return out

    def generate(self, jobs: Sequence[GenerateJob], max_new_tokens: int, stop_ids: list[int]) -> list[list[list[int]]]:
        from vllm import SamplingParams

        prompts, params, where = [], [], []
        for j, (spec, job_prompts) in enumerate(jobs):
            sp = SamplingParams(max_tokens=max_new_tokens, temperature=0.0, stop_token_ids=stop_ids,
                                detokenize=False, extra_args=self._extra(spec))
            for pi, ids in enumerate(job_prompts):
                prompts.append({"prompt_token_ids": list(ids)})
                params.append(sp)
                where.append((j, pi))
        out: list[list[list[int]]] = [[[] for _ in p] for _, p in jobs]
        for (j, pi), res in zip(where, self.llm.generate(prompts, params, use_tqdm=False)):
            out[j][pi] = cut_at_stop(res.outputs[0].token_ids, stop_ids)
        return out

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:
                pass

        if getattr(self, "_previous_dir", None) is None:
            os.environ.pop(VECTORS_DIR_ENV, None)
        else:
            os.environ[VECTORS_DIR_ENV] = self._previous_dir
