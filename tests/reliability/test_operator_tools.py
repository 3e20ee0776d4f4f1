"""What `make` does on a developer's machine (issue 20 #10): `make tools` installs
Prometheus for the monitoring test and must never stop a Prometheus it did not start."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_make_tools_stops_only_the_service_it_installed(tmp_path):
    """The recipe runs with stand-ins for apt-get, sudo, service and the kill commands
    (Prometheus "missing", its init script failing as in a container): it may stop the
    packaged service, and must not kill processes by name (`pkill -x prometheus` used to
    kill a developer's own Prometheus)."""
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    for tool, status in {"apt-get": 0, "sudo": 0, "service": 1, "pkill": 0, "killall": 0, "kill": 0}.items():
        stub = bin_dir / tool
        stub.write_text(f'#!/bin/sh\necho "{tool} $*" >> {log}\nexit {status}\n')
        stub.chmod(0o755)
    out = subprocess.run([make, "-s", "-C", str(ROOT), "tools"], env={"PATH": str(bin_dir), "HOME": str(tmp_path)},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr
    calls = log.read_text().splitlines()
    assert any(c.startswith("apt-get install") for c in calls), calls  # it did try to install
    assert "service prometheus stop" in calls, calls
    assert not [c for c in calls if c.split()[0] in ("pkill", "killall", "kill")], calls
