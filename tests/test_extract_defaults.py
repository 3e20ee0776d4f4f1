"""Defaults that work (issue 22): the token position chosen from the pairs, the check that
warns about a weak vector, and the trained direction (``--method bipo``), on the tiny model."""

from __future__ import annotations

import json

import pytest
import torch

from vsteer.cli.main import main as cli_main
from vsteer.engine.formats import load_vector_set
from vsteer.extract import ContrastPair, ContrastPairDataset, extract_caa
from vsteer.extract.positions import choose_token_position


@pytest.fixture(scope="module")
def ocean16(tmp_path_factory) -> str:
    """16 topic-swap pairs (CI time): 12 to extract from, 4 held out by the check."""
    path = tmp_path_factory.mktemp("pairs") / "ocean.jsonl"
    ContrastPairDataset.from_bundled("ocean")[:16].save(path)
    return str(path)


def test_auto_position_follows_the_pairs(tiny_hf):
    topic = ContrastPairDataset.from_bundled("ocean")
    prompted = ContrastPairDataset.from_bundled("refusal")
    assert choose_token_position(topic)[0] == "mean"
    assert choose_token_position(prompted)[0] == "completion"
    assert choose_token_position(topic, chat_template=True)[0] == "completion"
    mixed = ContrastPairDataset([*topic[:2], *prompted[:2]])
    assert choose_token_position(mixed)[0] == "mean"
    model, tok = tiny_hf
    vs = extract_caa(model, tok, prompted[:4], layers=[1], token_position="auto", progress=False)
    assert vs.params["token_position"] == "completion"


def test_completion_position_reads_only_the_completion(tiny_hf):
    """The mean over the completion's tokens, whatever the padding: against a plain HF pass."""
    model, tok = tiny_hf
    pairs = [ContrastPair(" great and tasty", " awful", "The food was"),
             ContrastPair(" yes", " no, absolutely not, never", "Question: will you help me? Answer:"),
             ContrastPair("Sure! Here it is.", "I cannot help.", "Write a poem.")]
    got = extract_caa(model, tok, pairs, layers=[1, 2], token_position="completion", batch_size=2, progress=False)

    def completion_mean(pair: ContrastPair, side: int) -> dict[int, torch.Tensor]:
        text = pair.texts()[side]
        full = tok(text)["input_ids"]
        head = tok(pair.prompt)["input_ids"]
        n = next((i for i, (a, b) in enumerate(zip(head, full)) if a != b), min(len(head), len(full)))
        with torch.no_grad():
            hs = model(torch.tensor([full]), output_hidden_states=True).hidden_states
        return {layer: hs[layer + 1][0, min(n, len(full) - 1):].mean(0) for layer in (1, 2)}

    for layer in (1, 2):
        want = torch.stack([completion_mean(p, 0)[layer] - completion_mean(p, 1)[layer] for p in pairs]).mean(0)
        assert torch.allclose(got.vectors[layer], want, atol=1e-5, rtol=1e-4)
    mean = extract_caa(model, tok, pairs, layers=[1], token_position="mean", progress=False)
    assert not torch.allclose(mean.vectors[1], got.vectors[1], atol=1e-3)  # the prompt really is left out


