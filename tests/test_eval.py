"""``vsteer eval``: report shape on the tiny model, a real behavioural sweep on SmolLM2,
and the vLLM backend giving the HF backend's numbers."""

from __future__ import annotations

import json
import math

import pytest

from vsteer.cli.main import main as cli_main
from vsteer.engine.formats import save_vector_set
from vsteer.engine.resolver import residual_norms_of
from vsteer.extract import ContrastPairDataset, extract_caa
from vsteer.eval.behaviours import get_behaviour
from vsteer.eval.inputs import load_prompts
from vsteer.eval.recipes import Recipe, parse_bands
from vsteer.eval.scorers import words
from vsteer.eval.sweep import run_sweep, tradeoff

POINT_KEYS = {"layer", "strength", "raw_strength", "relative_strength", "behaviour", "behaviour_ci95",
              "behaviour_delta", "perplexity", "ppl_ratio", "distinct_1", "distinct_2", "mean_tokens", "z_vs_random",
              "samples"}


@pytest.fixture(scope="module")
def tiny_set(tiny_hf, tmp_path_factory):
    model, tok = tiny_hf
    vs = extract_caa(model, tok, ContrastPairDataset.from_bundled("sentiment")[:16], layers=[1, 2],
                     token_position="mean", batch_size=16, progress=False, behaviour="sentiment")
    path = tmp_path_factory.mktemp("tiny-set") / "sentiment"
    save_vector_set(vs, str(path))
    return str(path), vs


def test_report_shape_tiny_hf(tiny_model_path, tiny_hf, tiny_set, tmp_path):
    path, vs = tiny_set
    strengths = [-8.0, -2.0, 0.0, 4.0]
    report = run_sweep(tiny_model_path, path, strengths=strengths, layers=[1, 2], backend="hf",
                       out=str(tmp_path), max_new_tokens=6, n_prompts=5, random_baselines=2,
                       progress=False, hf_model=tiny_hf)
    for key in ("behaviour", "baseline", "points", "by_layer", "tradeoff", "random_baseline", "plots", "versions",
                "timing", "strengths", "layers"):
        assert key in report, key
    assert report["strengths"] == strengths and report["layers"] == [1, 2]
    assert report["behaviour"]["name"] == "sentiment" and report["behaviour"]["n_items"] == 5
    assert len(report["points"]) == 2 * len(strengths)
    for p in report["points"]:
        assert POINT_KEYS <= set(p), POINT_KEYS - set(p)
        assert p["relative_strength"] is not None  # the set carries mean_activation_norm
        assert p["perplexity"] is not None and p["perplexity"] > 0
    for layer in ("1", "2"):
        assert len(report["by_layer"][layer]["behaviour"]) == len(strengths)
        zero = report["by_layer"][layer]["strength"].index(0.0)
        assert report["by_layer"][layer]["behaviour"][zero] == report["baseline"]["behaviour"]
        assert report["by_layer"][layer]["ppl_ratio"][zero] == pytest.approx(1.0)
        per_strength = report["random_baseline"]["per_layer"][layer]
        assert set(per_strength) == {"-8", "-2", "4"}  # every non-zero strength
        assert all(len(v["random_effects"]) == 2 for v in per_strength.values())
    for p in report["points"]:
        assert (p["z_vs_random"] is None) == (p["strength"] == 0.0)
    # relative strength = strength x |v| / mean residual norm (the unit the engine uses)
    norm1 = residual_norms_of(vs)[1]
    p = next(p for p in report["points"] if p["layer"] == 1 and p["strength"] == 4.0)
    assert p["relative_strength"] == pytest.approx(4.0 * vs.norms()[1] / norm1, rel=1e-4)
    assert set(report["tradeoff"]) == {"criteria", "per_layer", "best"}
    assert set(report["tradeoff"]["best"]) == {"+", "-"}
    assert set(report["tradeoff"]["per_layer"]) == {"1", "2"}
    assert sorted(report["plots"]) == ["behaviour_vs_strength.png", "coherence_vs_strength.png"]
    for name in report["plots"]:
        assert (tmp_path / name).stat().st_size > 1000
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["points"] == report["points"]


