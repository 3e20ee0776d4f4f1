"""Contrast pairs: the data a steering vector is extracted from.

A pair is two completions of one (possibly empty) prompt, one showing the behaviour
(``positive``) and one not (``negative``). Files are read leniently (our JSONL/JSON/CSV,
the seed's (rotalabs-steer) ``{"behavior", "pairs": [...]}`` JSON, and common key
spellings) but strictly checked: a malformed record is an error naming file and line.
"""

from __future__ import annotations

import csv
import io
import json
import os
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence, overload

# Accepted spellings, first match wins. The CAA paper's A/B files use the long names.
POSITIVE_KEYS = ("positive", "pos", "answer_matching_behavior", "matching", "chosen")
NEGATIVE_KEYS = ("negative", "neg", "answer_not_matching_behavior", "not_matching", "rejected")
PROMPT_KEYS = ("prompt", "context", "question", "instruction", "input")
_KNOWN_KEYS = frozenset(POSITIVE_KEYS + NEGATIVE_KEYS + PROMPT_KEYS)
_LIST_KEYS = ("pairs", "data", "examples", "items")
_NAME_KEYS = ("behaviour", "behavior", "name")
SUFFIXES = (".jsonl", ".json", ".csv")
_DATA_PACKAGE = "vsteer.extract"
_DATA_DIR = "data"


class PairFileError(ValueError):
    """A contrast-pair file that cannot be read; the message names the file and line."""


def join_text(prompt: str, completion: str) -> str:
    """``prompt + completion``, with one space between them when neither side has one,
    so that "Question?" + "Answer." does not run together as "Question?Answer."."""
    if not prompt or prompt[-1].isspace() or completion[:1].isspace():
        return prompt + completion
    return prompt + " " + completion


@dataclass
class ContrastPair:
    """One prompt with a completion that shows the behaviour and one that does not."""

    positive: str
    negative: str
    prompt: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("positive", "negative", "prompt"):
            if not isinstance(getattr(self, name), str):
                raise TypeError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        if not self.positive or not self.negative:
            raise ValueError("a contrast pair needs a non-empty positive and negative text")

    def texts(self, tokenizer: Any = None, chat_template: bool = False) -> tuple[str, str]:
        """The (positive, negative) texts to run through the model.

        Plain: ``join_text(prompt, completion)``. With ``chat_template``, the prompt is the
        user turn rendered with the generation prompt and the completion follows it
        unterminated, so the last token is the completion's own last token, not an
        end-of-turn marker that both texts share.
        """
        if not chat_template:
            return join_text(self.prompt, self.positive), join_text(self.prompt, self.negative)
        head = self.prefix_text(tokenizer, chat_template)
        return head + self.positive, head + self.negative

    def prefix_text(self, tokenizer: Any = None, chat_template: bool = False) -> str:
        """What both texts share before the completion: the prompt, or with ``chat_template``
        the rendered user turn and generation prompt ("" for a plain pair without prompt)."""
        if not chat_template:
            return self.prompt
        if tokenizer is None or not getattr(tokenizer, "chat_template", None):
            raise ValueError("chat_template=True needs a tokenizer that has a chat template")
        return tokenizer.apply_chat_template([{"role": "user", "content": self.prompt}], tokenize=False,
                                             add_generation_prompt=True)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"prompt": self.prompt, "positive": self.positive, "negative": self.negative}
        if self.metadata:
            d["metadata"] = self.metadata
        return d


def _first(record: dict[str, Any], keys: Sequence[str]) -> tuple[str | None, Any]:
    for key in keys:
        if key in record and record[key] is not None:
            return key, record[key]
    lowered = {str(k).lower().strip(): k for k in record}
    for key in keys:
        if key in lowered and record[lowered[key]] is not None:
            return lowered[key], record[lowered[key]]
    return None, None


