"""README's first command runs `vsteer demo`; check its HF path end to end on SmolLM2."""

from __future__ import annotations

import pytest

from vsteer.cli.main import main

pytestmark = pytest.mark.smollm2


def test_demo_prints_steered_and_unsteered(smollm2_path, tmp_path, capsys):
    assert main(["demo", "--backend", "hf", "--max-new-tokens", "12", "--vectors", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "[       unsteered]" in out and "[    +3 sentiment]" in out and "[    -3 sentiment]" in out
    assert (tmp_path / "sentiment" / "vsteer.json").is_file()
    lines = [line for line in out.splitlines() if line.startswith("  [")]
    assert len({line.split("]", 1)[1] for line in lines[:3]}) == 3, "steering should change the completion"