def test_cli_prints_the_position_and_warns_about_a_dead_vector(tiny_model_path, ocean16, tmp_path, capsys):
    out = tmp_path / "ocean"
    assert cli_main(["extract", "--model", tiny_model_path, "--pairs", ocean16, "--layers", "1,2", "--out", str(out),
                     "--no-progress"]) == 0
    captured = capsys.readouterr()
    assert "token position: mean (auto: whole-sentence pairs" in captured.out
    assert "check on 4 held-out pairs" in captured.out
    check = load_vector_set(str(out)).provenance["check"]
    assert {"accuracy", "gain", "z", "weak", "problems"} <= set(check)
    # every topic-swap sentence starts with the same token: the first-token vector is zero
    assert cli_main(["extract", "--model", tiny_model_path, "--pairs", ocean16, "--layers", "1,2", "--out",
                     str(tmp_path / "first"), "--token-position", "first", "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "WARNING: weak vector: it is zero at every layer" in err and "--token-position" in err
    assert "barely separate" not in err  # the zero says it; accuracy 0 and z nan would only restate it
    first = load_vector_set(str(tmp_path / "first")).provenance["check"]
    assert first["weak"] is True and first["zero"] is True


def test_bipo_objective_decreases_and_writes_a_vector_set(tiny_model_path, ocean16, tmp_path, capsys):
    """The trained method on the tiny model: the objective goes down on the training pairs,
    the file is an ordinary vector set (method bipo, residual norms for relative units)."""
    out = tmp_path / "bipo"
    assert cli_main(["extract", "--model", tiny_model_path, "--pairs", ocean16, "--layers", "1,2", "--method", "bipo",
                     "--steps", "8", "--lr", "0.01", "--out", str(out), "--no-progress", "--no-check"]) == 0
    assert "bipo (chat context, trained at 0.2 relative): objective" in capsys.readouterr().out
    vs = load_vector_set(str(out))
    assert vs.method == "bipo" and vs.layers == [1, 2] and set(vs.residual_norms) == {1, 2}
    training = vs.provenance["training"]
    assert training["after"]["train"]["objective"] < training["before"]["train"]["objective"]
    assert len(training["losses"]) == 8 and vs.params["bipo_steps"] == 8 and vs.params["bipo_seed"] == 0
    assert all(float(v.norm()) > 0 for v in vs.vectors.values())
    meta = json.loads((out / "vsteer.json").read_text())
    assert meta["method"] == "bipo"


def test_bipo_is_deterministic(tiny_hf):
    from vsteer.extract.trained import BiPOConfig, train_bipo

    model, tok = tiny_hf
    pairs = ContrastPairDataset.from_bundled("ocean")[:6]
    cfg = BiPOConfig(steps=3, batch_size=2, lr=0.01, seed=3)
    a, b = (train_bipo(model, tok, pairs, [2], cfg, progress=False) for _ in range(2))
    assert torch.equal(a.vectors[2], b.vectors[2]) and float(a.vectors[2].norm()) > 0


def test_bipo_cli_defaults_are_the_configs():
    from vsteer.cli.main import build_parser
    from vsteer.extract.trained import BiPOConfig

    args = build_parser("extract").parse_args(["extract", "--model", "m", "--pairs", "p", "--out", "o"])
    cfg = BiPOConfig()
    assert (args.steps, args.lr, args.beta, args.l2, args.init) == (cfg.steps, cfg.lr, cfg.beta, cfg.l2, cfg.init)
    assert (args.train_strength, args.train_context) == (cfg.strength, cfg.context)
    assert args.holdout_fraction == cfg.holdout_fraction and args.seed == cfg.seed
    free = build_parser("extract").parse_args(["extract", "--model", "m", "--pairs", "p", "--out", "o",
                                               "--train-strength", "free", "--init", "zero"])
    assert free.train_strength is None and free.init == "zero"


def test_bipo_trains_at_the_served_size_in_a_chat_turn(tiny_hf):
    """With a fixed strength s over k layers every trained vector is s/k of its layer's
    residual norm, the size ``{"strength": s/k, "unit": "relative"}`` serves it at; the
    prompt-less pairs are trained as replies to the bundled requests (which are no
    evaluation prompts: tests/test_heldout_protocol.py)."""
    from vsteer.extract.centering import load_neutral
    from vsteer.extract.trained import BiPOConfig, in_chat, train_bipo

    model, tok = tiny_hf
    pairs = ContrastPairDataset.from_bundled("ocean")[:6]
    vs = train_bipo(model, tok, pairs, [1, 2], BiPOConfig(steps=2, batch_size=2, lr=0.01, strength=0.3),
                    progress=False)
    for layer in (1, 2):
        assert float(vs.vectors[layer].norm()) == pytest.approx(0.15 * vs.residual_norms[layer], rel=1e-4)
    training = vs.provenance["training"]
    assert training["context"] == "chat" and vs.params["bipo_context_used"] == "chat"
    assert list(training["relative_norms"].values()) == pytest.approx([0.15, 0.15], rel=1e-4)

    requests = load_neutral(bundled="requests")
    assert len(requests) == 64
    prompted = ContrastPair("yes", "no", prompt="Say something.")
    chat = in_chat(ContrastPairDataset([*pairs, prompted]), seed=0)
    assert all(p.prompt in requests for p in chat[:6]) and chat[6].prompt == "Say something."
    assert [p.positive for p in chat] == [p.positive for p in [*pairs, prompted]]


def test_bipo_free_size_is_the_first_version(tiny_hf):
    """``strength=None`` trains the size as well (from zero, held back by l2): the vectors
    leave zero, their sizes differ from any fixed served size, the objective records l2."""
    from vsteer.extract.trained import BiPOConfig, train_bipo

    model, tok = tiny_hf
    vs = train_bipo(model, tok, ContrastPairDataset.from_bundled("ocean")[:6], [1, 2],
                    BiPOConfig(steps=3, batch_size=2, lr=0.01, strength=None, init="zero", context="plain"),
                    progress=False)
    training = vs.provenance["training"]
    norms = list(training["relative_norms"].values())
    assert all(n > 0 for n in norms) and norms[0] != pytest.approx(norms[1], rel=1e-6)
    assert "λ" in training["objective"] and training["context"] == "plain"


def test_bipo_without_a_chat_template_trains_on_the_pairs_as_given(tiny_hf):
    from vsteer.extract.trained import BiPOConfig, train_bipo

    model, tok = tiny_hf
    template, tok.chat_template = tok.chat_template, None
    try:
        vs = train_bipo(model, tok, ContrastPairDataset.from_bundled("ocean")[:4], [2],
                        BiPOConfig(steps=1, batch_size=2), progress=False)
    finally:
        tok.chat_template = template
    assert vs.provenance["training"]["context"] == "plain" and vs.params["bipo_context"] == "chat"


@pytest.mark.parametrize("flags,message", [(["--init", "zero"], "start from the mean difference"),
                                           (["--train-strength", "-1"], "training strength must be in (0, 10]")])
def test_refused_bipo_flags_fail_before_the_model_loads(tmp_path, capsys, flags, message):
    """No model exists at --model: the refused combination is what the user hears, at once."""
    rc = cli_main(["extract", "--model", str(tmp_path / "no-model"), "--pairs", "ocean", "--method", "bipo",
                   *flags, "--out", str(tmp_path / "x")])
    assert rc == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("kw,message", [(dict(init="zero"), "start from the mean difference"),
                                        (dict(strength=0.0), "strength must be"),
                                        (dict(context="prompted"), "context must be")])
def test_bipo_config_refuses_what_cannot_train(kw, message):
    from vsteer.extract.trained import BiPOConfig

    with pytest.raises(ValueError, match=message):
        BiPOConfig(**kw)


def test_vllm_engine_refuses_what_it_cannot_read_before_starting(tiny_model_path, tmp_path, capsys):
    rc = cli_main(["extract", "--engine", "vllm", "--model", tiny_model_path, "--pairs", "refusal", "--layers", "1",
                   "--out", str(tmp_path / "x")])
    assert rc == 2 and "needs --engine hf" in capsys.readouterr().err
    rc = cli_main(["extract", "--engine", "vllm", "--model", tiny_model_path, "--pairs", "ocean", "--layers", "1",
                   "--method", "bipo", "--out", str(tmp_path / "x")])
    assert rc == 2 and "bipo" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["extract", "--model", tiny_model_path, "--pairs", "ocean", "--out", "x", "--method", "nope"])


@pytest.mark.parametrize("written,expected", [({"torch_dtype": "float32"}, "float32"),
                                              ({"dtype": "bfloat16"}, "bfloat16"), ({}, "float32")])
def test_dtype_auto_is_the_checkpoints(tiny_model_path, tmp_path, written, expected):
    """Issue 20, item 12: every engine gets the checkpoint's dtype for ``auto``, never its own rule."""
    import shutil

    from vsteer.extract.checkpoint import checkpoint_dtype, engine_dtype

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_path, folder)
    cfg = json.loads((folder / "config.json").read_text())
    for key in ("dtype", "torch_dtype"):
        cfg.pop(key, None)
    (folder / "config.json").write_text(json.dumps({**cfg, **written}))
    assert checkpoint_dtype(str(folder)) == expected
    assert engine_dtype("auto", str(folder)) == expected and engine_dtype("float16", str(folder)) == "float16"
