"""Extraction on the tiny random Llama: equality with an independent HF computation,
padding sides, one forward per batch, components, PCA, layer selection and the CLI."""

from __future__ import annotations

import json
from contextlib import contextmanager

import pytest
import torch

from vsteer.engine.layers import find_decoder_layers
from vsteer.engine.formats import load_vector_set
from vsteer.extract import (
    ActivationHook,
    ContrastPair,
    ContrastPairDataset,
    LayerStats,
    extract_caa,
    get_method,
    score_layers,
)

# Different lengths (so batches really pad) and different first tokens (so "first" is not 0).
PAIRS = [
    ContrastPair("I love it.", "Terrible, I hate this so much, never again."),
    ContrastPair("Wonderful day at the beach with friends and family, sunny and warm.", "Bad."),
    ContrastPair(" great", " awful and disappointing", "The food was"),
    ContrastPair("Yes!", "No, absolutely not, and I am quite upset about it."),
    ContrastPair("Happy people smile a lot when the weather is nice", "Sad."),
    ContrastPair("Brilliant work", "Sloppy, careless, late work that nobody could use", "Review:"),
    ContrastPair("A joy.", "A chore from start to finish, dull and slow."),
    ContrastPair("Thanks so much for all your help, it made my week!", "Whatever."),
    ContrastPair("Lovely", "Ugly, broken and overpriced"),
]


@contextmanager
def padding(tok, side: str):
    old = tok.padding_side
    tok.padding_side = side
    try:
        yield tok
    finally:
        tok.padding_side = old


def block_outputs(model, tok, text: str) -> dict[int, torch.Tensor]:
    """Independent reference: HF hidden_states[L + 1], one unpadded text at a time. HF's
    last entry has the final norm applied, so the last block's raw output is read as the
    final norm's input instead."""
    enc = tok(text, return_tensors="pt")
    captured = {}
    handle = model.model.norm.register_forward_pre_hook(lambda m, args: captured.setdefault("x", args[0]))
    try:
        with torch.no_grad():
            hs = model(**enc, output_hidden_states=True).hidden_states
    finally:
        handle.remove()
    n = len(find_decoder_layers(model))
    out = {layer: hs[layer + 1][0] for layer in range(n - 1)}
    out[n - 1] = captured["x"][0]
    return out


def pool(h: torch.Tensor, position: str) -> torch.Tensor:
    return {"last": h[-1], "first": h[0], "mean": h.mean(0)}[position]


@pytest.fixture(scope="module")
def reference(tiny_hf):
    model, tok = tiny_hf
    return [(block_outputs(model, tok, pos), block_outputs(model, tok, neg)) for pos, neg in
            (p.texts() for p in PAIRS)]


def reference_vector(reference, layer: int, position: str) -> torch.Tensor:
    pos = torch.stack([pool(p[layer], position) for p, _ in reference]).double().mean(0)
    neg = torch.stack([pool(n[layer], position) for _, n in reference]).double().mean(0)
    return (pos - neg).float()


@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("batch_size", [1, 7])
@pytest.mark.parametrize("position", ["last", "first", "mean"])
def test_caa_equals_independent_computation(tiny_hf, reference, side, batch_size, position):
    model, tok = tiny_hf
    layers = [0, 2, 3]  # 3 is the last block
    with padding(tok, side):
        vs = extract_caa(model, tok, PAIRS, layers=layers, token_position=position, batch_size=batch_size,
                         progress=False, behaviour="mood")
    assert vs.layers == layers and vs.num_layers == 4 and vs.method == "caa"
    assert vs.params["padding_side"] == side and vs.params["n_pairs"] == len(PAIRS)
    assert vs.params["token_position"] == position and vs.params["batch_size"] == batch_size
    for layer in layers:
        expected = reference_vector(reference, layer, position)
        assert vs.vectors[layer].dtype == torch.float32
        assert expected.norm() > 1e-3
        torch.testing.assert_close(vs.vectors[layer], expected, atol=1e-5, rtol=1e-5)
    if position == "last":  # the norm the strengths are relative to: mean |h| at the read token
        norms = [pool(t[3], "last").norm() for p, n in reference for t in (p, n)]
        assert vs.provenance["mean_activation_norm"]["3"] == pytest.approx(float(torch.stack(norms).mean()),
                                                                            rel=1e-4)


