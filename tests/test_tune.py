"""``vsteer tune``: the search runs on one half of the prompts, the score on the other, and
the chosen recipe becomes the set's default (a request naming only the vector gets it)."""

from __future__ import annotations

import json

import pytest

from vsteer.cli.main import main as cli_main
from vsteer.engine import SteeringResolver, VectorRegistry, load_vector_set, save_vector_set
from vsteer.eval.inputs import split_indices
from vsteer.eval.choice import choose
from vsteer.extract import ContrastPairDataset, extract_caa


def _cand(strength, items, ppl):
    return {"recipe": {"strength": strength}, "items": items, "behaviour": sum(items) / len(items), "ppl_ratio": ppl}


def test_choose_takes_the_strongest_in_budget_move():
    base = [0.2] * 4
    cands = [_cand(0.1, [0.3] * 4, 1.05), _cand(0.2, [0.5] * 4, 1.15), _cand(0.4, [0.9] * 4, 1.6),
             _cand(0.3, [0.5] * 4, 1.1)]
    for rule in ("max", "lcb", "folds"):  # equal gains on every prompt: every rule agrees
        assert choose(cands, base, rule=rule, max_ppl_ratio=1.2)["recipe"]["strength"] == 0.2  # tie: smaller
        assert choose(cands, base, rule=rule, max_ppl_ratio=2.0)["recipe"]["strength"] == 0.4
        assert choose(cands, [0.95] * 4, rule=rule, max_ppl_ratio=2.0) is None              # nothing beats it
        assert choose(cands, [0.6] * 4, rule=rule, max_ppl_ratio=2.0, direction=-1)["behaviour"] == 0.3
    assert choose(cands, base, rule="max", max_ppl_ratio=None)["recipe"]["strength"] == 0.4  # no budget


def test_robust_rules_prefer_a_gain_that_holds_across_prompts():
    """Issue 22: a recipe that hit on a few select prompts (a spike) against one that moved
    many of them a little: max takes the spike, lcb and folds the steady one."""
    base = [0.0] * 8
    spiky = _cand(0.1, [3.0] + [0.0] * 7, 1.1)   # mean 0.375, all of it on one prompt
    steady = _cand(0.2, [0.3] * 8, 1.1)          # mean 0.3 on every prompt
    assert choose([spiky, steady], base, rule="max")["recipe"]["strength"] == 0.1
    for rule in ("lcb", "folds"):
        assert choose([spiky, steady], base, rule=rule)["recipe"]["strength"] == 0.2, rule
        assert spiky["rule_score"] < steady["rule_score"]


def test_a_gain_carried_by_one_prompt_is_no_choice():
    """Issue 22, held-out run: 1 hit in 32 select prompts has a lower bound of exactly zero
    (mean = one standard error); lcb chose it and it scored 0 on the other half. A choice
    needs a bound above zero; two hits give one."""
    base = [0.0] * 32
    one = _cand(0.1, [1.0] + [0.0] * 31, 1.05)
    assert choose([one], base, rule="lcb") is None
    assert choose([one], base, rule="max")["recipe"]["strength"] == 0.1  # the old rule still takes it
    two = _cand(0.2, [1.0, 1.0] + [0.0] * 30, 1.1)
    assert choose([one, two], base, rule="lcb")["recipe"]["strength"] == 0.2


def test_smooth_rule_pools_neighbouring_strengths():
    """A lone spike between two dead neighbours loses to a candidate on a steady plateau."""
    def cand(band, strength, hits):
        c = _cand(strength, [1.0] * hits + [0.0] * (12 - hits), 1.0)
        c["recipe"] = {"band": band, "strength": strength, "positions": "all", "norm": "keep"}
        return c
    cands = [cand("6-9", 0.1, 0), cand("6-9", 0.2, 6), cand("6-9", 0.3, 0),
             cand("3-10", 0.1, 4), cand("3-10", 0.2, 5), cand("3-10", 0.3, 5)]
    assert choose(cands, [0.0] * 12, rule="max")["recipe"]["band"] == "6-9"
    picked = choose(cands, [0.0] * 12, rule="smooth")
    assert picked["recipe"]["band"] == "3-10"


def test_split_halves_are_disjoint_and_cover():
    for n in (2, 5, 24, 31):
        sel, score = split_indices(n, "select", 7), split_indices(n, "score", 7)
        assert not set(sel) & set(score) and sorted(sel + score) == list(range(n))
        assert abs(len(sel) - len(score)) <= 1
    assert split_indices(9, "select", 0) != split_indices(9, "select", 3)


