"""Pinned versions: what the front-end validated is what every worker applies, even when
the set is overwritten or deleted while the request waits."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from vsteer.engine import SteeringError, SteeringResolver, SteeringVectorSet, VectorRegistry
from vsteer.engine.errors import VersionGoneError
from vsteer.engine.registry import VERSIONS_DIR, vector_cache

H, L = 16, 6
SPEC = {"vectors": [{"name": "v", "strength": 2.0}]}


def _set(value: float) -> SteeringVectorSet:
    return SteeringVectorSet("v", {1: torch.full((H,), value)})


def _frontend_then_worker(tmp_path, change) -> tuple:
    """Resolve like the front-end, change the registry, resolve like a fresh worker process."""
    front = SteeringResolver(VectorRegistry(tmp_path), hidden_size=H, num_layers=L)
    validated = front.resolve(SPEC)
    change(front.registry)
    worker = SteeringResolver(VectorRegistry(tmp_path), hidden_size=H, num_layers=L)
    return validated, worker


def test_overwrite_keeps_the_validated_content_for_pinned_requests(tmp_path):
    VectorRegistry(tmp_path).add("v", _set(1.0))
    validated, worker = _frontend_then_worker(tmp_path, lambda reg: reg.add("v", _set(5.0), overwrite=True))
    assert set(validated.versions) == {"v"}
    pinned = worker.resolve(SPEC, versions=validated.versions)
    assert pinned.fingerprint == validated.fingerprint
    assert torch.equal(pinned.layer_vectors[1], torch.full((H,), 2.0))
    fresh = worker.resolve(SPEC)  # a new request sees the new content
    assert fresh.fingerprint != validated.fingerprint and torch.equal(fresh.layer_vectors[1], torch.full((H,), 10.0))


def test_delete_keeps_the_validated_content_for_pinned_requests(tmp_path):
    VectorRegistry(tmp_path).add("v", _set(1.0))
    validated, worker = _frontend_then_worker(tmp_path, lambda reg: reg.remove("v"))
    assert worker.resolve(SPEC, versions=validated.versions).fingerprint == validated.fingerprint
    with pytest.raises(SteeringError) as e:
        worker.resolve(SPEC)
    assert e.value.reason == "unknown_vector"
    assert VectorRegistry(tmp_path).names() == []  # kept versions are not names


def test_pruned_version_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("VSTEER_LEASE_GRACE_S", "0.05")
    reg = VectorRegistry(tmp_path)
    reg.add("v", _set(1.0))
    validated = SteeringResolver(reg, hidden_size=H, num_layers=L).resolve(SPEC)
    reg.add("v", _set(2.0), overwrite=True)
    time.sleep(0.1)
    reg.add("v", _set(3.0), overwrite=True)  # prunes what no lease and no grace period covers
    vector_cache().clear()  # a fresh worker process has nothing cached
    worker = SteeringResolver(VectorRegistry(tmp_path), hidden_size=H, num_layers=L)
    with pytest.raises(SteeringError) as e:
        worker.resolve(SPEC, versions=validated.versions)
    assert e.value.reason == "vector_version_gone" and "neither current nor kept" in e.value.message


def test_a_leased_version_outlives_the_grace_period(tmp_path, monkeypatch):
    monkeypatch.setenv("VSTEER_LEASE_GRACE_S", "0.2")
    reg = VectorRegistry(tmp_path)
    reg.add("v", _set(1.0))
    sha1 = reg.load_with_hash("v")[1]
    reg.leases.acquire("v", sha1)  # an accepted request pins it
    reg.add("v", _set(2.0), overwrite=True)
    kept = tmp_path / VERSIONS_DIR / "v" / sha1
    time.sleep(0.5)  # past the grace period: only the lease keeps it (heartbeats refresh it)
    with reg.write_lock():
        assert reg.prune_versions() == 0
    assert kept.is_dir()
    reg.leases.release("v", sha1)  # the request finished: the grace period starts now
    with reg.write_lock():
        assert reg.prune_versions() == 0
    time.sleep(0.3)
    with reg.write_lock():
        assert reg.prune_versions() == 1
    assert not kept.exists()


def test_a_lease_held_by_another_process_keeps_the_version(tmp_path, monkeypatch):
    monkeypatch.setenv("VSTEER_LEASE_GRACE_S", "0.3")
    reg = VectorRegistry(tmp_path)
    reg.add("v", _set(1.0))
    sha1 = reg.load_with_hash("v")[1]
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from vsteer.engine.leases import LeaseKeeper;"
        f"k = LeaseKeeper.for_root(Path({str(tmp_path / '.leases')!r})); k.acquire('v', {sha1!r});"
        "print('held', flush=True); sys.stdin.readline()")], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        env={**os.environ, "VSTEER_LEASE_GRACE_S": "0.3"}, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        reg.add("v", _set(2.0), overwrite=True)
        time.sleep(0.8)
        with reg.write_lock():
            assert reg.prune_versions() == 0
        assert (tmp_path / VERSIONS_DIR / "v" / sha1).is_dir()
    finally:
        holder.communicate("\n", timeout=30)
    time.sleep(0.5)  # the holder is gone: its lease file ages out
    with reg.write_lock():
        assert reg.prune_versions() == 1


def test_pinned_hash_is_checked(tmp_path):
    reg = VectorRegistry(tmp_path)
    reg.add("v", _set(1.0))
    with pytest.raises(VersionGoneError):
        reg.load_with_hash("v", sha256="0" * 64)
    with pytest.raises(ValueError, match="invalid content hash"):
        reg.load_with_hash("v", sha256="../../etc")
    with pytest.raises(ValueError):
        reg.path_for(VERSIONS_DIR)


def test_inline_vectors_are_not_pinned(tmp_path):
    from vsteer.engine.resolver import encode_inline

    reg = VectorRegistry(tmp_path)
    reg.add("v", _set(1.0))
    resolved = SteeringResolver(reg, hidden_size=H, num_layers=L).resolve(
        {"vectors": [{"name": "v"}, {"name": "mine", "data": {"2": encode_inline(torch.ones(H))}}]})
    assert set(resolved.versions) == {"v"}
