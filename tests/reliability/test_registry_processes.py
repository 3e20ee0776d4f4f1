"""Several processes writing and reading one registry (the k8s manifests run replicas on
one volume): no failed write, no failed or torn read, no temporary files left."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import torch

from vsteer.engine import SteeringVectorSet, VectorRegistry
from vsteer.engine.registry import TEMP_PREFIX

OPS = 200
WORKER = textwrap.dedent("""
    import json, sys, torch
    from vsteer.engine import SteeringVectorSet, VectorRegistry
    from vsteer.engine.formats import set_sha256
    root, who, ops = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    reg = VectorRegistry(root)
    failed_writes = failed_reads = torn = 0
    for i in range(ops):
        value = float(who * 100000 + i)
        try:
            reg.add("shared", SteeringVectorSet("shared", {1: torch.full((8,), value)}), overwrite=True)
        except Exception as e:
            failed_writes += 1
            print("write", type(e).__name__, e, file=sys.stderr)
        try:
            vs, sha = reg.load_with_hash("shared")
            v = vs.vectors[1]
            if set_sha256(vs) != sha or not bool((v == v[0]).all()):
                torn += 1
        except Exception as e:
            failed_reads += 1
            print("read", type(e).__name__, e, file=sys.stderr)
    print(json.dumps({"failed_writes": failed_writes, "failed_reads": failed_reads, "torn": torn}))
""")


def test_two_processes_writing_one_name(tmp_path):
    VectorRegistry(tmp_path).add("shared", SteeringVectorSet("shared", {1: torch.zeros(8)}))
    env = {**os.environ, "VSTEER_CACHE_BYTES": "0"}  # every read goes to disk
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(tmp_path), str(who), str(OPS)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for who in (1, 2)]
    results = []
    for p in procs:
        out, err = p.communicate(timeout=600)
        assert p.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert results == [{"failed_writes": 0, "failed_reads": 0, "torn": 0}] * 2, (results, err)
    reg = VectorRegistry(tmp_path)
    assert reg.names() == ["shared"]
    final = float(reg.load("shared").vectors[1][0])
    assert final in (100000 + OPS - 1, 200000 + OPS - 1)
    leftovers = [p for p in tmp_path.rglob(f"{TEMP_PREFIX}*")]
    assert not leftovers


def test_a_crashed_writer_leaves_the_old_set_and_its_temp_files_are_removed(tmp_path):
    reg = VectorRegistry(tmp_path)
    reg.add("v", SteeringVectorSet("v", {1: torch.ones(8)}))
    # what a writer killed mid-write leaves: a half-written version and a link not yet swapped in
    (tmp_path / ".versions" / "v" / f"{TEMP_PREFIX}999-abc").mkdir(parents=True)
    (tmp_path / f"{TEMP_PREFIX}999-def").symlink_to(".versions/v/nothing")
    assert reg.load("v").vectors[1][0] == 1.0 and reg.names() == ["v"]
    with reg.write_lock():  # the next writer (or a server start) cleans up
        pass
    assert not list(tmp_path.rglob(f"{TEMP_PREFIX}*"))


def test_hand_made_directories_are_taken_over_atomically(tmp_path):
    from vsteer.engine.formats import save_vector_set

    save_vector_set(SteeringVectorSet("v", {1: torch.ones(8)}), tmp_path / "v")  # vsteer extract --out
    reg = VectorRegistry(tmp_path)
    old_sha = reg.load_with_hash("v")[1]
    reg.add("v", SteeringVectorSet("v", {1: 2 * torch.ones(8)}), overwrite=True)
    assert (tmp_path / "v").is_symlink() and reg.load("v").vectors[1][0] == 2.0
    assert reg.load_with_hash("v", sha256=old_sha)[0].vectors[1][0] == 1.0  # kept for pinned requests


def test_names_refuse_trailing_newlines_and_paths(tmp_path):
    import pytest

    reg = VectorRegistry(tmp_path)
    for bad in ("calm\n", "calm\r", "../x", "a/b", ".hidden", "", "x" * 129):
        with pytest.raises(ValueError):
            reg.add(bad, SteeringVectorSet("v", {1: torch.ones(8)}))
    assert reg.names() == []