def test_generation_behaviour_and_relative_unit_via_cli(tiny_model_path, tiny_set, tmp_path, capsys):
    path, _ = tiny_set
    rc = cli_main(["eval", "--model", tiny_model_path, "--vectors", path, "--behaviour", "conciseness",
                   "--strengths=-0.5,0.5", "--unit", "relative", "--layers", "2", "--prompts", "3",
                   "--max-new-tokens", "5", "--random-baselines", "0", "--out", str(tmp_path), "--no-progress"])
    assert rc == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["behaviour"]["kind"] == "generation" and report["strength_unit"] == "relative"
    assert [p["strength"] for p in report["points"]] == [-0.5, 0.0, 0.5]
    for p in report["points"]:
        assert p["relative_strength"] == pytest.approx(p["strength"], abs=1e-5)
        assert 0.0 <= p["behaviour"] <= 1.0
    assert report["random_baseline"] is None
    assert "trade-off" in capsys.readouterr().out


def test_tradeoff_picks_lowest_strength_within_bound():
    pts = [{"layer": 3, "strength": s, "relative_strength": s / 10, "behaviour": b, "perplexity": ppl,
            "ppl_ratio": ppl / 2.0, "raw_strength": s, "distinct_2": 1.0}
           for s, b, ppl in [(-4, -1.0, 2.5), (-2, 0.5, 2.1), (2, 1.2, 2.2), (4, 3.0, 2.6), (8, 6.0, 9.0)]]
    to = tradeoff(pts, {"behaviour": 1.0, "perplexity": 2.0}, target_delta=1.5, max_ppl_ratio=1.5)
    assert to["best"]["+"]["strength"] == 4      # 2 moves too little, 8 breaks the bound
    assert to["best"]["-"]["strength"] == -4
    strict = tradeoff(pts, {"behaviour": 1.0, "perplexity": 2.0}, target_delta=1.5, max_ppl_ratio=1.2)
    assert strict["best"]["+"] is None and strict["per_layer"]["3"]["+"] is None


@pytest.mark.smollm2
def test_sentiment_score_rises_with_strength_smollm2(smollm2_path, smollm2_hf, smollm2_vectors, tmp_path):
    """A behavioural test: the bundled-pairs sentiment vector at layer 10 moves the held-out
    probe margin monotonically with strength, far beyond its bootstrap interval."""
    report = run_sweep(smollm2_path, str(smollm2_vectors.path_for("sentiment")), layers=[10],
                       strengths=[-4.0, 0.0, 4.0], backend="hf", out=str(tmp_path), n_generation_prompts=2,
                       max_new_tokens=4, random_baselines=0, progress=False, hf_model=smollm2_hf, plots=False)
    scores = report["by_layer"]["10"]["behaviour"]
    print("sentiment margin at -4/0/+4:", scores)
    assert scores[0] < scores[1] < scores[2]
    lo_ci, mid_ci, hi_ci = (p["behaviour_ci95"] for p in report["points"])
    assert lo_ci[1] < mid_ci[0] and mid_ci[1] < hi_ci[0]  # intervals do not overlap
    assert report["behaviour"]["n_items"] == 30


