"""Contrast pairs from data people already have: a local Parquet / JSON / CSV file or a
folder in the Hugging Face ``datasets`` layout (``save_to_disk`` output, or a folder of
data files), read through ``datasets`` (the optional extra ``vsteer[datasets]``).

Columns are named by the caller (``--positive-column`` ...); a missing one is an error
that lists the columns the data has.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .pairs import ContrastPair, ContrastPairDataset, PairFileError

_BUILDERS = {".parquet": "parquet", ".arrow": "arrow", ".json": "json", ".jsonl": "json", ".csv": "csv"}


def wants_datasets(path: str | os.PathLike, columns_given: bool) -> bool:
    """Whether ``--pairs`` should go through ``datasets`` rather than vsteer's own readers."""
    p = Path(path)
    return columns_given or p.is_dir() or p.suffix.lower() in (".parquet", ".arrow")


def _load(path: Path, split: str | None) -> Any:
    try:
        import datasets
    except ImportError as e:
        raise PairFileError("reading Parquet files and datasets folders needs the `datasets` package: "
                            "pip install 'vsteer[datasets]'") from e
    if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
        loaded = datasets.load_from_disk(str(path))
    elif path.is_dir():
        loaded = datasets.load_dataset(str(path))
    elif path.suffix.lower() in _BUILDERS:
        loaded = datasets.load_dataset(_BUILDERS[path.suffix.lower()], data_files=str(path))
    else:
        raise PairFileError(f"{path}: not a Parquet/Arrow/JSON/CSV file or a datasets folder")
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        chosen = split or ("train" if "train" in loaded else names[0])
        if chosen not in loaded:
            raise PairFileError(f"{path}: no split {chosen!r}; it has {', '.join(names)}")
        return loaded[chosen]
    return loaded


def load_dataset_pairs(path: str | os.PathLike, *, positive_column: str = "positive",
                       negative_column: str = "negative", prompt_column: str | None = "prompt",
                       split: str | None = None) -> ContrastPairDataset:
    """Pairs from a local file or folder read with ``datasets``. ``prompt_column`` is
    optional in the data unless named explicitly by the caller (pass None for none)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"contrast-pair data {p} does not exist")
    table = _load(p, split)
    columns = list(table.column_names)
    wanted = [positive_column, negative_column] + ([prompt_column] if prompt_column not in (None, "prompt") else [])
    missing = [c for c in wanted if c not in columns]
    if missing:
        raise PairFileError(f"{p}: no column(s) {', '.join(missing)}; the data has {', '.join(columns)} "
                            "(choose with --positive-column / --negative-column / --prompt-column)")
    use_prompt = prompt_column is not None and prompt_column in columns
    pairs = []
    for i, row in enumerate(table):
        try:
            pairs.append(ContrastPair(positive=row[positive_column], negative=row[negative_column],
                                      prompt=row[prompt_column] if use_prompt and row[prompt_column] else ""))
        except (TypeError, ValueError) as e:
            raise PairFileError(f"{p}, row {i}: {e}") from None
    if not pairs:
        raise PairFileError(f"{p}: no rows")
    return ContrastPairDataset(pairs, name=p.stem, source=str(p))
