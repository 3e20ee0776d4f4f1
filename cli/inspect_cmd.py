"""``vsteer inspect PATH``: what a vector file holds, for our format, the seed's and GGUF.

Loading verifies the file (format, layer convention, shapes, content hash), so a file
that inspects cleanly is one the engine will accept.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("path", help="vector set directory, rotalabs-steer directory, or .gguf control vector")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def describe(path: str | Path) -> dict[str, Any]:
    """Everything ``inspect`` shows, as plain data."""
    from vsteer.engine.formats import detect_format, read_metadata

    p = Path(path)
    fmt = detect_format(p)
    vs = fmt.load(p)
    kind = fmt.name
    meta = read_metadata(p) if kind == "vsteer" else {}
    act = vs.provenance.get("mean_activation_norm") or {}
    layers = []
    for layer, norm in vs.norms().items():
        entry: dict[str, Any] = {"layer": layer, "norm": round(norm, 6)}
        a = act.get(str(layer), act.get(layer))
        if a:
            entry["mean_activation_norm"] = a
            entry["relative_norm"] = round(norm / a, 6)
        layers.append(entry)
    return {
        "path": str(p), "format": kind, "behaviour": vs.behaviour, "model_id": vs.model_id,
        "method": vs.method, "hidden_size": vs.hidden_size, "num_layers": vs.num_layers, "layers": vs.layers,
        "per_layer": layers, "params": vs.params,
        "provenance": {k: v for k, v in vs.provenance.items() if k != "mean_activation_norm"},
        **({"sha256": meta.get("sha256"), "created_at": meta.get("created_at"),
            "format_version": meta.get("format_version")} if meta else {}),
    }


def _text(info: dict[str, Any]) -> str:
    lines = [f"{info['path']}  ({info['format']} format)"]
    for key in ("behaviour", "model_id", "method", "hidden_size", "num_layers", "created_at", "sha256"):
        if info.get(key) not in (None, ""):
            lines.append(f"  {key:<12} {info[key]}")
    if info["params"]:
        lines.append("  params       " + ", ".join(f"{k}={v}" for k, v in info["params"].items()))
    prov = info["provenance"]
    if isinstance(prov.get("dataset"), dict):
        d = prov["dataset"]
        lines.append(f"  dataset      {d.get('name') or d.get('source') or '?'} ({d.get('size')} pairs)")
    for key in ("date", "imported_from"):
        if prov.get(key):
            lines.append(f"  {key:<12} {prov[key]}")
    if isinstance(prov.get("versions"), dict):
        lines.append("  versions     " + ", ".join(f"{k} {v}" for k, v in prov["versions"].items()))
    scores = prov.get("layer_scores") or {}
    lines.append(f"  {'layer':>5}  {'norm':>10}  {'act_norm':>10}  {'relative':>8}"
                 + ("  heldout_acc  margin" if scores else ""))
    for e in info["per_layer"]:
        line = (f"  {e['layer']:>5}  {e['norm']:10.4f}  {e.get('mean_activation_norm', float('nan')):10.4f}"
                f"  {e.get('relative_norm', float('nan')):8.4f}")
        s = scores.get(str(e["layer"]))
        if s:
            line += f"  {s['accuracy']:11.3f}  {s['margin']:6.2f}"
        lines.append(line)
    if scores:
        lines.append(f"  layer scores for {len(scores)} candidate layers: "
                     + ", ".join(f"{k}: {v['accuracy']:.2f}/{v['margin']:.2f}" for k, v in scores.items()))
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from vsteer.engine.errors import VectorFileError

    try:
        info = describe(args.path)
    except (VectorFileError, ValueError, OSError, ImportError) as e:
        print(f"vsteer inspect: error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(info, indent=2, sort_keys=True, default=str) if args.json else _text(info))
    return 0
