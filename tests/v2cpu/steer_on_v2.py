"""Run by tests/test_vllm_v2.py in its own process: vLLM's Model Runner V2 on this CPU
(Triton's interpreter, scripts/v2cpu), with vsteer on, a mixed steered batch on the tiny
model. Prints one JSON line: the runner's class, vsteer's adapter, and every output's
tokens and first-token logprobs."""

import json
import sys

if __name__ == "__main__":
    model_path, vectors, specs_file = sys.argv[1:4]
    from vllm import LLM, SamplingParams

    from vsteer.serving import set_vectors_dir, steering

    set_vectors_dir(vectors)
    specs = json.loads(open(specs_file).read())
    llm = LLM(model_path, dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=256,
              max_num_batched_tokens=32, max_num_seqs=8, enable_chunked_prefill=True, enable_prefix_caching=True,
              seed=0)
    params = [SamplingParams(max_tokens=s["tokens"], temperature=0.0, ignore_eos=True, logprobs=5,
                             extra_args=steering(s["spec"]) if s["spec"] is not None else None) for s in specs]
    outs = llm.generate([{"prompt_token_ids": s["ids"]} for s in specs], params, use_tqdm=False)
    stats = llm.collective_rpc("vsteer_stats")
    runner = llm.llm_engine.vllm_config.use_v2_model_runner
    print("RESULT " + json.dumps({
        "use_v2_model_runner": bool(runner), "adapters": [s.get("runner") for s in stats],
        "steered_tokens": sum(s.get("steered_tokens", 0) for s in stats[:1]),
        "outputs": [{"tokens": list(o.outputs[0].token_ids), "finish": o.outputs[0].finish_reason,
                     "first": {str(k): v.logprob for k, v in o.outputs[0].logprobs[0].items()}} for o in outs]}),
          flush=True)