def pair_from_record(record: Any, where: str) -> ContrastPair:
    """Build a pair from one mapping, accepting the key spellings above."""
    if not isinstance(record, dict):
        raise PairFileError(f"{where}: expected an object with positive/negative texts, got "
                            f"{type(record).__name__}")
    pk, pos = _first(record, POSITIVE_KEYS)
    nk, neg = _first(record, NEGATIVE_KEYS)
    _, prompt = _first(record, PROMPT_KEYS)
    if pk is None or nk is None:
        raise PairFileError(f"{where}: missing {'positive' if pk is None else 'negative'} text (keys found: "
                            f"{', '.join(map(str, record)) or 'none'}; accepted: "
                            f"{'/'.join(POSITIVE_KEYS if pk is None else NEGATIVE_KEYS)})")
    for key, value in ((pk, pos), (nk, neg), ("prompt", prompt)):
        if value is not None and not isinstance(value, str):
            raise PairFileError(f"{where}: {key!r} must be a string, got {type(value).__name__}")
    if not pos or not neg:
        raise PairFileError(f"{where}: empty {'positive' if not pos else 'negative'} text")
    meta = dict(record.get("metadata") or {}) if isinstance(record.get("metadata"), dict) else {}
    meta.update({k: v for k, v in record.items() if k not in _KNOWN_KEYS and k != "metadata"})
    return ContrastPair(pos, neg, prompt or "", meta)


