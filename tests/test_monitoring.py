"""The monitoring files against the real tools: a real Prometheus on 127.0.0.1 scrapes the
session's real `vsteer serve`, loads the alert rules, and evaluates every query of the
Grafana dashboard after steered and bad traffic (no errors; data where traffic went)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest

from served import MODEL, free_port
from test_deploy import ALERTS, dashboard_queries

pytestmark = [pytest.mark.server, pytest.mark.vllm, pytest.mark.smollm2]
ROOT = Path(__file__).resolve().parents[1]
SCRAPE_CONFIG = """
global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: [{rules}]
scrape_configs:
  - job_name: vsteer
    scrape_timeout: 1s
    static_configs:
      - targets: ["{target}"]
    metric_relabel_configs:   # as in deploy/monitoring/prometheus/prometheus.yml
      - source_labels: [__name__]
        regex: "vllm_(.+)"
        target_label: __name__
        replacement: "vllm:$1"
"""


@pytest.fixture(scope="module")
def prometheus(smollm2_server, tmp_path_factory):
    binary = shutil.which("prometheus")
    assert binary, "the `prometheus` binary is missing: apt-get install -y prometheus (.ci/run does)"
    import httpx

    root = tmp_path_factory.mktemp("prometheus")
    config = root / "prometheus.yml"
    config.write_text(SCRAPE_CONFIG.format(rules=str(ALERTS), target=smollm2_server.url.removeprefix("http://")))
    port = free_port()
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={root / 'data'}",
                             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                            stdout=subprocess.DEVNULL, stderr=(root / "log").open("wb"))
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (root / "log").read_text()[-2000:]
            try:
                if httpx.get(f"{url}/-/ready", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "prometheus did not start"
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(30)


def _query(url: str, expr: str) -> list:
    import httpx

    r = httpx.get(f"{url}/api/v1/query", params={"query": expr}, timeout=30)
    body = r.json()
    assert r.status_code == 200 and body["status"] == "success", (expr, body)
    return body["data"]["result"]


def test_dashboard_queries_and_rules_on_live_traffic(smollm2_server, prometheus):
    import httpx

    srv = smollm2_server
    for i in range(6):  # steered, unsteered and refused traffic
        body = {"model": MODEL, "prompt": f"Hello {i}", "max_tokens": 4}
        if i % 2 == 0:
            body["steering"] = {"vectors": [{"name": "formal", "strength": 2.0}], "positions": "generated"}
        assert httpx.post(f"{srv.url}/v1/completions", json=body, timeout=300).status_code == 200
    bad = {"model": MODEL, "prompt": "Hi", "max_tokens": 2, "steering": {"vectors": [{"name": "nope"}]}}
    assert httpx.post(f"{srv.url}/v1/completions", json=bad, timeout=60).status_code == 400
    deadline = time.monotonic() + 90  # wait until a scrape saw the steered tokens
    while not _query(prometheus, 'vsteer_steered_tokens_total > 0'):
        assert time.monotonic() < deadline, "prometheus never scraped the steered traffic"
        time.sleep(1)
    time.sleep(3)  # a few more scrapes, so rates over the window have two points

    targets = _query(prometheus, 'up{job="vsteer"}')
    assert targets and targets[0]["value"][1] == "1"
    queries = dashboard_queries()
    empty = [q for q in queries if not _query(prometheus, q)]
    # Every panel query evaluates; the ones about traffic that was sent return data.
    traffic = ("vsteer_requests_total", "vsteer_steered_tokens_total", "vsteer_rejected_requests_total",
               "vsteer_step_configs", "vsteer_table_build_seconds_total", "vsteer_registry_vectors",
               "vllm:num_requests_running", "vllm:generation_tokens_total")
    missing = [q for q in empty if any(name in q for name in traffic)]
    assert not missing, f"no data for: {missing}"
    assert len(empty) <= len(queries) // 3, f"too many empty panels: {empty}"
    by_reason = _query(prometheus, 'sum by (reason) (vsteer_rejected_requests_total{reason="unknown_vector"})')
    assert by_reason and float(by_reason[0]["value"][1]) >= 1
    steered = _query(prometheus, 'sum(vsteer_requests_total{steered="true", model_name="%s"})' % MODEL)
    assert steered and float(steered[0]["value"][1]) >= 3

    import httpx as _httpx

    rules = _httpx.get(f"{prometheus}/api/v1/rules", timeout=30).json()["data"]["groups"]
    loaded = [r for g in rules for r in g["rules"]]
    assert loaded and all(r["health"] == "ok" for r in loaded), [(r["name"], r.get("lastError")) for r in loaded]


def test_promtool_checks_the_rules():
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: apt-get install -y prometheus (.ci/run does)"
    tests = ALERTS.with_name(ALERTS.stem + ".test.yaml")
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(tests)]):
        out = subprocess.run([promtool, *args], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