def test_one_forward_per_batch_for_all_layers(tiny_hf):
    model, tok = tiny_hf
    calls = {"model": 0, "block0": 0, "lm_head": 0}

    def counter(name):
        def hook(*_):
            calls[name] += 1
        return hook

    handles = [model.register_forward_pre_hook(counter("model")),
               find_decoder_layers(model)[0].register_forward_pre_hook(counter("block0")),
               model.lm_head.register_forward_pre_hook(counter("lm_head"))]
    try:
        for layers in ("all", [1], [0, 1, 2, 3]):
            calls.update(model=0, block0=0)
            extract_caa(model, tok, PAIRS, layers=layers, batch_size=4, progress=False)
            assert calls["model"] == calls["block0"] == 3  # ceil(9 / 4), however many layers
    finally:
        for h in handles:
            h.remove()
    assert calls["lm_head"] == 0  # the pass stops after the deepest requested block


@pytest.mark.parametrize("component", ["attn", "mlp"])
def test_components_match_hooked_submodule(tiny_hf, component):
    model, tok = tiny_hf
    pair = ContrastPair("The movie was wonderful and moving.", "Bad film.")
    block = find_decoder_layers(model)[2]
    sub = block.self_attn if component == "attn" else block.mlp
    seen = []
    handle = sub.register_forward_hook(lambda m, i, o: seen.append((o[0] if isinstance(o, tuple) else o)[0]))
    try:
        with torch.no_grad():
            for text in pair.texts():
                model(**tok(text, return_tensors="pt"))
    finally:
        handle.remove()
    for position in ("last", "mean"):
        with padding(tok, "left"):
            vs = extract_caa(model, tok, [pair, pair], layers=[2], component=component, token_position=position,
                             progress=False)
        expected = pool(seen[0], position) - pool(seen[1], position)
        torch.testing.assert_close(vs.vectors[2], expected, atol=1e-5, rtol=1e-5)
        assert vs.params["component"] == component


def test_activation_hook_captures_and_reduces(tiny_hf, reference):
    model, tok = tiny_hf
    text = PAIRS[1].texts()[0]
    enc = tok(text, return_tensors="pt")
    with ActivationHook(model, "all") as hook, torch.no_grad():
        model(**enc)
    for layer in range(4):
        torch.testing.assert_close(hook.captured[layer][0], reference[1][0][layer], atol=1e-5, rtol=1e-5)
    got = {}
    with ActivationHook(model, [-1, 0], token_position="mean", reduce=got.__setitem__), torch.no_grad():
        model(**enc)
    assert sorted(got) == [0, 3] and got[3].shape == (1, 128)
    torch.testing.assert_close(got[3][0], reference[1][0][3].mean(0), atol=1e-5, rtol=1e-5)
    assert not model._forward_hooks and not model._forward_pre_hooks  # detached on exit


def test_pca_method_on_synthetic_differences():
    torch.manual_seed(0)
    direction = torch.nn.functional.normalize(torch.randn(64, dtype=torch.float64), dim=0)
    pca = get_method("pca").fn
    for sign in (1.0, -1.0):  # the principal axis is sign-free; ours must follow the mean difference
        stats = LayerStats(keep_differences=True)
        base = torch.randn(40, 64)
        scale = sign * (2.0 + torch.rand(40, 1))
        stats.add(base + scale * direction.float() + 0.1 * torch.randn(40, 64), base)
        v = pca(stats)
        assert v.norm().item() == pytest.approx(1.0, abs=1e-6)
        assert torch.dot(v, stats.mean_difference) > 0
        assert abs(torch.dot(v, direction)) > 0.95 and torch.dot(v, direction) * sign > 0


def test_pca_extraction_is_unit_and_agrees_with_caa(tiny_hf):
    model, tok = tiny_hf
    caa = extract_caa(model, tok, PAIRS, layers=[1, 3], progress=False)
    pca = extract_caa(model, tok, PAIRS, layers=[1, 3], method="pca", batch_size=4, progress=False)
    assert pca.method == "pca"
    for layer in (1, 3):
        assert pca.vectors[layer].norm().item() == pytest.approx(1.0, abs=1e-5)
        assert torch.nn.functional.cosine_similarity(pca.vectors[layer], caa.vectors[layer], dim=0) > 0


