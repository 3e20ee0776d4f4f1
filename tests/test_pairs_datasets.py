"""Pair data people already have: Parquet files and datasets folders with named columns."""

from __future__ import annotations

import pytest

datasets = pytest.importorskip("datasets")

from vsteer.extract.hf_datasets import load_dataset_pairs, wants_datasets  # noqa: E402
from vsteer.extract.pairs import PairFileError  # noqa: E402

ROWS = {"chosen": ["I love it.", "What a joy."], "rejected": ["I hate it.", "What a pain."],
        "question": ["How is it?", ""]}


def test_parquet_file_with_named_columns(tmp_path):
    path = tmp_path / "prefs.parquet"
    datasets.Dataset.from_dict(ROWS).to_parquet(str(path))
    assert wants_datasets(path, columns_given=False)
    pairs = load_dataset_pairs(path, positive_column="chosen", negative_column="rejected", prompt_column="question")
    assert [(p.positive, p.negative, p.prompt) for p in pairs] == [
        ("I love it.", "I hate it.", "How is it?"), ("What a joy.", "What a pain.", "")]


def test_saved_dataset_folder_and_splits(tmp_path):
    folder = tmp_path / "saved"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(ROWS),
                          "test": datasets.Dataset.from_dict({k: v[:1] for k, v in ROWS.items()})}
                         ).save_to_disk(str(folder))
    assert len(load_dataset_pairs(folder, positive_column="chosen", negative_column="rejected")) == 2
    assert len(load_dataset_pairs(folder, positive_column="chosen", negative_column="rejected", split="test")) == 1
    with pytest.raises(PairFileError, match="no split 'dev'"):
        load_dataset_pairs(folder, positive_column="chosen", negative_column="rejected", split="dev")


def test_missing_columns_are_named_with_what_exists(tmp_path):
    path = tmp_path / "prefs.csv"
    datasets.Dataset.from_dict(ROWS).to_csv(str(path))
    with pytest.raises(PairFileError) as e:
        load_dataset_pairs(path)  # default columns positive/negative are not there
    assert "positive, negative" in str(e.value) and "chosen, rejected, question" in str(e.value)


def test_extract_cli_reads_parquet(tmp_path, tiny_model_path):
    from vsteer.cli.main import main
    from vsteer.engine import load_vector_set

    path = tmp_path / "prefs.parquet"
    datasets.Dataset.from_dict(ROWS).to_parquet(str(path))
    assert main(["extract", "--model", tiny_model_path, "--pairs", str(path), "--positive-column", "chosen",
                 "--negative-column", "rejected", "--layers", "1", "--out", str(tmp_path / "v"), "--no-progress"]) == 0
    assert load_vector_set(tmp_path / "v").provenance["dataset"]["size"] == 2
    assert main(["extract", "--model", tiny_model_path, "--pairs", str(path), "--layers", "1", "--out",
                 str(tmp_path / "w")]) == 2  # no positive/negative columns: a clear error, exit 2
