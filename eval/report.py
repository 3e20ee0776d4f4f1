"""Human-facing output of an evaluation: report.json, PNG plots, a small text table.

``write_report`` writes report.json before anything else, so a plotting failure (or a
machine without matplotlib, an optional dependency: ``pip install vsteer[eval]``) never
loses the numbers; the plots are then skipped with a message.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any


def write_report(report: dict[str, Any], out_dir: Path | None, *, plots: bool = True) -> None:
    """report.json in ``out_dir``, then the plots (their names go into report["plots"])."""
    if out_dir is None:
        return
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "report.json"
    path.write_text(json.dumps(report, indent=2))
    if not plots:
        return
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        report["plots_skipped"] = "matplotlib is not installed (pip install 'vsteer[eval]')"
        print(f"vsteer eval: plots skipped: {report['plots_skipped']}", file=sys.stderr)
    else:
        draw = write_frontier if report.get("kind") == "tune" else write_plots
        report["plots"] = draw(report, out_dir)
    path.write_text(json.dumps(report, indent=2))


def write_frontier(report: dict[str, Any], out_dir: Path) -> list[str]:
    """tune_frontier.png: every searched recipe's behaviour against its perplexity ratio
    on the select prompts, the budget, and the chosen recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = report["tune"]
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    groups: dict[str, list[dict[str, Any]]] = {}
    for c in t["search"]:
        groups.setdefault(f"{c['recipe']['band']} {c['recipe']['positions']} {c['recipe']['norm']}", []).append(c)
    for label, cs in groups.items():
        cs = sorted(cs, key=lambda c: abs(c["recipe"]["strength"]))
        ax.plot([c["ppl_ratio"] for c in cs], [c["behaviour"] for c in cs], marker="o", ms=3, lw=0.8, label=label)
    ax.axvline(t["max_ppl_ratio"], color="red", lw=0.8, ls="--", label=f"budget {t['max_ppl_ratio']:g}x")
    ax.axhline(t["select_baseline"]["behaviour"], color="black", lw=0.7, ls=":", label="unsteered")
    if t["chosen"]:
        sel = t["chosen"]["select"]
        ax.scatter([sel["ppl_ratio"]], [sel["behaviour"]], s=120, facecolors="none", edgecolors="black", zorder=4,
                   label="chosen")
    ax.set_xscale("log")
    ax.set_xlabel("perplexity / unsteered perplexity (select prompts)")
    ax.set_ylabel(f"{report['behaviour']['name']} ({report['behaviour']['unit']})")
    ax.set_title(f"tune {report['behaviour']['name']}: search frontier [{report['backend']}]")
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(out_dir / "tune_frontier.png", dpi=110)
    plt.close(fig)
    return ["tune_frontier.png"]


def _series(report: dict[str, Any]) -> list[tuple[str, list[dict[str, Any]]]]:
    """(label, points) per variant that has a strength sweep (ablations are single points)."""
    out: dict[str, list[dict[str, Any]]] = {}
    for p in report["points"]:
        if p.get("op", "add") != "ablate":
            out.setdefault(str(p.get("variant", p["layer"])), []).append(p)
    return list(out.items())


def _name(label: str) -> str:
    return f"layer {label}" if label.isdigit() else label