@pytest.fixture(scope="module")
def lever_set(tiny_hf, tmp_path_factory):
    """A set whose last-layer vector is the unembedding direction of " great" minus
    " terrible" (through the final norm's gain), so steering with it surely raises the
    probe margin on the random tiny model: the search has something to find."""
    model, tok = tiny_hf
    vs = extract_caa(model, tok, ContrastPairDataset.from_bundled("sentiment")[:4], layers=[3],
                     token_position="mean", progress=False, behaviour="lever")
    pos, neg = (tok(w, add_special_tokens=False)["input_ids"][0] for w in (" great", " terrible"))
    w = model.get_output_embeddings().weight.detach()
    lever = (w[pos] - w[neg]) * model.model.norm.weight.detach()
    vs.vectors[3] = (lever / lever.norm() * vs.vectors[3].norm()).float()
    path = tmp_path_factory.mktemp("lever") / "lever"
    save_vector_set(vs, str(path))
    probes = path.parent / "probes.jsonl"
    probes.write_text("\n".join(json.dumps({"prompt": p, "positive": [" great"], "negative": [" terrible"]}) for p in (
        "The food was", "My day has been", "Honestly, the film felt", "The new phone is")))
    return path, probes


def test_tune_searches_on_select_scores_on_score_and_records(tiny_model_path, lever_set, tmp_path):
    path, probes = lever_set
    out = tmp_path / "tune"
    rc = cli_main(["tune", "--model", tiny_model_path, "--vectors", str(path), "--probes", str(probes),
                   "--behaviour", "lever", "--system-prompt", "Be upbeat.", "--bands", "3", "--strengths", "0.3,1.5",
                   "--positions", "all", "--max-ppl-ratio", "100", "--random-baselines", "2", "--prompts", "4",
                   "--max-new-tokens", "4", "--out", str(out), "--no-progress", "--no-plots"])
    assert rc == 0
    t = json.loads((out / "report.json").read_text())["tune"]
    sel, score = t["split"]["select"], t["split"]["score"]
    for key in ("prompts", "probes"):
        assert sel[key] and score[key] and not set(sel[key]) & set(score[key])
        assert sorted(sel[key] + score[key]) == [0, 1, 2, 3]
    assert [c["recipe"]["strength"] for c in t["search"]] == [0.3, 1.5]
    chosen = t["chosen"]
    assert chosen is not None and chosen["select"]["behaviour"] > t["select_baseline"]["behaviour"]
    h = t["heldout"]
    assert h["n_prompts"] == 2 and h["n_probes"] == 2
    assert {"unsteered", "prompting", "steering", "both"} <= set(h)
    assert len(h["steering"]["random_baseline"]["random_effects"]) == 2
    assert h["steering"]["behaviour"] > h["unsteered"]["behaviour"]  # the lever works on held-out probes too

    # the combined search: every recipe again on top of the chosen message, chosen by its gain over the message
    assert [c["recipe"]["strength"] for c in t["combined_search"]] == [0.3, 1.5]
    assert {c["system_prompt"] for c in t["combined_search"]} == {"Be upbeat."}
    with_prompt = t["chosen_with_prompt"]
    prompt_alone = next(c for c in t["prompting_search"] if c["system_prompt"] == "Be upbeat.")
    assert with_prompt is not None and with_prompt["select"]["behaviour"] > prompt_alone["behaviour"]
    assert t["gap"]["both"]["select"] == with_prompt["select"]["behaviour"]

    # recorded: a request that names only the vector gets the recipe
    recorded = load_vector_set(str(path)).recommended
    assert recorded == chosen["recommended"] == {"strength": chosen["per_layer_strength"], "layers": [3],
                                                 "unit": "relative", "norm": "keep", "positions": "all"}
    (tmp_path / "reg").mkdir()
    reg = VectorRegistry(tmp_path / "reg")
    reg.add("lever", load_vector_set(str(path)))
    resolved = SteeringResolver(reg, hidden_size=128, num_layers=4).resolve({"vectors": [{"name": "lever"}]})
    entry = resolved.entries[0]
    assert entry.unit == "relative" and entry.layers == (3,) and resolved.positions == "all"
    assert entry.strength == pytest.approx(chosen["per_layer_strength"])


def test_tune_without_the_combined_search_scores_the_steering_choice_with_the_message(tiny_model_path, lever_set):
    from vsteer.eval.tune import tune

    path, probes = lever_set
    rep = tune(tiny_model_path, str(path), probes=str(probes), behaviour="lever", system_prompt="Be upbeat.",
               bands=[(3,)], strengths=[1.5], positions=["all"], max_ppl_ratio=100, random_baselines=0, n_prompts=4,
               max_new_tokens=4, write=False, progress=False, plots=False, combined=False)
    t = rep["tune"]
    assert t["combined_search"] is None and t["chosen_with_prompt"] is None and t["gap"]["both"] is None
    assert t["chosen"] is not None and "both" in t["heldout"]  # the steering choice plus the message
