"""Greedy few tokens on the tiny Llama with whatever vLLM this interpreter has (no vsteer)."""
import json, os, sys, time

if __name__ == "__main__":
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    from vsteer.engine.models import build_tiny_llama
    from vllm import LLM, SamplingParams
    import vllm
    path = str(build_tiny_llama())
    t0 = time.time()
    llm = LLM(path, enforce_eager=os.environ.get("EAGER", "1") == "1", gpu_memory_utilization=0.3,
              max_model_len=256, max_num_seqs=8, dtype="float32", seed=0)
    runner = None
    try:
        runner = llm.llm_engine.model_executor.driver_worker.worker.model_runner
    except Exception:
        pass
    print("STARTED", vllm.__version__, f"{time.time() - t0:.0f}s", type(runner).__module__ if runner else "?",
          type(runner).__name__ if runner else "?", flush=True)
    prompts = ["Hello, my name is", "The capital of France is", "1 2 3 4"]
    outs = llm.generate(prompts, SamplingParams(max_tokens=8, temperature=0.0))
    res = [list(o.outputs[0].token_ids) for o in outs]
    print("TOKENS", json.dumps(res), flush=True)
    if len(sys.argv) > 1:
        json.dump({"version": vllm.__version__, "tokens": res}, open(sys.argv[1], "w"))