def write_plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    """behaviour_vs_strength.png and coherence_vs_strength.png in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter

    unit = "fraction of mean residual norm" if report["strength_unit"] == "relative" else "raw multiplier"
    beh = report["behaviour"]
    series = _series(report)
    files = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, pts in series:
        xs = [p["strength"] for p in pts]
        line, = ax.plot(xs, [p["behaviour"] for p in pts], marker="o", label=_name(label))
        lo = [p["behaviour_ci95"][0] for p in pts]
        hi = [p["behaviour_ci95"][1] for p in pts]
        if all(v is not None for v in lo + hi):
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    rb = report.get("random_baseline")
    if rb:
        for per_strength in rb["per_layer"].values():
            for s, info in per_strength.items():
                if info:
                    ys = [report["baseline"]["behaviour"] + e for e in info["random_effects"] if e is not None]
                    ax.scatter([float(s)] * len(ys), ys, color="grey", marker="x", s=14, zorder=3, alpha=0.7)
        ax.scatter([], [], color="grey", marker="x", label=f"same-norm random ({rb['n']} per point)")
    ax.axhline(report["baseline"]["behaviour"], color="black", lw=0.7, ls=":")
    comp = report.get("comparison")
    if comp and comp.get("prompting") and comp["prompting"]["behaviour"] is not None:
        ax.axhline(comp["prompting"]["behaviour"], color="tab:red", lw=0.9, ls="--", label="prompting")
    ax.set_xlabel(f"strength ({unit})")
    ax.set_ylabel(f"{beh['name']} score ({beh['unit']})")
    ax.set_title(f"{beh['name']}: behaviour vs strength [{report['backend']}]")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "behaviour_vs_strength.png", dpi=110)
    plt.close(fig)
    files.append("behaviour_vs_strength.png")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.0))
    nan = float("nan")
    for label, pts in series:
        xs = [p["strength"] for p in pts]
        ax1.plot(xs, [p["ppl_ratio"] if p["ppl_ratio"] is not None else nan for p in pts], marker="o",
                 label=_name(label))
        ax2.plot(xs, [p["distinct_2"] if p["distinct_2"] is not None else nan for p in pts], marker="o",
                 label=_name(label))
    bound = report["tradeoff"]["criteria"]["max_ppl_ratio"]
    ax1.axhline(bound, color="red", lw=0.8, ls="--", label=f"bound {bound:g}x")
    ax1.set_yscale("log")
    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax1.yaxis.set_major_formatter(plain)
    ax1.yaxis.set_minor_formatter(plain)
    for a in (ax1, ax2):
        a.set_xlabel(f"strength ({unit})")
    ax1.set_ylabel("perplexity / unsteered perplexity")
    ax1.set_title("perplexity under the unsteered model")
    ax2.set_ylabel("distinct-2 (words)")
    ax2.set_title("distinct-2 of generations")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "coherence_vs_strength.png", dpi=110)
    plt.close(fig)
    files.append("coherence_vs_strength.png")
    return files


def format_report(report: dict[str, Any]) -> str:
    """A small text table of the sweep, the trade-off and the prompting comparison."""
    beh = report["behaviour"]
    rel = any(p.get("relative_strength") is not None for p in report["points"])
    lines = [f"{beh['name']} ({beh['unit']}) on {report['model']} [{report['backend']}], positions "
             f"{report['positions']}; unsteered: behaviour {_fmt(report['baseline']['behaviour'])}, "
             f"perplexity {_fmt(report['baseline']['perplexity'])}",
             f"{'variant':>14} {'strength':>9} {'rel':>7} {'behaviour':>10} {'ci95':>17} {'z_rand':>6} {'ppl':>8} "
             f"{'ppl x':>6} {'dist-2':>6}"]
    for p in report["points"]:
        ci = p["behaviour_ci95"]
        strength = "ablate" if p.get("op") == "ablate" else f"{p['strength']:g}"
        lines.append(f"{str(p.get('variant', p['layer'])):>14} {strength:>9} "
                     f"{_fmt(p['relative_strength'], 3) if rel else '-':>7} "
                     f"{_fmt(p['behaviour']):>10} {'[' + _fmt(ci[0]) + ', ' + _fmt(ci[1]) + ']':>17} "
                     f"{_fmt(p['z_vs_random'], 1) if p['z_vs_random'] is not None else '-':>6} "
                     f"{_fmt(p['perplexity'], 1):>8} {_fmt(p['ppl_ratio']):>6} {_fmt(p['distinct_2']):>6}")
    to = report["tradeoff"]
    c = to["criteria"]
    lines.append(f"trade-off (behaviour moved >= {c['target_delta']:g}, perplexity <= {c['max_ppl_ratio']:g}x):")
    for label in ("+", "-"):
        b = to["best"][label]
        lines.append(f"  {label}: " + (f"{_name(str(b.get('variant') or b['layer']))} strength {b['strength']:g} "
                                         f"(relative {_fmt(b['relative_strength'], 3)}), behaviour "
                                         f"{_fmt(b['behaviour'])}, perplexity x{_fmt(b['ppl_ratio'])}"
                                         if b else "not reached"))
    rb = report.get("random_baseline")
    if rb:
        lines.append(f"z_rand: (score change - mean change of {rb['n']} same-norm random directions) / their sd, "
                     "with the same recipe")
    lines += format_comparison(report.get("comparison"))
    return "\n".join(lines)


def format_comparison(comp: dict[str, Any] | None) -> list[str]:
    if not comp:
        return []
    out = [f"prompting baseline (system: {comp['system_prompt']!r}); perplexity bound {comp['max_ppl_ratio']:g}x:"]
    for key in ("unsteered", "prompting", "steering", "both"):
        r = comp.get(key)
        if r is None:
            out.append(f"  {key:>10}: " + ("not run" if key == "prompting" else "no steered point within the bound"))
            continue
        recipe = r.get("recipe")
        where = (f" [{recipe['band']} {recipe['op']} {recipe['strength']:g} {recipe['unit']} {recipe['norm']} "
                 f"{recipe['positions']}]") if recipe else ""
        out.append(f"  {key:>10}: behaviour {_fmt(r['behaviour'])}, perplexity x{_fmt(r.get('ppl_ratio'))}{where}")
    return out


def _fmt(x: Any, digits: int = 2) -> str:
    return "nan" if x is None else f"{x:.{digits}f}"
