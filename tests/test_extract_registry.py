"""Issue 20, item 3: ``vsteer extract --out`` (and ``vsteer tune``'s record) into a vector
registry make a new version and swap the name atomically; they never write through the
live symlink into an immutable version directory."""

from __future__ import annotations

import pytest

from vsteer.cli.main import main as cli_main
from vsteer.engine import VectorRegistry
from vsteer.engine.formats import load_vector_set, read_metadata, set_sha256
from vsteer.extract import ContrastPairDataset, extract_caa


def _files(path):
    """The set's own files (the registry adds a ``.retired`` mark beside them when replaced)."""
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file() and not p.name.startswith(".")}


@pytest.fixture()
def registry(tiny_hf, tmp_path):
    model, tok = tiny_hf
    vs = extract_caa(model, tok, ContrastPairDataset.from_bundled("sentiment")[:4], layers=[1], progress=False,
                     behaviour="sentiment")
    (tmp_path / "vectors").mkdir()
    reg = VectorRegistry(tmp_path / "vectors")
    reg.add("sentiment", vs)
    return reg


@pytest.mark.parametrize("target", ["entry", "version_dir"])
def test_extract_into_a_registry_makes_a_new_version(tiny_model_path, registry, target, capsys):
    root = registry.root
    old_sha = registry.metadata("sentiment")["sha256"]
    old_dir = registry.version_path("sentiment", old_sha)
    before = _files(old_dir)
    out = root / "sentiment" if target == "entry" else old_dir  # the live name, or where its symlink points
    assert cli_main(["extract", "--model", tiny_model_path, "--pairs", "sentiment", "--layers", "2", "--out", str(out),
                     "--no-progress", "--no-check"]) == 0
    assert "vector registry" in capsys.readouterr().out
    new_sha = registry.metadata("sentiment")["sha256"]
    assert new_sha != old_sha
    live = root / "sentiment"
    assert live.is_symlink() and live.resolve() == registry.version_path("sentiment", new_sha).resolve()
    assert load_vector_set(str(live)).layers == [2]
    # the old version is untouched: same bytes, and its content still hashes to its name
    assert _files(old_dir) == before
    assert read_metadata(old_dir)["sha256"] == old_sha == set_sha256(load_vector_set(str(old_dir)))
    pinned, sha = registry.load_with_hash("sentiment", sha256=old_sha)  # a request pinned to it still gets it
    assert sha == old_sha and pinned.layers == [1]


def test_a_new_name_in_a_registry_goes_through_it(tiny_model_path, registry):
    assert cli_main(["extract", "--model", tiny_model_path, "--pairs", "sentiment", "--layers", "1", "--out",
                     str(registry.root / "fresh"), "--no-progress", "--no-check"]) == 0
    assert (registry.root / "fresh").is_symlink() and "fresh" in registry.names()


def test_tune_records_through_the_registry(tiny_model_path, registry, tmp_path):
    root = registry.root
    old_sha = registry.metadata("sentiment")["sha256"]
    before = _files(registry.version_path("sentiment", old_sha))
    probes = tmp_path / "probes.jsonl"
    probes.write_text('{"prompt": "The food was", "positive": [" great"], "negative": [" awful"]}\n'
                      '{"prompt": "The film was", "positive": [" good"], "negative": [" bad"]}\n')
    rc = cli_main(["tune", "--model", tiny_model_path, "--vectors", str(root / "sentiment"), "--probes", str(probes),
                   "--behaviour", "lever", "--no-prompting", "--bands", "1", "--strengths", "0.5,2", "--unit", "raw",
                   "--positions", "all", "--max-ppl-ratio", "1000", "--random-baselines", "0", "--max-new-tokens", "2",
                   "--choose", "max", "--out", str(tmp_path / "tune"), "--no-progress", "--no-plots"])
    if rc == 1:
        pytest.skip("nothing moved the probes on the random tiny model: nothing to record")
    assert rc == 0
    assert registry.metadata("sentiment")["sha256"] != old_sha
    assert load_vector_set(str(root / "sentiment")).recommended is not None
    assert _files(registry.version_path("sentiment", old_sha)) == before