class ContrastPairDataset(Sequence[ContrastPair]):
    """An ordered, list-like collection of contrast pairs for one behaviour."""

    def __init__(self, pairs: Iterable[ContrastPair | dict[str, Any]] = (), name: str = "",
                 description: str = "", source: str = ""):
        self.pairs: list[ContrastPair] = [
            p if isinstance(p, ContrastPair) else pair_from_record(p, f"pair {i}") for i, p in enumerate(pairs)]
        self.name, self.description, self.source = name, description, source

    # -- list-like ---------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.pairs)

    @overload
    def __getitem__(self, index: int) -> ContrastPair: ...
    @overload
    def __getitem__(self, index: slice) -> "ContrastPairDataset": ...

    def __getitem__(self, index: int | slice) -> "ContrastPair | ContrastPairDataset":
        if isinstance(index, slice):
            return self._with(self.pairs[index])
        return self.pairs[index]

    def __iter__(self) -> Iterator[ContrastPair]:
        return iter(self.pairs)

    def __repr__(self) -> str:
        return f"ContrastPairDataset(name={self.name!r}, pairs={len(self)})"

    def append(self, pair: ContrastPair) -> None:
        self.pairs.append(pair)

    def extend(self, pairs: Iterable[ContrastPair]) -> None:
        self.pairs.extend(pairs)

    def _with(self, pairs: list[ContrastPair]) -> "ContrastPairDataset":
        return ContrastPairDataset(pairs, self.name, self.description, self.source)

    def split(self, holdout_fraction: float = 0.25, seed: int = 0) -> tuple["ContrastPairDataset",
                                                                           "ContrastPairDataset"]:
        """A seeded random (train, held-out) split; both parts keep at least one pair."""
        if not 0.0 < holdout_fraction < 1.0:
            raise ValueError(f"holdout_fraction must be in (0, 1), got {holdout_fraction}")
        if len(self) < 2:
            raise ValueError(f"cannot split {len(self)} pair(s) into train and held-out parts")
        order = list(range(len(self)))
        random.Random(seed).shuffle(order)
        n_hold = min(max(1, round(len(self) * holdout_fraction)), len(self) - 1)
        hold, train = sorted(order[:n_hold]), sorted(order[n_hold:])
        return self._with([self.pairs[i] for i in train]), self._with([self.pairs[i] for i in hold])

    # -- files -------------------------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike, name: str | None = None) -> "ContrastPairDataset":
        """Read .jsonl, .json (ours or the seed's shape) or .csv (header row required)."""
        p = Path(path)
        if p.suffix.lower() not in SUFFIXES:
            raise PairFileError(f"{p}: unsupported file type {p.suffix!r} (use {', '.join(SUFFIXES)})")
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as e:
            raise PairFileError(f"{p}: cannot read ({e.strerror or e})") from e
        except UnicodeDecodeError as e:
            raise PairFileError(f"{p}: not UTF-8 text ({e})") from e
        return cls.parse(text, p.suffix.lower(), source=str(p), name=name or p.stem)

    @classmethod
    def parse(cls, text: str, kind: str, *, source: str = "<string>", name: str = "") -> "ContrastPairDataset":
        """Parse file content of ``kind`` (".jsonl", ".json" or ".csv")."""
        readers = {".jsonl": _parse_jsonl, ".json": _parse_json, ".csv": _parse_csv}
        if kind not in readers:
            raise PairFileError(f"{source}: unsupported kind {kind!r}")
        pairs, found_name, description = readers[kind](text, source)
        if not pairs:
            raise PairFileError(f"{source}: no contrast pairs found")
        return cls(pairs, name=found_name or name, description=description, source=source)

    def save(self, path: str | os.PathLike) -> Path:
        """Write as .jsonl, .csv, or .json (the seed's shape plus ``prompt``)."""
        p = Path(path)
        kind = p.suffix.lower()
        p.parent.mkdir(parents=True, exist_ok=True)
        if kind == ".jsonl":
            p.write_text("".join(json.dumps(pair.to_dict(), ensure_ascii=False) + "\n" for pair in self),
                         encoding="utf-8")
        elif kind == ".json":
            p.write_text(json.dumps({"behavior": self.name, "description": self.description,
                                     "pairs": [pair.to_dict() for pair in self]}, indent=2, ensure_ascii=False),
                         encoding="utf-8")
        elif kind == ".csv":
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=["prompt", "positive", "negative"])
            writer.writeheader()
            for pair in self:
                writer.writerow({"prompt": pair.prompt, "positive": pair.positive, "negative": pair.negative})
            p.write_text(buf.getvalue(), encoding="utf-8")
        else:
            raise PairFileError(f"{p}: unsupported file type {p.suffix!r} (use {', '.join(SUFFIXES)})")
        return p

    # -- bundled and third-party data --------------------------------------------------
    @staticmethod
    def bundled_names() -> list[str]:
        """Names of the contrast-pair files shipped in ``vsteer/extract/data``
        (evaluation files there, which hold lists of completions, are left out)."""
        root = resources.files(_DATA_PACKAGE).joinpath(_DATA_DIR)
        names = []
        for entry in root.iterdir():
            if entry.name.endswith(".jsonl") and _looks_like_pairs(entry.read_text(encoding="utf-8")):
                names.append(entry.name[: -len(".jsonl")])
        return sorted(names)

    @classmethod
    def from_bundled(cls, name: str) -> "ContrastPairDataset":
        """A dataset shipped with vsteer, e.g. ``from_bundled("sentiment")``."""
        entry = resources.files(_DATA_PACKAGE).joinpath(_DATA_DIR, f"{name}.jsonl")
        if "/" in name or "\\" in name or not entry.is_file():
            raise KeyError(f"no bundled dataset {name!r}; bundled: {', '.join(cls.bundled_names()) or '(none)'}")
        return cls.parse(entry.read_text(encoding="utf-8"), ".jsonl", source=f"bundled:{name}", name=name)

    @classmethod
    def from_rotalabs(cls, behaviour: str) -> "ContrastPairDataset":
        """The seed's built-in pairs (``rotalabs_steer.datasets.load_<behaviour>_pairs``)."""
        try:
            from rotalabs_steer import datasets as seed  # type: ignore
        except ImportError as e:
            raise ImportError("from_rotalabs needs the seed package: pip install rotalabs-steer "
                              "(or export its pairs to JSON and use ContrastPairDataset.load)") from e
        key = behaviour.lower().replace("-", "_")
        loader = getattr(seed, f"load_{key}_pairs", None) or getattr(seed, f"get_{key}_pairs", None)
        if loader is None:
            known = sorted(n[5:-6] for n in dir(seed) if n.startswith("load_") and n.endswith("_pairs"))
            raise KeyError(f"rotalabs_steer has no {behaviour!r} pairs; it has {', '.join(known)}")
        data = loader()
        pairs = [ContrastPair(p.positive, p.negative, "", dict(getattr(p, "metadata", {}) or {})) for p in data]
        return cls(pairs, name=getattr(data, "behavior", key), description=getattr(data, "description", ""),
                   source=f"rotalabs_steer:{key}")


