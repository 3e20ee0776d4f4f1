"""Inputs of an evaluation sweep: behaviour probes, generation prompts, and the token-level
queries a backend scores. Shared by both backends, so both score exactly the same tokens."""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Iterable, Sequence


@dataclass(frozen=True)
class Query:
    """Score ``continuation`` token by token after ``context`` (token ids)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass
class Probe:
    prompt: str
    positive: list[str]
    negative: list[str]


def _data_text(name: str) -> str:
    return resources.files("vsteer.eval").joinpath("data", name).read_text(encoding="utf-8")


def _read_jsonl(path_or_bundled: str) -> list[dict[str, Any]]:
    p = Path(path_or_bundled)
    text = p.read_text(encoding="utf-8") if p.is_file() else _data_text(path_or_bundled)
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def load_probes(path_or_bundled: str) -> list[Probe]:
    items = []
    for i, rec in enumerate(_read_jsonl(path_or_bundled)):
        try:
            items.append(Probe(str(rec["prompt"]), list(rec["positive"]), list(rec["negative"])))
        except (KeyError, TypeError) as e:
            raise ValueError(f"{path_or_bundled}: item {i + 1} needs prompt, positive[], negative[] ({e})") from None
        if not items[-1].positive or not items[-1].negative:
            raise ValueError(f"{path_or_bundled}: item {i + 1} has an empty positive or negative list")
    return items


def load_prompts(path_or_bundled: str = "eval_prompts.jsonl") -> list[str]:
    return [str(rec["prompt"]) for rec in _read_jsonl(path_or_bundled)]


def chat_ids(tokenizer: Any, text: str, system: str | None = None) -> list[int]:
    """A user turn with the generation prompt when the tokenizer has a chat template
    (after a ``system`` message if given); else the plain text (the system text first)."""
    if getattr(tokenizer, "chat_template", None):
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(f"{system}\n\n{text}" if system else text)["input_ids"])


def probe_queries(tokenizer: Any, probes: Sequence[Probe], prefix: str | None = None) -> list[list[Query]]:
    """Per probe: its positive continuations, then its negative ones. ``prefix`` (the
    prompting baseline's instruction) goes before each probe on a line of its own."""
    out = []
    for p in probes:
        ctx = tuple(tokenizer(f"{prefix}\n\n{p.prompt}" if prefix else p.prompt)["input_ids"])
        conts = [tuple(tokenizer(w, add_special_tokens=False)["input_ids"]) for w in p.positive + p.negative]
        if any(not c for c in conts):
            raise ValueError(f"probe {p.prompt!r}: a continuation tokenizes to nothing")
        out.append([Query(ctx, c) for c in conts])
    return out


def stop_token_ids(tokenizer: Any, model_path: str) -> list[int]:
    """The tokenizer's EOS plus the generation config's EOS ids (what vLLM stops on)."""
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    cfg = Path(model_path) / "generation_config.json"
    if cfg.is_file():
        eos = json.loads(cfg.read_text()).get("eos_token_id")
        for e in (eos if isinstance(eos, list) else [eos]):
            if e is not None:
                ids.add(int(e))
    return sorted(ids)


def cut_at_stop(tokens: Sequence[int], stop_ids: Iterable[int]) -> list[int]:
    stops = set(stop_ids)
    out = []
    for t in tokens:
        if t in stops:
            break
        out.append(int(t))
    return out


def split_indices(n: int, part: str, seed: int = 0) -> list[int]:
    """A fixed half of ``range(n)``: ``select`` (chooses a recipe) or ``score`` (scores it),
    disjoint, from a seeded shuffle; ``all`` is everything. The two halves differ by at
    most one item."""
    import random

    if part == "all":
        return list(range(n))
    order = list(range(n))
    random.Random(seed).shuffle(order)
    half = (n + 1) // 2
    if part == "select":
        return sorted(order[:half])
    if part == "score":
        return sorted(order[half:])
    raise ValueError(f"part must be select, score or all; got {part!r}")
