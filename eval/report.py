"""Human-facing output of a sweep report: PNG plots and a small text table."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def write_plots(report: dict[str, Any], out_dir: Path) -> list[str]:
    """behaviour_vs_strength.png and coherence_vs_strength.png in ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    unit = "fraction of mean residual norm" if report["strength_unit"] == "relative" else "raw multiplier"
    beh = report["behaviour"]
    files = []

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for layer in report["layers"]:
        pts = [p for p in report["points"] if p["layer"] == layer]
        xs = [p["strength"] for p in pts]
        ys = [p["behaviour"] for p in pts]
        line, = ax.plot(xs, ys, marker="o", label=f"layer {layer}")
        lo = [p["behaviour_ci95"][0] for p in pts]
        hi = [p["behaviour_ci95"][1] for p in pts]
        if all(v is not None for v in lo + hi):
            ax.fill_between(xs, lo, hi, color=line.get_color(), alpha=0.15)
    rb = report.get("random_baseline")
    if rb:
        for layer, per_strength in rb["per_layer"].items():
            for s, info in per_strength.items():
                ys = [report["baseline"]["behaviour"] + e for e in info["random_effects"] if e is not None]
                ax.scatter([float(s)] * len(ys), ys, color="grey", marker="x", s=14, zorder=3, alpha=0.7)
        ax.scatter([], [], color="grey", marker="x", label=f"same-norm random ({rb['n']}/layer)")
    ax.axhline(report["baseline"]["behaviour"], color="black", lw=0.7, ls=":")
    ax.set_xlabel(f"strength ({unit})")
    ax.set_ylabel(f"{beh['name']} score ({beh['unit']})")
    ax.set_title(f"{beh['name']}: behaviour vs strength [{report['backend']}]")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "behaviour_vs_strength.png", dpi=110)
    plt.close(fig)
    files.append("behaviour_vs_strength.png")

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4.0))
    for layer in report["layers"]:
        pts = [p for p in report["points"] if p["layer"] == layer]
        xs = [p["strength"] for p in pts]
        ax1.plot(xs, [p["ppl_ratio"] if p["ppl_ratio"] is not None else float("nan") for p in pts], marker="o",
                 label=f"layer {layer}")
        ax2.plot(xs, [p["distinct_2"] if p["distinct_2"] is not None else float("nan") for p in pts], marker="o",
                 label=f"layer {layer}")
    bound = report["tradeoff"]["criteria"]["max_ppl_ratio"]
    ax1.axhline(bound, color="red", lw=0.8, ls="--", label=f"bound {bound:g}x")
    ax1.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    plain = FuncFormatter(lambda v, _pos: f"{v:g}")
    ax1.yaxis.set_major_formatter(plain)
    ax1.yaxis.set_minor_formatter(plain)
    ax1.set_xlabel(f"strength ({unit})")
    ax1.set_ylabel("perplexity / unsteered perplexity")
    ax1.set_title("perplexity under the unsteered model")
    ax2.set_xlabel(f"strength ({unit})")
    ax2.set_ylabel("distinct-2 (words)")
    ax2.set_title("distinct-2 of generations")
    ax1.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out_dir / "coherence_vs_strength.png", dpi=110)
    plt.close(fig)
    files.append("coherence_vs_strength.png")
    return files


def format_report(report: dict[str, Any]) -> str:
    """A small text table of the sweep."""
    beh = report["behaviour"]
    rel = any(p.get("relative_strength") is not None for p in report["points"])
    lines = [f"{beh['name']} ({beh['unit']}) on {report['model']} [{report['backend']}], positions "
             f"{report['positions']}; unsteered: behaviour {_fmt(report['baseline']['behaviour'])}, "
             f"perplexity {_fmt(report['baseline']['perplexity'])}",
             f"{'layer':>5} {'strength':>9} {'rel':>7} {'behaviour':>10} {'ci95':>17} {'z_rand':>6} {'ppl':>8} "
             f"{'ppl x':>6} {'dist-2':>6}"]
    for p in report["points"]:
        ci = p["behaviour_ci95"]
        lines.append(f"{p['layer']:>5} {p['strength']:>9g} {_fmt(p['relative_strength'], 3) if rel else '-':>7} "
                     f"{_fmt(p['behaviour']):>10} {'[' + _fmt(ci[0]) + ', ' + _fmt(ci[1]) + ']':>17} "
                     f"{_fmt(p['z_vs_random'], 1) if p['z_vs_random'] is not None else '-':>6} "
                     f"{_fmt(p['perplexity'], 1):>8} {_fmt(p['ppl_ratio']):>6} {_fmt(p['distinct_2']):>6}")
    to = report["tradeoff"]
    c = to["criteria"]
    lines.append(f"trade-off (behaviour moved >= {c['target_delta']:g}, perplexity <= {c['max_ppl_ratio']:g}x):")
    for label in ("+", "-"):
        b = to["best"][label]
        lines.append(f"  {label}: " + (f"layer {b['layer']} strength {b['strength']:g} (relative "
                                         f"{_fmt(b['relative_strength'], 3)}), behaviour {_fmt(b['behaviour'])}, "
                                         f"perplexity x{_fmt(b['ppl_ratio'])}" if b else "not reached"))
    rb = report.get("random_baseline")
    if rb:
        lines.append(f"z_rand: (score change - mean change of {rb['n']} same-norm random directions) / their sd, "
                     "at the same layer and strength")
    return "\n".join(lines)


def _fmt(x: Any, digits: int = 2) -> str:
    return "nan" if x is None else f"{x:.{digits}f}"
