"""The recipe study's target arithmetic (bench/recipes_report.py): a held-out concept on
which no method chose a recipe is a miss with its distance, not a concept left out."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture(scope="module")
def report():
    sys.path.insert(0, str(BENCH))
    spec = importlib.util.spec_from_file_location("recipes_report", BENCH / "recipes_report.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.path.remove(str(BENCH))


def _method(steering=None, both=None, z=None, chosen=None, with_prompt=None, score=None, prompting=0.09):
    return {"chosen": chosen, "select_rule_score": score, "unsteered": {"behaviour": 0.0},
            "prompting": {"behaviour": prompting}, "steering": steering, "both": both, "z": z,
            "chosen_with_prompt": with_prompt, "with_prompt_rule_score": (with_prompt or {}).get("rule_score")}


def test_a_concept_where_nothing_was_chosen_counts_as_a_miss(report):
    held = {
        "dinosaurs": {"methods": {"caa": _method(), "bipo": _method()}, "best_method": None,
                      "best_with_prompt": None, "positions": {}},
        "birds": {"methods": {"caa": _method(steering={"behaviour": 0.2, "ppl_ratio": 1.1}, z=4.0, chosen={},
                                             score=0.1, both={"behaviour": 0.25}, with_prompt={"rule_score": 0.05})},
                  "best_method": "caa", "best_with_prompt": "caa", "positions": {}},
    }
    t = report.targets(held)
    one, two = t["steering_vs_prompting"], t["both_beats_prompting"]
    assert set(one["per_concept"]) == {"dinosaurs", "birds"}       # not "1 of 1"
    miss = one["per_concept"]["dinosaurs"]
    assert miss["method"] == "none chosen" and not miss["met"] and miss["steering"] == 0.0
    assert miss["distance"]["rate"] == pytest.approx(0.09)
    assert one["per_concept"]["birds"]["met"] and one["count"] == 1 and not one["met"]
    assert two["per_concept"]["dinosaurs"] == {"method": "nothing added", "both": 0.09, "prompting": 0.09,
                                               "met": False, "distance": 0.0}
    assert two["per_concept"]["birds"]["met"]
    text = "\n".join(report._render_targets(t))
    assert "1 of 2" in text and "dinosaurs none chosen" in text


def test_frontier_is_the_strongest_point_within_each_bound(report):
    """A search where nothing fits the budget still shows how far each method moves the rate
    for how much perplexity; ties go to the lower perplexity, a bound with no point is None."""
    def point(rate, ppl, strength):
        return {"behaviour": rate, "ppl_ratio": ppl, "recipe": {"band": "6-9", "strength": strength}}

    search = [point(0.0, 1.25, 0.1), point(0.19, 1.40, 0.2), point(0.47, 2.14, 0.3), point(0.19, 1.35, 0.15)]
    got = report.frontier(search)
    assert got["1.2"] is None and got["1.3"]["behaviour"] == 0.0
    assert (got["1.5"]["behaviour"], got["1.5"]["strength"]) == (0.19, 0.15)
    assert got["2"]["strength"] == 0.15 and got["any"]["behaviour"] == 0.47
