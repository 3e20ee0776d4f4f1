"""Shared fixtures: locally built models (no hub), cached for the whole test run."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    """Opt-in checks (``@pytest.mark.opt_in("ROUTER_CHECK")``: longer than CI's budget allows,
    run by their own ``make`` target) are deselected, not skipped, unless their variable is
    1: ``make test`` reports only tests that ran. Tests on the session's shared SmolLM2
    server run together at the end (its engine is started once, late, and holds no memory
    or CPU while the other engines run), and the ones that stop it run last. The sort is
    stable: file order otherwise."""
    def opted_out(item) -> bool:
        marker = item.get_closest_marker("opt_in")
        return marker is not None and os.environ.get(marker.args[0]) != "1"

    dropped = [item for item in items if opted_out(item)]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if not opted_out(item)]

    def key(item) -> tuple[bool, bool]:
        return ("smollm2_server" in getattr(item, "fixturenames", ()),
                item.get_closest_marker("stops_shared_server") is not None)

    items.sort(key=key)


@pytest.fixture(scope="session")
def tiny_model_path() -> str:
    from vsteer.engine.models import build_tiny_llama

    return str(build_tiny_llama())


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    from vsteer.engine.models import prepare_smollm2

    return str(prepare_smollm2())


@pytest.fixture(scope="session")
def tiny_hf(tiny_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    return model, tok


SENTIMENT_LAYERS = [8, 10, 12]


@pytest.fixture(scope="session")
def smollm2_hf(smollm2_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_path)
    model = AutoModelForCausalLM.from_pretrained(smollm2_path, dtype=torch.float32).eval()
    return model, tok


@pytest.fixture(scope="session")
def smollm2_vectors(smollm2_hf, tmp_path_factory):
    """A registry holding a sentiment vector set extracted from the bundled pairs
    (positive = loving, negative = hateful texts) at three middle layers of SmolLM2."""
    from vsteer.engine import VectorRegistry
    from vsteer.extract import ContrastPairDataset, extract_caa

    model, tok = smollm2_hf
    pairs = ContrastPairDataset.from_bundled("sentiment")
    vs = extract_caa(model, tok, pairs, layers=SENTIMENT_LAYERS, token_position="mean", batch_size=16,
                     progress=False, behaviour="sentiment", model_id="smollm2-135m-instruct")
    reg = VectorRegistry(tmp_path_factory.mktemp("smollm2-vectors"))
    reg.add("sentiment", vs)
    return reg


@pytest.fixture(scope="session")
def smollm2_server(tmp_path_factory, smollm2_path):
    """One real `vsteer serve` on SmolLM2 for the session (tests/served.py)."""
    pytest.importorskip("httpx")
    pytest.importorskip("openai")
    pytest.importorskip("vllm")
    from served import seed_registry, start_server, stop_server

    root = tmp_path_factory.mktemp("server")
    seed_registry(root / "vectors")
    srv = start_server(root, extra_args=["--steered-model", "cheerful=happy:4"])
    try:
        yield srv
    finally:
        stop_server(srv)