@pytest.mark.vllm
def test_vllm_backend_matches_hf_tiny(tiny_model_path, tiny_hf, tiny_set, tmp_path):
    """Same report numbers from both backends: single-token probe words (vLLM
    logprob_token_ids), multi-token ones (prompt_logprobs), generations and perplexity."""
    pytest.importorskip("vllm")
    path, _ = tiny_set
    probes = tmp_path / "probes.jsonl"
    probes.write_text("\n".join(json.dumps(p) for p in [
        {"prompt": "The food was", "positive": [" great", " absolutely wonderful"],
         "negative": [" bad", " so horrible"]},
        {"prompt": "My day has been", "positive": [" lovely"], "negative": [" awful", " really quite dreadful"]},
        {"prompt": "Honestly, the film felt", "positive": [" fun"], "negative": [" boring"]},
    ]))
    kw = dict(probes=str(probes), behaviour="mixed-probes", strengths=[-8.0, 0.0, 8.0], layers=[2], bands=[(1, 2)],
              ops=["add", "ablate"], norms=["keep", "preserve"], system_prompt="Be kind.", max_new_tokens=8,
              n_prompts=6, random_baselines=1, max_ppl_ratio=1e6, progress=False, plots=False)
    hf = run_sweep(tiny_model_path, path, backend="hf", hf_model=tiny_hf, **kw)
    vl = run_sweep(tiny_model_path, path, backend="vllm", **kw)
    assert len(hf["points"]) == len(vl["points"]) == 2 * (2 * 3 + 1)  # 2 bands x (keep/preserve x 3 + ablate)
    for a, b in zip(hf["points"], vl["points"]):
        assert (a["variant"], a["strength"]) == (b["variant"], b["strength"])
        assert a["behaviour"] == pytest.approx(b["behaviour"], abs=1e-3)
        assert a["samples"] == b["samples"]
        assert a["perplexity"] == pytest.approx(b["perplexity"], rel=1e-3)
        assert a["distinct_2"] == b["distinct_2"] or (a["distinct_2"] is None and b["distinct_2"] is None)
    for layer, per_strength in hf["random_baseline"]["per_layer"].items():
        for s, info in per_strength.items():
            other = vl["random_baseline"]["per_layer"][layer][s]
            assert info["random_effects"] == pytest.approx(other["random_effects"], abs=1e-3)
    assert not any(math.isnan(p["behaviour"]) for p in vl["points"])
    for key in ("prompting", "steering", "both"):  # the prompting baseline and steering + prompting agree too
        a, b = hf["comparison"][key], vl["comparison"][key]
        assert a["behaviour"] == pytest.approx(b["behaviour"], abs=1e-3) and a["samples"] == b["samples"]


def test_recipe_spreads_strength_over_its_band():
    band = Recipe((6, 7, 8, 9), 0.4, unit="relative", norm="preserve", positions="generated")
    assert band.band == "6-9" and band.per_layer == pytest.approx(0.1)
    assert band.spec("ocean") == {"vectors": [{"name": "ocean", "layers": [6, 7, 8, 9], "op": "add",
                                               "strength": pytest.approx(0.1), "unit": "relative",
                                               "norm": "preserve"}], "positions": "generated"}
    assert band.recommended() == {"strength": 0.1, "layers": [6, 7, 8, 9], "unit": "relative", "norm": "preserve",
                                  "positions": "generated"}
    ablate = Recipe((3, 5), 7.0, op="ablate", unit="relative")
    assert ablate.strength == 1.0 and ablate.spec("r")["vectors"][0] == {"name": "r", "layers": [3, 5],
                                                                         "op": "ablate"}
    with pytest.raises(ValueError):
        ablate.recommended()
    with pytest.raises(ValueError, match="preserve"):
        Recipe((1,), 1.0, op="clamp", norm="preserve")
    assert parse_bands("6-9,10+12;4") == [(6, 7, 8, 9), (10, 12), (4,)]
    with pytest.raises(ValueError):
        parse_bands("6-x")


def test_concept_scorer_counts_answers_that_mention_the_concept():
    ocean = get_behaviour("ocean")
    assert ocean.kind == "generation" and ocean.system_prompt and ocean.prompts_file == "concept_prompts.jsonl"
    score = ocean.text_scorer
    assert score("We walked along the beach at dawn.", 8, 32) == 1.0
    assert score("Whales sing.", 3, 32) == 1.0
    assert score("I spent the morning at the office reading emails.", 10, 32) == 0.0
    assert score("The seashore", 2, 32) == 1.0 and score("Unseasonable weather", 2, 32) == 0.0  # whole words
    for name in ("ocean", "cooking", "space"):
        keys = set(get_behaviour(name).keywords)
        prompts = load_prompts(get_behaviour(name).prompts_file)
        assert len(prompts) == 96
        # the held-out prompts do not ask for any concept
        assert not any(w in keys for p in prompts for w in words(p)), name