def load_pairs(spec: str | os.PathLike) -> ContrastPairDataset:
    """A file path if one exists there, else a bundled dataset name (what ``--pairs`` takes)."""
    p = Path(spec)
    if p.is_file():
        return ContrastPairDataset.load(p)
    if str(spec) in ContrastPairDataset.bundled_names():
        return ContrastPairDataset.from_bundled(str(spec))
    if p.suffix.lower() in SUFFIXES or os.sep in str(spec):
        raise FileNotFoundError(f"contrast-pair file {spec} does not exist")
    raise KeyError(f"{str(spec)!r} is neither a file nor a bundled dataset "
                   f"({', '.join(ContrastPairDataset.bundled_names())})")


# -- readers: each returns (pairs, name, description) ------------------------------------

def _parse_jsonl(text: str, source: str) -> tuple[list[ContrastPair], str, str]:
    pairs = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise PairFileError(f"{source}, line {lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
        pairs.append(pair_from_record(record, f"{source}, line {lineno}"))
    return pairs, "", ""


def _parse_json(text: str, source: str) -> tuple[list[ContrastPair], str, str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise PairFileError(f"{source}, line {e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
    name = description = ""
    items: Any = data
    if isinstance(data, dict):
        name = next((str(data[k]) for k in _NAME_KEYS if isinstance(data.get(k), str)), "")
        description = str(data.get("description") or "")
        key = next((k for k in _LIST_KEYS if isinstance(data.get(k), list)), None)
        if key is not None:
            items = data[key]
        elif _first(data, POSITIVE_KEYS)[0] is not None:
            items = [data]  # a single pair
        else:
            raise PairFileError(f"{source}: a JSON object must hold a list under one of "
                                f"{', '.join(map(repr, _LIST_KEYS))}")
    if not isinstance(items, list):
        raise PairFileError(f"{source}: expected a list of pairs, got {type(items).__name__}")
    line_of = _item_lines(text, len(items))
    pairs = [pair_from_record(item, f"{source}, item {i}" + (f" (line {line_of[i]})" if line_of else ""))
             for i, item in enumerate(items)]
    return pairs, name, description


def _item_lines(text: str, n: int) -> list[int]:
    """Best-effort line numbers of the list items (used only in error messages)."""
    decoder, lines, pos = json.JSONDecoder(), [], text.find("[")
    if pos < 0:
        return []
    pos += 1
    try:
        for _ in range(n):
            while text[pos] in " \t\r\n,":
                pos += 1
            lines.append(text.count("\n", 0, pos) + 1)
            _, pos = decoder.raw_decode(text, pos)
    except (ValueError, IndexError):
        return []
    return lines


def _parse_csv(text: str, source: str) -> tuple[list[ContrastPair], str, str]:
    reader = csv.DictReader(io.StringIO(text))
    if not reader.fieldnames:
        raise PairFileError(f"{source}, line 1: missing header row (expected columns prompt,positive,negative)")
    pairs = []
    for row in reader:
        where = f"{source}, line {reader.line_num}"
        if None in row:
            raise PairFileError(f"{where}: more fields than the header has")
        record = {k.strip(): v for k, v in row.items() if k is not None}
        if not any((v or "").strip() for v in record.values()):
            continue
        pairs.append(pair_from_record(record, where))
    return pairs, "", ""


def _looks_like_pairs(text: str) -> bool:
    for line in text.splitlines():
        if line.strip():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                return False
            return isinstance(record, dict) and all(isinstance(_first(record, keys)[1], str)
                                                    for keys in (POSITIVE_KEYS, NEGATIVE_KEYS))
    return False