def test_gpt2_left_padding_uses_real_positions(tiny_hf):
    """Absolute position embeddings: left padding is only right with explicit position ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    _, tok = tiny_hf
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_positions=128, n_embd=64, n_layer=2, n_head=2,
                                      bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)).eval()
    ref_pos, ref_neg = [], []
    with torch.no_grad():
        for pair in PAIRS:
            for text, out in zip(pair.texts(), (ref_pos, ref_neg)):
                out.append(gpt2(**tok(text, return_tensors="pt"), output_hidden_states=True).hidden_states[1][0, -1])
    with padding(tok, "left"):
        vs = extract_caa(gpt2, tok, PAIRS, layers=[0], batch_size=9, progress=False)
    expected = torch.stack(ref_pos).mean(0) - torch.stack(ref_neg).mean(0)
    torch.testing.assert_close(vs.vectors[0], expected, atol=1e-5, rtol=1e-5)


def test_score_layers(tiny_hf):
    model, tok = tiny_hf
    ds = ContrastPairDataset(PAIRS * 2, name="mood")
    train, held = ds.split(0.25, seed=0)
    scores = score_layers(model, tok, train, held, layers=[0, 3], batch_size=8)
    assert sorted(scores) == [0, 3]
    for s in scores.values():
        assert 0.0 <= s.accuracy <= 1.0 and s.n_heldout == len(held)
    # scoring the training pairs themselves: the CAA direction separates them on average
    on_train = score_layers(model, tok, train, train, layers=[3])
    assert on_train[3].margin > 0


def test_errors(tiny_hf):
    model, tok = tiny_hf
    with pytest.raises(ValueError, match="outside"):
        extract_caa(model, tok, PAIRS, layers=[4], progress=False)
    with pytest.raises(ValueError, match="unknown extraction method"):
        extract_caa(model, tok, PAIRS, method="nope", progress=False)
    with pytest.raises(ValueError, match="token_position"):
        extract_caa(model, tok, PAIRS, token_position="middle", progress=False)
    with pytest.raises(ValueError, match="no contrast pairs"):
        extract_caa(model, tok, [], progress=False)


# -- CLI ----------------------------------------------------------------------------------

@pytest.fixture
def cli_main():
    """The real ``vsteer`` entry point (it imports only the chosen subcommand's module)."""
    from vsteer.cli import main

    return main.main


def test_cli_extract_and_inspect(cli_main, tiny_model_path, tmp_path, capsys):
    main = cli_main
    from vsteer.engine.formats import save_control_vector_gguf, save_seed_format
    from vsteer.engine.vectors import SteeringVectorSet

    out = tmp_path / "sentiment"
    assert main(["extract", "--model", tiny_model_path, "--pairs", "sentiment", "--layers", "1,2",
                 "--out", str(out), "--batch-size", "8"]) == 0
    printed = capsys.readouterr().out
    assert "sentiment" in printed and "wrote" in printed
    assert (out / "vectors.safetensors").is_file() and (out / "vsteer.json").is_file()
    vs = load_vector_set(str(out))
    assert vs.layers == [1, 2] and vs.behaviour == "sentiment" and vs.params["batch_size"] == 8
    assert vs.provenance["dataset"]["size"] >= 40 and set(vs.provenance["mean_activation_norm"]) == {"1", "2"}

    assert main(["inspect", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sentiment" in text and "vsteer format" in text
    assert f"{vs.norms()[2]:10.4f}" in text
    assert main(["inspect", str(out), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["layers"] == [1, 2] and info["format"] == "vsteer" and info["hidden_size"] == 128
    assert info["per_layer"][0]["norm"] == pytest.approx(vs.norms()[1], abs=1e-5)
    assert info["per_layer"][0]["relative_norm"] > 0

    save_seed_format(vs, tmp_path / "seed")
    save_control_vector_gguf(vs, tmp_path / "cv.gguf")
    for path, kind in ((tmp_path / "seed", "rotalabs-steer"), (tmp_path / "cv.gguf", "gguf")):
        assert main(["inspect", str(path), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["format"] == kind and info["layers"] == [1, 2]
    assert main(["inspect", str(tmp_path / "nothing")]) == 1
    assert "not a vsteer vector set" in capsys.readouterr().err
    assert main(["extract", "--model", tiny_model_path, "--pairs", "no-such-data", "--out", str(tmp_path / "x")]) == 2
    assert "neither a file nor a bundled dataset" in capsys.readouterr().err


def test_cli_layers_auto(cli_main, tiny_model_path, tmp_path, capsys):
    main = cli_main
    from vsteer.engine.vectors import SteeringVectorSet

    out = tmp_path / "auto"
    assert main(["extract", "--model", tiny_model_path, "--pairs", "formality", "--layers", "auto", "--out",
                 str(out), "--top-k", "2", "--batch-size", "16"]) == 0
    assert "layers auto" in capsys.readouterr().out
    vs = load_vector_set(str(out))
    scores = vs.provenance["layer_scores"]
    assert set(scores) == {"0", "1", "2", "3"} and len(vs.layers) == 2
    ranked = vs.provenance["layer_selection"]["ranked"]
    assert sorted(ranked[:2]) == vs.layers
    assert all(0.0 <= s["accuracy"] <= 1.0 for s in scores.values())