def test_report_json_comes_first_and_plots_are_optional(tmp_path, monkeypatch, capsys):
    import sys

    from vsteer.eval import report as report_mod

    def broken(report, out_dir):
        assert (out_dir / "report.json").is_file()  # written before any plot is drawn
        raise RuntimeError("plotting failed")

    monkeypatch.setattr(report_mod, "write_plots", broken)
    with pytest.raises(RuntimeError):
        report_mod.write_report({"points": [], "kind": "sweep"}, tmp_path / "a")
    assert json.loads((tmp_path / "a" / "report.json").read_text())["kind"] == "sweep"

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    rep = {"points": [], "plots": []}
    report_mod.write_report(rep, tmp_path / "b")
    on_disk = json.loads((tmp_path / "b" / "report.json").read_text())
    assert on_disk["plots"] == [] and "matplotlib" in on_disk["plots_skipped"]
    assert "plots skipped" in capsys.readouterr().err


def test_bands_ops_norms_and_prompting_tiny(tiny_model_path, tiny_hf, tiny_set, tmp_path):
    """One sweep over a band (strength spread), add with keep/preserve, ablate, at generated
    positions, with the prompting baseline and steering + prompting beside it."""
    path, vs = tiny_set
    report = run_sweep(tiny_model_path, path, behaviour="sentiment", bands=[(1, 2)], ops=["add", "ablate"],
                       norms=["keep", "preserve"], positions="generated", strengths=[6.0], n_prompts=3,
                       max_new_tokens=5, random_baselines=1, max_ppl_ratio=1e6, progress=False, hf_model=tiny_hf,
                       plots=False, out=str(tmp_path))
    by = {(p["variant"], p["strength"]): p for p in report["points"]}
    assert set(by) == {("1-2", 0.0), ("1-2", 6.0), ("1-2 preserve", 0.0), ("1-2 preserve", 6.0),
                       ("1-2 ablate", 1.0)}
    keep, pres, abl = by[("1-2", 6.0)], by[("1-2 preserve", 6.0)], by[("1-2 ablate", 1.0)]
    assert keep["coefficients"] == {"1": 3.0, "2": 3.0} and keep["per_layer_strength"] == 3.0
    assert keep["layers"] == [1, 2] and keep["positions"] == "generated" and keep["norm"] == "keep"
    assert pres["norm"] == "preserve"
    rel = sum(3.0 * vs.norms()[x] / residual_norms_of(vs)[x] for x in (1, 2))
    assert keep["relative_strength"] == pytest.approx(rel, rel=1e-4)
    assert abl["op"] == "ablate" and abl["relative_strength"] is None and abl["coefficients"] == {"1": 0.0, "2": 0.0}
    assert (keep["samples"], keep["perplexity"]) != (report["baseline"]["samples"], report["baseline"]["perplexity"])
    for p in (keep, pres, abl):
        assert p["z_vs_random"] is None or isinstance(p["z_vs_random"], float)
    assert set(report["random_baseline"]["per_layer"]) == {"1-2", "1-2 preserve", "1-2 ablate"}
    comp = report["comparison"]
    assert comp["system_prompt"] == get_behaviour("sentiment").system_prompt
    assert comp["unsteered"]["behaviour"] == report["baseline"]["behaviour"]
    assert comp["prompting"]["behaviour"] != comp["unsteered"]["behaviour"]  # the prefix changes the probes
    assert comp["steering"]["recipe"]["band"] == "1-2" and comp["both"]["recipe"] == comp["steering"]["recipe"]
    assert comp["both"]["behaviour"] != comp["steering"]["behaviour"]
    assert json.loads((tmp_path / "report.json").read_text())["comparison"]["both"] is not None
