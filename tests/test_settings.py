"""Every VSTEER_* variable: read in one settings object, documented in one table."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from vsteer.engine.settings import Settings, SettingsError, parse_env, settings

ROOT = Path(__file__).resolve().parents[1]


def test_every_setting_is_documented_and_nothing_else():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    documented = set(re.findall(r"^\| `(VSTEER_[A-Z_]+)` \|", doc, flags=re.M))
    assert documented == {Settings.env_name(f) for f in Settings.model_fields}


def test_no_module_reads_vsteer_variables_itself():
    """os.environ access to VSTEER_* lives in engine/settings.py only (writes that point
    child processes somewhere, like set_vectors_dir, go through Settings.env_name)."""
    offenders = []
    for folder in ("engine", "extract", "eval", "serving", "cli"):
        for path in (ROOT / folder).rglob("*.py"):
            if path.name == "settings.py":
                continue
            for i, line in enumerate(path.read_text().splitlines(), 1):
                if re.search(r"""environ(\.get)?\s*[\[(]\s*["']VSTEER_""", line) or "getenv(\"VSTEER_" in line:
                    offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, "\n".join(offenders)


def test_values_are_parsed_and_bad_ones_named():
    s = parse_env({"VSTEER_MAX_VECTORS": "4", "VSTEER_DISABLE": "1", "VSTEER_LAYERS": "8, 10"})
    assert s.max_vectors == 4 and s.disable is True and s.steerable_layers == {8, 10}
    with pytest.raises(SettingsError, match="VSTEER_MAX_VECTORS"):
        parse_env({"VSTEER_MAX_VECTORS": "many"})
    with pytest.raises(SettingsError, match="VSTEER_LAYERS"):
        _ = parse_env({"VSTEER_LAYERS": "8,x"}).steerable_layers


def test_settings_follow_the_environment(monkeypatch):
    monkeypatch.setenv("VSTEER_MAX_STRENGTH", "5")
    assert settings().max_strength == 5.0
    monkeypatch.setenv("VSTEER_MAX_STRENGTH", "7")
    assert settings().max_strength == 7.0
