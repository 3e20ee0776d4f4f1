"""Contrast-pair datasets: file formats, the seed's JSON shape, bundled data, errors."""

from __future__ import annotations

import json

import pytest

from vsteer.extract import ContrastPair, ContrastPairDataset, PairFileError, join_text, load_pairs

PAIRS = [
    ContrastPair("Great, thanks!", "Awful, no thanks.", "How was it?"),
    ContrastPair('She said "yes", happily,\nthen left.', "He said no, sadly.", ""),
    ContrastPair("Ünïcödé ✓", "plain", "p, with comma"),
]


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv"])
def test_round_trip(tmp_path, suffix):
    ds = ContrastPairDataset(PAIRS, name="mood", description="test pairs")
    path = ds.save(tmp_path / f"mood{suffix}")
    back = ContrastPairDataset.load(path)
    assert [(p.prompt, p.positive, p.negative) for p in back] == [(p.prompt, p.positive, p.negative) for p in PAIRS]
    assert back.name == "mood"
    assert len(back) == 3 and isinstance(back[1:], ContrastPairDataset) and len(back[1:]) == 2


def test_seed_json_shape(tmp_path):
    """The seed's ContrastPairDataset.save() output, and a bare list with other key names."""
    seed = {"behavior": "refusal", "description": "seed pairs", "pairs": [
        {"positive": "User: hack wifi?\nAssistant: I can't help.", "negative": "User: hack wifi?\nAssistant: Sure:",
         "metadata": {"category": "hacking"}},
        {"positive": "b+", "negative": "b-", "metadata": {}},
    ]}
    (tmp_path / "seed.json").write_text(json.dumps(seed))
    ds = ContrastPairDataset.load(tmp_path / "seed.json")
    assert ds.name == "refusal" and ds.description == "seed pairs" and len(ds) == 2
    assert ds[0].prompt == "" and ds[0].metadata == {"category": "hacking"}

    bare = [{"question": "Q1", "pos": " yes", "neg": " no", "behavior": "x"},
            {"context": "C2", "Positive": " a", "Negative": " b"}]
    (tmp_path / "bare.json").write_text(json.dumps(bare))
    ds = ContrastPairDataset.load(tmp_path / "bare.json")
    assert [(p.prompt, p.positive, p.negative) for p in ds] == [("Q1", " yes", " no"), ("C2", " a", " b")]
    assert ds[0].metadata == {"behavior": "x"}


def test_malformed_files_name_the_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"positive": "a", "negative": "b"}\n\n{"positive": "a", "negative": \n')
    with pytest.raises(PairFileError, match=r"bad\.jsonl, line 3: invalid JSON"):
        ContrastPairDataset.load(bad)
    bad.write_text('{"positive": "a", "negative": "b"}\n{"positive": "a", "neg_text": "b"}\n')
    with pytest.raises(PairFileError, match=r"line 2: missing negative"):
        ContrastPairDataset.load(bad)
    bad.write_text('{"positive": "a", "negative": ["b", "c"]}\n')
    with pytest.raises(PairFileError, match=r"line 1: 'negative' must be a string"):
        ContrastPairDataset.load(bad)

    bad_json = tmp_path / "bad.json"
    bad_json.write_text('{"pairs": [\n  {"positive": "a", "negative": "b"},\n  {"positive": "", "negative": "b"}\n]}')
    with pytest.raises(PairFileError, match=r"item 1 \(line 3\): empty positive"):
        ContrastPairDataset.load(bad_json)
    bad_json.write_text('{"pairs": [\n  {"positive": "a",, }\n]}')
    with pytest.raises(PairFileError, match=r"bad\.json, line 2: invalid JSON"):
        ContrastPairDataset.load(bad_json)

    bad_csv = tmp_path / "bad.csv"
    bad_csv.write_text("prompt,positive,negative\np,a,b\np,a\n")
    with pytest.raises(PairFileError, match=r"bad\.csv, line 3: empty negative|bad\.csv, line 3: missing negative"):
        ContrastPairDataset.load(bad_csv)
    with pytest.raises(PairFileError, match="unsupported file type"):
        ContrastPairDataset.load(tmp_path / "pairs.txt")


def test_bundled_datasets():
    names = ContrastPairDataset.bundled_names()
    for name in ("sentiment", "formality", "refusal", "conciseness"):
        assert name in names
        ds = ContrastPairDataset.from_bundled(name)
        assert ds.name == name and len(ds) >= 40
    assert "sentiment_eval" not in names and "eval_prompts" not in names  # not contrast pairs
    with pytest.raises(KeyError, match="sentiment"):
        ContrastPairDataset.from_bundled("no-such-behaviour")
    assert len(load_pairs("formality")) == len(ContrastPairDataset.from_bundled("formality"))


def test_split_is_seeded_and_disjoint():
    ds = ContrastPairDataset([ContrastPair(f"p{i}", f"n{i}") for i in range(20)], name="s")
    train, held = ds.split(0.25, seed=1)
    assert len(held) == 5 and len(train) == 15 and train.name == "s"
    assert {p.positive for p in train}.isdisjoint({p.positive for p in held})
    assert [p.positive for p in held] == [p.positive for p in ds.split(0.25, seed=1)[1]]
    assert [p.positive for p in held] != [p.positive for p in ds.split(0.25, seed=2)[1]]


def test_texts_and_chat_template(tiny_hf):
    _, tok = tiny_hf
    assert join_text("Q?", "A.") == "Q? A." and join_text("It was", " good") == "It was good"
    assert join_text("", "x") == "x"
    pair = ContrastPair("Yes.", "No.", "Is it?")
    pos, neg = pair.texts(tok, chat_template=True)
    assert "Is it?" in pos and pos.endswith("Yes.") and neg.endswith("No.")
    assert pos[: -len("Yes.")] == neg[: -len("No.")]


def test_from_rotalabs_without_the_package():
    try:
        import rotalabs_steer  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match="rotalabs-steer"):
            ContrastPairDataset.from_rotalabs("refusal")
    else:  # pragma: no cover - only where the seed is installed
        assert len(ContrastPairDataset.from_rotalabs("refusal")) > 0
