"""What an operator reads on /metrics (issue 20 #11, issue 21): with several API servers,
worker counters at most a few seconds old on any scrape; per-engine worker series; the
build info; request latency steered and unsteered. The puller runs against a stand-in
engine client (the real two-server path: tests/test_scale_out.py)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time

import pytest
from prometheus_client import REGISTRY

from vsteer.serving import metrics

MODEL = "freshness-test-model"


@pytest.fixture()
def model_name(monkeypatch):
    monkeypatch.setattr(metrics, "_model_name", MODEL)
    monkeypatch.setattr(metrics, "_runner", "unknown")
    monkeypatch.setattr(metrics, "_build_labels", None)
    return MODEL


class _Engine:
    """The two members the puller uses: ``collective_rpc`` (one worker) and ``errored``."""

    vllm_config = None
    errored = False

    def __init__(self) -> None:
        self.pulls, self.steps, self.busy = 0, 0, False

    async def collective_rpc(self, method: str):
        self.pulls += 1
        if self.busy:
            self.steps += 3
        return [{"steps": self.steps, "steered_tokens": 2 * self.steps, "configs_per_step": []}]


def _value(name: str, **labels) -> float:
    return REGISTRY.get_sample_value(name, {"model_name": MODEL, **labels}) or 0.0


def test_the_default_staleness_bound_is_a_few_seconds():
    from vsteer.engine.settings import parse_env

    assert 0 < parse_env({}).metrics_refresh_s <= 5


def test_the_background_pull_runs_while_requests_come_and_stops_when_idle(model_name):
    engine, puller = _Engine(), metrics.WorkerStatsPuller()

    async def main() -> tuple[int, int, int]:
        engine.busy = True
        puller.start_background(engine, 0.1)  # a request arrived
        await asyncio.sleep(0.6)
        busy_pulls = engine.pulls
        engine.busy = False  # the last request finished: one more pull reads its tokens, then quiet
        await asyncio.sleep(0.5)
        settled = engine.pulls
        await asyncio.sleep(0.6)
        idle = engine.pulls - settled
        puller.start_background(engine, 0.1)  # a new request wakes it
        await asyncio.sleep(0.35)
        return busy_pulls, idle, engine.pulls - settled

    busy_pulls, idle, woken = asyncio.run(main())
    assert busy_pulls >= 3, busy_pulls
    assert idle == 0, "an idle engine was pulled every interval"
    assert woken >= 1
    assert _value("vsteer_steered_tokens_total", engine="0") == 2 * engine.steps  # every token counted


@pytest.mark.timeout(240)
def test_requests_at_another_api_server_keep_the_pull_going(model_name, monkeypatch, tmp_path):
    """Only the first API server pulls; another one that gets the traffic says so through
    the multiprocess directory they share, and its scrapes then read fresh counters."""
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    engine, puller = _Engine(), metrics.WorkerStatsPuller()

    async def main() -> tuple[int, int]:
        puller.start_background(engine, 0.1)
        await asyncio.sleep(0.8)  # pulled, then idle
        quiet = engine.pulls
        await asyncio.sleep(0.4)
        assert engine.pulls == quiet
        engine.busy = True
        await asyncio.to_thread(subprocess.run, [sys.executable, "-c", (
            "from vsteer.serving import metrics; metrics.note_activity()")], check=True, timeout=120)
        await asyncio.sleep(0.4)
        return quiet, engine.pulls

    quiet, after = asyncio.run(main())
    assert after > quiet, "the other API server's requests did not trigger a pull"


def test_worker_series_carry_the_engine_label(model_name):
    puller = metrics.WorkerStatsPuller()
    before = {e: _value("vsteer_steps_total", engine=e) for e in ("0", "1")}
    puller.apply([("0", [{"steps": 4}]), ("1", [{"steps": 7}, {"steps": 7}])])  # engine 1 has two TP ranks
    puller.apply([("0", [{"steps": 5}]), ("1", [{"steps": 9}, {"steps": 9}])])
    assert _value("vsteer_steps_total", engine="0") - before["0"] == 5
    assert _value("vsteer_steps_total", engine="1") - before["1"] == 9  # the first rank only


def test_data_parallel_engines_are_labelled_by_rank(model_name):
    class Core:
        core_engines = [(0).to_bytes(2, "little"), (1).to_bytes(2, "little")]

        async def call_utility_all_async(self, *args):
            return [[{"steps": 1}], [{"steps": 2}]]

    client = type("Client", (), {"engine_core": Core()})()
    assert asyncio.run(metrics._gather(client, 5)) == [("0", [{"steps": 1}]), ("1", [{"steps": 2}])]


def test_build_info_names_version_vllm_and_runner(model_name):
    from vsteer.engine.version import __version__

    def series() -> list[dict]:
        return [s.labels for m in REGISTRY.collect() if m.name == "vsteer_build_info" for s in m.samples
                if s.labels["model_name"] == MODEL and s.value == 1]

    metrics.set_model_name(MODEL)
    assert [s["runner"] for s in series()] == ["unknown"]
    metrics.set_runner("v1")
    (only,) = series()
    assert only["runner"] == "v1" and only["version"] == __version__ and only["vllm_version"] not in ("", None)
    assert not [m for m in REGISTRY.collect() if m.name == "vsteer_build_info"
                for s in m.samples if s.labels.get("model_name") == MODEL and s.labels["runner"] == "unknown"]


def test_request_latency_is_split_steered_and_unsteered(model_name):
    before = {s: _value("vsteer_request_duration_seconds_count", steered=s) for s in ("true", "false")}
    metrics.observe_request_latency(True, 0.3)
    metrics.observe_request_latency(True, 0.4)
    metrics.observe_request_latency(False, 0.2)
    assert _value("vsteer_request_duration_seconds_count", steered="true") - before["true"] == 2
    assert _value("vsteer_request_duration_seconds_count", steered="false") - before["false"] == 1
    assert _value("vsteer_request_duration_seconds_bucket", steered="true", le="0.5") >= 2
