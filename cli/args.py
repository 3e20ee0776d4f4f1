"""Argument types shared by the subcommands."""

from __future__ import annotations

import argparse


def parse_layers(text: str) -> str | list[int]:
    """``all``, ``auto``, or a comma list of ints and ranges: ``8,10,12`` / ``4-8`` / ``-1``."""
    text = text.strip()
    if text in ("all", "auto"):
        return text
    layers: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in text.split(","))):
            if "-" in part[1:]:
                lo, hi = part[0] + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1]
                layers.extend(range(int(lo), int(hi) + 1))
            else:
                layers.append(int(part))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid --layers {text!r}: use all, auto, or e.g. 8,10,12 or 4-8")
    if not layers:
        raise argparse.ArgumentTypeError("--layers is empty")
    return layers


def words(text: str) -> list[str]:
    """A comma list of words or short phrases: ``dinosaurs,fossils,a T. rex``."""
    items = [w.strip() for w in text.split(",") if w.strip()]
    if not items:
        raise argparse.ArgumentTypeError("give a comma list of words, e.g. dinosaurs,fossils,t-rex")
    return items


def floats(text: str) -> list[float]:
    """A comma list of numbers: ``-8,-4,0,4,8``."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid list of numbers {text!r}: use e.g. -8,-4,0,4,8")
    if not values:
        raise argparse.ArgumentTypeError("empty list")
    return values
