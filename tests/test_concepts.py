"""A user's own concept (issue 22): keyword/regex scorers, scorer files, and `vsteer tune
--keywords` end to end on the tiny model, with the prompting baseline tuned too."""

from __future__ import annotations

import json

import pytest

from vsteer.cli.main import main as cli_main
from vsteer.engine.formats import load_vector_set, save_vector_set
from vsteer.eval.concepts import keyword_pattern, load_scorer, match_rate
from vsteer.extract import ContrastPairDataset, extract_caa


def test_keywords_match_whole_words_and_phrases():
    score = match_rate(["dinosaur", "t-rex", "coral reefs"], [r"\bjurassic\w*"])
    assert score("A Dinosaur walked in.", 4, 32) == 1.0
    assert score("The T-Rex roared", 3, 32) == 1.0 and score("The dinosaurs", 2, 32) == 0.0  # no stemming
    assert score("I love coral\nreefs", 4, 32) == 1.0 and score("coral only", 2, 32) == 0.0
    assert score("Jurassical times", 2, 32) == 1.0
    assert score("predinosaur era", 2, 32) == 0.0
    with pytest.raises(ValueError):
        keyword_pattern([], [])
    with pytest.raises(ValueError):
        keyword_pattern(["x"], ["("])


def test_scorer_files(tmp_path):
    f = tmp_path / "dinos.scorer.json"
    f.write_text(json.dumps({"name": "dinos", "concept": "dinosaurs", "keywords": ["dinosaur", "fossil"],
                             "system_prompt": "Talk about dinosaurs."}))
    beh = load_scorer(f)
    assert beh.name == "dinos" and beh.kind == "generation" and beh.concept == "dinosaurs"
    assert beh.system_prompts[0] == "Talk about dinosaurs." and len(beh.system_prompts) == 5
    assert beh.text_scorer("a fossil", 2, 8) == 1.0
    f.write_text(json.dumps({"probes": [{"prompt": "The food was", "positive": [" great"], "negative": [" bad"]}]}))
    beh = load_scorer(f, "food")
    assert beh.kind == "logprob" and beh.name == "food" and len(beh.probes) == 1
    for bad in ({"keywords": "x", "probes": []}, {"keywords": [1]}, {"nope": 1}, ["x"]):
        f.write_text(json.dumps(bad))
        with pytest.raises(ValueError):
            load_scorer(f)


def test_tune_a_concept_given_on_the_command_line(tiny_hf, tiny_model_path, tmp_path, capsys):
    """--keywords and --concept: the system-message templates are searched on the select
    prompts like the recipes, both are scored on the score prompts, the gaps printed."""
    model, tok = tiny_hf
    vs = extract_caa(model, tok, ContrastPairDataset.from_bundled("ocean")[:8], layers=[2], token_position="mean",
                     progress=False, behaviour="mine")
    save_vector_set(vs, tmp_path / "mine")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("Hi.", "Tell me a story.", "Why?", "Go on.")))
    out = tmp_path / "tune"
    rc = cli_main(["tune", "--model", tiny_model_path, "--vectors", str(tmp_path / "mine"), "--keywords",
                   "the,a,is,and,of,to", "--concept", "the ocean", "--prompts-file", str(prompts), "--bands", "2",
                   "--strengths", "0.5,2", "--positions", "all", "--max-ppl-ratio", "1000", "--random-baselines", "2",
                   "--max-new-tokens", "6", "--out", str(out), "--no-progress", "--no-plots", "--dry-run"])
    printed = capsys.readouterr().out
    assert rc in (0, 1)
    report = json.loads((out / "report.json").read_text())
    t = report["tune"]
    assert report["behaviour"]["concept"] == "the ocean" and report["behaviour"]["keywords"][:2] == ["the", "a"]
    assert len(t["prompting_search"]) == 4 and all("the ocean" in c["system_prompt"] for c in t["prompting_search"])
    assert all(len(c["items"]) == 2 for c in t["prompting_search"] + t["search"])  # select half: 2 of 4 prompts
    assert t["choice_rule"] == "lcb" and t["chosen_system_prompt"] in [c["system_prompt"] for c in t["prompting_search"]]
    assert t["heldout"]["prompting"]["items"] and "select -> score" in printed or t["gap"]["prompting"] is None
    assert load_vector_set(str(tmp_path / "mine")).recommended is None  # --dry-run
    rc = cli_main(["tune", "--model", tiny_model_path, "--vectors", str(tmp_path / "mine"), "--keywords", "x",
                   "--probes", str(prompts), "--out", str(out)])
    assert rc == 2 and "give one scorer" in capsys.readouterr().err
