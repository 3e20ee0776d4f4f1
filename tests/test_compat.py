"""vLLM version pin and runner refusal (clear errors, never a silent no-op)."""

from __future__ import annotations

import pytest

from vsteer.serving.compat import UnsupportedVLLMError, check_runner, check_vllm_version


@pytest.mark.parametrize("version", ["0.31.2", "0.33.0", "1.0.0"])
def test_unsupported_versions_refused(version, monkeypatch):
    monkeypatch.delenv("VSTEER_SKIP_VERSION_CHECK", raising=False)
    with pytest.raises(UnsupportedVLLMError, match=r"supports vLLM >=0.32,<0.33 \(found " + version):
        check_vllm_version(version)


def test_supported_versions_pass(monkeypatch):
    monkeypatch.delenv("VSTEER_SKIP_VERSION_CHECK", raising=False)
    assert check_vllm_version("0.32.0") == "0.32.0"
    assert check_vllm_version("0.32.3+cpu") == "0.32.3+cpu"


def test_installed_vllm_is_supported():
    pytest.importorskip("vllm")
    check_vllm_version()


def test_non_v1_runner_refused():
    pytest.importorskip("vllm")

    class V2Runner:
        pass

    with pytest.raises(UnsupportedVLLMError, match="V1 model runner"):
        check_runner(V2Runner())


def test_plugin_is_registered_as_entry_point():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("vsteer") == "vsteer.serving.plugin:register"
