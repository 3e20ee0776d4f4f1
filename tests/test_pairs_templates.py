"""Topic pairs from word lists (``vsteer pairs topic``) and mean-centring against a neutral
corpus (``vsteer extract --center``)."""

from __future__ import annotations

import json
from importlib import resources

import pytest
import torch

from vsteer.cli.main import main as cli_main
from vsteer.extract import ContrastPairDataset, collect_layer_stats, extract_caa, load_pairs
from vsteer.extract.centering import load_neutral, neutral_means
from vsteer.extract.concepts import TEMPLATES, bundled_topics, concept_pairs, topic_pairs


def _mentions(text: str, words) -> bool:
    return any(w in text for w in words)


def test_topic_pairs_swap_only_the_topic():
    words = ["the ocean", "waves", "the tide", "coral reefs"]
    pairs = topic_pairs(words, name="ocean", n=40, seed=3)
    assert len(pairs) == 40 and pairs.name == "ocean"
    contrast = {t.name: t for t in bundled_topics().values() if t.contrast}
    used = set()
    for p in pairs:
        template = p.metadata["template"]
        assert template in TEMPLATES
        assert _mentions(p.positive, words) and not _mentions(p.negative, words)
        # the same template around both: the text outside the slots is identical
        head = template.split("{")[0]
        assert p.positive.startswith(head) and p.negative.startswith(head)
        assert _mentions(p.negative, contrast[p.metadata["contrast"]].words)
        used.add(p.metadata["contrast"])
    assert len(used) == min(40, len(contrast))  # cycles through the contrast topics
    assert [p.positive for p in topic_pairs(words, n=40, seed=3)] == [p.positive for p in pairs]  # seeded
    assert [p.positive for p in topic_pairs(words, n=40, seed=4)] != [p.positive for p in pairs]


def test_contrast_words_that_are_concept_words_are_dropped():
    pairs = topic_pairs(["cars", "traffic"], n=12, contrast=["traffic"])
    assert all(not _mentions(p.negative.split("about ")[-1], ["traffic."]) for p in pairs)
    for p in pairs:
        assert "cars" not in p.negative.replace("traffic lights", "")
    with pytest.raises(ValueError, match="no contrast words left"):
        topic_pairs(["a", "b"], contrast_words=["a", "b"])
    with pytest.raises(ValueError, match="unknown contrast topics"):
        topic_pairs(["ocean"], contrast=["no-such-topic"])
    with pytest.raises(ValueError, match="at least one"):
        topic_pairs([" ", ""])


def test_pairs_cli_writes_a_file_extract_reads(tmp_path, capsys):
    out = tmp_path / "pairs.jsonl"
    assert cli_main(["pairs", "topic", "--words", "ocean,sea,waves", "--out", str(out), "-n", "10"]) == 0
    loaded = load_pairs(str(out))
    assert len(loaded) == 10
    assert all(_mentions(p.positive, ["ocean", "sea", "waves"]) for p in loaded)
    assert "wrote 10 pairs" in capsys.readouterr().out
    assert cli_main(["pairs", "topic", "--topic", "nope", "--out", str(out)]) == 2


@pytest.mark.parametrize("name", ["ocean", "cooking", "space"])
def test_bundled_concept_pairs_are_the_template_output(name):
    """The shipped pair files are exactly what ``vsteer pairs topic --topic NAME -n 64`` writes."""
    shipped = ContrastPairDataset.from_bundled(name)
    made = concept_pairs(name, n=64, seed=0)
    assert [(p.positive, p.negative) for p in shipped] == [(p.positive, p.negative) for p in made]
    assert name in ContrastPairDataset.bundled_names()


def test_neutral_corpus_is_not_a_pair_file():
    texts = load_neutral()
    assert len(texts) == 64 and len(set(texts)) == 64
    assert "neutral" not in ContrastPairDataset.bundled_names()
    assert "topics" not in ContrastPairDataset.bundled_names()
    raw = resources.files("vsteer.extract").joinpath("data", "neutral.jsonl").read_text()
    assert json.loads(raw.splitlines()[0])["text"] == texts[0]


def test_neutral_means_count_every_text_once(tiny_hf):
    """An odd corpus (its last text paired with itself) still averages each text once."""
    model, tok = tiny_hf
    texts = ["The meeting is on Monday.", "I walked to work today.", "Please send the report soon."]
    kw = dict(component="residual", token_position="mean", batch_size=2)
    together = neutral_means(model, tok, texts, [1, 3], **kw)
    alone = [neutral_means(model, tok, [t, t], [1, 3], **kw) for t in texts]
    for layer in (1, 3):
        expected = sum(a[layer] for a in alone) / 3
        assert torch.allclose(together[layer], expected, atol=1e-4)


def test_center_neutral_subtracts_the_corpus_mean(tiny_hf):
    model, tok = tiny_hf
    pairs = ContrastPairDataset.from_bundled("ocean")[:8]
    texts = load_neutral()[:6]
    kw = dict(token_position="mean", batch_size=4, progress=False)
    plain = extract_caa(model, tok, pairs, layers=[2], **kw)
    neutral = extract_caa(model, tok, pairs, layers=[2], center="neutral", neutral_texts=texts, **kw)
    both = extract_caa(model, tok, pairs, layers=[2], center="both", neutral_texts=texts, **kw)
    stats = collect_layer_stats(model, tok, pairs, [2], component="residual", token_position="mean", batch_size=4)[2]
    mean_n = neutral_means(model, tok, texts, [2], component="residual", token_position="mean", batch_size=4)[2]
    pos, neg = stats.mean_pos.cpu(), stats.mean_neg.cpu()
    assert torch.allclose(plain.vectors[2], (pos - neg).float(), atol=1e-4)
    assert torch.allclose(neutral.vectors[2], (pos - mean_n).float(), atol=1e-4)
    assert torch.allclose(both.vectors[2], (pos - (neg + mean_n) / 2).float(), atol=1e-4)
    assert neutral.params["center"] == "neutral" and neutral.params["neutral_texts"] == 6
    assert "center" not in plain.params
    with pytest.raises(ValueError, match="caa"):
        extract_caa(model, tok, pairs, layers=[2], method="pca", center="neutral", **kw)
    with pytest.raises(ValueError, match="center"):
        extract_caa(model, tok, pairs, layers=[2], center="middle", **kw)
