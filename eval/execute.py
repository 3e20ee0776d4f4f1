"""Running conditions on a backend: the only place an evaluation touches a model.

A ``Session`` holds one backend (HF reference or vLLM), the tokenized held-out inputs
(plain and with the prompting baseline's system message) and a private registry with the
evaluated set and its random directions. ``run`` answers, for each condition and for the
chosen subset of inputs:

1. probe log-probabilities (log-probability behaviours),
2. greedy generations,
3. the generations' log-probabilities under the *unsteered, unprompted* model (the
   coherence reference is the same for steering and prompting: the plain chat turn).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from vsteer.engine.registry import VectorRegistry
from vsteer.engine.vectors import SteeringVectorSet

from . import scorers
from .backends import HFBackend, VLLMBackend
from .behaviours import Behaviour
from .inputs import Probe, Query, chat_ids, probe_queries, stop_token_ids
from .plan import TARGET, Condition


class Session:
    """One backend and the inputs of one evaluation (use as a context manager)."""

    def __init__(self, model_path: str, vs: SteeringVectorSet, randoms: Sequence[SteeringVectorSet],
                 beh: Behaviour, *, prompts: Sequence[str], probes: Sequence[Probe], max_new_tokens: int,
                 backend: str = "hf", hf_model: tuple[Any, Any] | None = None, batch_size: int = 16,
                 dtype: str = "auto", enforce_eager: bool = True, seed: int = 0, progress: bool = True,
                 trust_remote_code: bool = False):
        from transformers import AutoTokenizer

        self.beh, self.max_new_tokens, self.progress = beh, max_new_tokens, progress
        tok = hf_model[1] if hf_model is not None else AutoTokenizer.from_pretrained(
            model_path, **({"trust_remote_code": True} if trust_remote_code else {}))
        if tok.pad_token is None:
            tok.pad_token = tok.eos_token
        self.tokenizer = tok
        self.prompts, self.probes = list(prompts), list(probes)
        self._ids: dict[str | None, list[list[int]]] = {None: [chat_ids(tok, p) for p in self.prompts]}
        self._queries: dict[str | None, list[list[Query]]] = {None: probe_queries(tok, self.probes)}
        self.stops = stop_token_ids(tok, model_path)
        self.timing: dict[str, float] = {"behaviour_logprobs_s": 0.0, "generation_s": 0.0, "coherence_s": 0.0}
        self._root = Path(tempfile.mkdtemp(prefix="vsteer-eval-"))  # the specs' names resolve here
        self.be: Any = None
        try:
            registry = VectorRegistry(self._root)
            registry.add(TARGET, vs)
            for r in randoms:
                registry.add(r.behaviour, r)
            t0 = time.perf_counter()
            if backend == "hf":
                if hf_model is None:
                    from vsteer.engine.models import load_hf

                    hf_model = load_hf(model_path, dtype=dtype, trust_remote_code=trust_remote_code)
                self.be = HFBackend(hf_model[0], tok, registry, batch_size=batch_size)
            elif backend == "vllm":
                systems = [None, *beh.system_prompts]
                longest = max([len(q.context) + len(q.continuation) for s in systems for qs in self.queries(s)
                               for q in qs] + [len(p) for s in systems for p in self.prompt_ids(s)] + [1])
                self.be = VLLMBackend(model_path, str(self._root), dtype=dtype, enforce_eager=enforce_eager,
                                      max_model_len=max(1024, longest + max_new_tokens + 8), seed=seed,
                                      trust_remote_code=trust_remote_code)
            else:
                raise ValueError("backend must be 'hf' or 'vllm'")
            self.timing["backend_start_s"] = time.perf_counter() - t0
        except BaseException:
            self.close()
            raise

    @property
    def name(self) -> str:
        return self.be.name

    def system_of(self, c: Condition) -> str | None:
        """The system message a condition runs with (None: plain chat turn)."""
        if not c.prompted:
            return None
        text = c.system or self.beh.system_prompt
        if not text:
            raise ValueError(f"behaviour {self.beh.name!r} has no system prompt for the prompting baseline "
                             "(give --system-prompt TEXT, or --no-prompting)")
        return text

    def prompt_ids(self, system: str | None) -> list[list[int]]:
        if system not in self._ids:
            self._ids[system] = [chat_ids(self.tokenizer, p, system) for p in self.prompts]
        return self._ids[system]

    def queries(self, system: str | None) -> list[list[Query]]:
        if system not in self._queries:
            self._queries[system] = probe_queries(self.tokenizer, self.probes, system)
        return self._queries[system]

    def __enter__(self) -> "Session":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        if self.be is not None:
            self.be.close()
            self.be = None
        shutil.rmtree(self._root, ignore_errors=True)

    # -- running ------------------------------------------------------------------------
    def _batched(self, fn: Callable, items: list, jobs: list, bar: Any) -> list:
        results = []
        for start in range(0, len(jobs), self.be.jobs_per_call):
            results.extend(fn(jobs[start:start + self.be.jobs_per_call]))
            bar.update(len(jobs[start:start + self.be.jobs_per_call]))
        return list(zip(items, results))


    def run(self, conds: Sequence[Condition], prompt_idx: Sequence[int] | None = None,
            probe_idx: Sequence[int] | None = None, desc: str = "eval") -> None:
        """Fill each condition's ``result`` for the given prompt / probe subsets (default all)."""
        from tqdm.auto import tqdm

        conds = list(conds)
        systems = {id(c): self.system_of(c) for c in conds}
        gi = list(range(len(self.prompts))) if prompt_idx is None else list(prompt_idx)
        pi = list(range(len(self.probes))) if probe_idx is None else list(probe_idx)
        logprob = self.beh.kind == "logprob"
        lp_conds = conds if logprob else []
        gen_conds = [c for c in conds if c.scored] if logprob else conds
        scored = [c for c in conds if c.scored]
        bar = tqdm(total=len(lp_conds) + len(gen_conds) + len(scored), desc=f"{desc} {self.beh.name} [{self.name}]",
                   unit="config", disable=not self.progress)
        try:
            t0 = time.perf_counter()
            jobs = [(c.spec, [q for i in pi for q in self.queries(systems[id(c)])[i]]) for c in lp_conds]
            for c, res in self._batched(self.be.logprobs, lp_conds, jobs, bar):
                margins, k = [], 0
                for i in pi:
                    p = self.probes[i]
                    npos, nneg = len(p.positive), len(p.negative)
                    margins.append(scorers.probe_margin(res[k:k + npos], res[k + npos:k + npos + nneg]))
                    k += npos + nneg
                c.result["item_scores"] = margins
            self.timing["behaviour_logprobs_s"] += time.perf_counter() - t0

            t0 = time.perf_counter()
            jobs = [(c.spec, [self.prompt_ids(systems[id(c)])[i] for i in gi]) for c in gen_conds]
            gen = lambda js: self.be.generate(js, self.max_new_tokens, self.stops)  # noqa: E731
            for c, res in self._batched(gen, gen_conds, jobs, bar):
                c.result["tokens"] = res
                c.result["texts"] = [self.tokenizer.decode(t, skip_special_tokens=True) for t in res]
                c.result["prompts"] = [self.prompts[i] for i in gi]
            self.timing["generation_s"] += time.perf_counter() - t0

            t0 = time.perf_counter()
            plain = self.prompt_ids(None)
            jobs = [(None, [Query(tuple(plain[i]), tuple(t)) for i, t in zip(gi, c.result["tokens"])]) for c in scored]
            for c, res in self._batched(self.be.logprobs, scored, jobs, bar):
                c.result["unsteered_logprobs"] = res
            self.timing["coherence_s"] += time.perf_counter() - t0
        finally:
            bar.close()
        for c in conds:
            c.result["prompt_idx"], c.result["probe_idx"] = gi, (pi if logprob else [])
