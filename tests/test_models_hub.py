"""Models as users name them: Hub ids through an offline Hugging Face cache (extract and
serve), clean errors for ids that are not there, and bf16 extraction close to fp32."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

REPO = "vsteer-test/tiny-llama"
REVISION = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def hub_env(tiny_model_path, tmp_path_factory):
    """An HF_HOME whose hub cache holds the tiny model as ``vsteer-test/tiny-llama`` (the
    layout huggingface_hub writes: models--org--name/{refs/main, snapshots/<rev>/})."""
    home = tmp_path_factory.mktemp("hf-home")
    repo = home / "hub" / ("models--" + REPO.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    snapshot.mkdir(parents=True)
    for f in os.listdir(tiny_model_path):
        if not f.startswith("."):
            shutil.copy(os.path.join(tiny_model_path, f), snapshot / f)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)
    return {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def _vsteer(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "vsteer.cli.main", *args], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_extract_by_hub_id_offline(hub_env, tiny_model_path, tmp_path):
    from vsteer.engine import load_vector_set

    by_id = _vsteer(["extract", "--model", REPO, "--pairs", "sentiment", "--layers", "1,2", "--out",
                     str(tmp_path / "by-id"), "--no-progress", "--dtype", "float32"], hub_env)
    assert by_id.returncode == 0, by_id.stderr[-2000:]
    pinned = _vsteer(["extract", "--model", REPO, "--revision", REVISION, "--pairs", "sentiment", "--layers", "1",
                      "--out", str(tmp_path / "pinned"), "--no-progress"], hub_env)
    assert pinned.returncode == 0, pinned.stderr[-2000:]
    local = _vsteer(["extract", "--model", tiny_model_path, "--pairs", "sentiment", "--layers", "1,2", "--out",
                     str(tmp_path / "local"), "--no-progress", "--dtype", "float32"], hub_env)
    assert local.returncode == 0, local.stderr[-2000:]
    a, b = load_vector_set(tmp_path / "by-id"), load_vector_set(tmp_path / "local")
    assert all(torch.equal(a.vectors[layer], b.vectors[layer]) for layer in (1, 2))


def test_unknown_hub_id_is_one_clean_line(hub_env, tmp_path):
    out = _vsteer(["extract", "--model", "nobody/nothing", "--pairs", "sentiment", "--layers", "1", "--out",
                   str(tmp_path / "x")], hub_env, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert out.stderr.strip().count("\n") == 0 and "nobody/nothing" in out.stderr and "HF_HUB_OFFLINE=1" in out.stderr
    out = _vsteer(["serve", "nobody/nothing", "--port", "1"], hub_env, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr and "nobody/nothing" in out.stderr


@pytest.mark.vllm
@pytest.mark.server
def test_serve_by_hub_id_offline(hub_env, tmp_path):
    import httpx

    from test_server import _free_port  # the server tests' helpers

    port = _free_port()
    env = {**hub_env, "VLLM_CPU_KVCACHE_SPACE": "1"}
    log = tmp_path / "server.log"  # a file, not a pipe: a pipe nobody reads fills and stalls the server
    with log.open("w") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "vsteer.cli.main", "serve", REPO, "--revision", REVISION,
                                 "--vectors", str(tmp_path / "vectors"), "--host", "127.0.0.1", "--port", str(port),
                                 "--enforce-eager", "--gpu-memory-utilization", "0.3", "--max-model-len", "512",
                                 "--dtype", "float32"], env=env, stdout=sink, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert proc.poll() is None, log.read_text(errors="replace")[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(1)
        models = httpx.get(f"{url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == [REPO]
        from vsteer.engine import encode_inline

        spec = {"vectors": [{"name": "mine", "strength": 2.0, "data": {"1": encode_inline(torch.ones(128))}}]}
        r = httpx.post(f"{url}/v1/completions", json={"model": REPO, "prompt": "Hello", "max_tokens": 3,
                                                     "steering": spec}, timeout=120)
        assert r.status_code == 200 and r.json()["steering"]["vectors"][0]["inline"] is True, r.text
    finally:
        proc.terminate()
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_bf16_extraction_stays_close_to_fp32(tiny_model_path):
    """Statistics accumulate in float64 whatever the model computes in: bf16 vectors keep a
    cosine >= 0.999 with fp32 ones on every layer (the documented tolerance)."""
    from vsteer.engine.models import load_hf
    from vsteer.extract import ContrastPairDataset, extract_caa

    pairs = ContrastPairDataset.from_bundled("sentiment")
    sets = {}
    for dtype in ("float32", "bfloat16"):
        model, tok = load_hf(tiny_model_path, dtype=dtype)
        assert next(model.parameters()).dtype == getattr(torch, dtype)
        sets[dtype] = extract_caa(model, tok, pairs, layers="all", token_position="mean", progress=False)
    for layer in sets["float32"].layers:
        cos = torch.nn.functional.cosine_similarity(sets["float32"].vectors[layer], sets["bfloat16"].vectors[layer],
                                                    dim=0)
        assert cos >= 0.999, (layer, float(cos))
    assert json.dumps(sets["bfloat16"].params["model_dtype"]) == '"bfloat16"'


def test_dtype_auto_keeps_the_checkpoint_dtype(tiny_model_path):
    from vsteer.engine.models import load_hf

    model, _ = load_hf(tiny_model_path, dtype="auto")
    assert next(model.parameters()).dtype == torch.float32  # the tiny checkpoint is saved in float32
