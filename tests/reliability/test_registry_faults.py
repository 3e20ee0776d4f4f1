"""An operator's registry under attack (issue 20): a lock held by another process, reads
racing deletes, a version directory written into by hand, a full disk, mixed umasks.
No server: the registry and the admin operations in-process, other processes for real."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from vsteer.engine import SteeringError, SteeringResolver, SteeringVectorSet, VectorRegistry

H, L = 16, 6
HOLD_LOCK = textwrap.dedent("""
    import fcntl, sys, time
    with open(sys.argv[1], "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
""")


def _set(value: float, layer: int = 1) -> SteeringVectorSet:
    return SteeringVectorSet("v", {layer: torch.full((H,), value)})


class _LockHolder:
    """Another process holding the registry's write lock (a slow or stuck writer)."""

    def __init__(self, root: Path, seconds: float):
        self.proc = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(root / ".lock"), str(seconds)],
                                     stdout=subprocess.PIPE, text=True)
        assert self.proc.stdout.readline().strip() == "held"

    def __enter__(self) -> "_LockHolder":
        return self

    def __exit__(self, *exc) -> None:
        self.proc.kill()
        self.proc.wait(30)


# 2. a held lock stalls nobody -----------------------------------------------------------------------

def test_unknown_names_do_not_wait_for_a_held_lock(tmp_path, monkeypatch):
    """12 reads of unknown names while another process holds the lock for 20 s: each is
    answered at once (unknown_vector), and a read of a known name meanwhile stays fast."""
    monkeypatch.setenv("VSTEER_REGISTRY_LOCK_TIMEOUT_S", "30")
    reg = VectorRegistry(tmp_path)
    reg.add("known", _set(1.0))
    resolver = SteeringResolver(reg, hidden_size=H, num_layers=L)

    def unknown(i: int) -> str:
        try:
            resolver.resolve({"vectors": [{"name": f"missing{i}"}]})
        except SteeringError as e:
            return e.reason
        return "resolved"

    with _LockHolder(tmp_path, 20), ThreadPoolExecutor(13) as pool:
        start = time.monotonic()
        answers = list(pool.map(unknown, range(12)))
        known = pool.submit(resolver.resolve, {"vectors": [{"name": "known", "strength": 2.0}]}).result(timeout=60)
        took = time.monotonic() - start
    assert answers == ["unknown_vector"] * 12 and known is not None
    assert took < 5, f"reads waited {took:.1f} s on another process's lock"


def test_a_read_during_a_takeover_gives_up_after_the_timeout(tmp_path, monkeypatch):
    """The one case a reader waits for a writer (a hand-made directory being taken over,
    so the name is briefly missing): bounded by VSTEER_REGISTRY_LOCK_TIMEOUT_S."""
    from vsteer.engine.errors import RegistryBusyError
    from vsteer.engine.registry_files import ADOPT_PREFIX

    monkeypatch.setenv("VSTEER_REGISTRY_LOCK_TIMEOUT_S", "0.5")
    reg = VectorRegistry(tmp_path)
    with _LockHolder(tmp_path, 20):
        (tmp_path / (ADOPT_PREFIX + "v")).touch()  # what the (stuck) writer marks
        start = time.monotonic()
        with pytest.raises(RegistryBusyError):
            reg.metadata("v")
        assert time.monotonic() - start < 3
    reg.add("w", _set(1.0))  # the next writer removes the stuck writer's mark
    assert not (tmp_path / (ADOPT_PREFIX + "v")).exists()


def test_the_resolver_reports_a_busy_registry_as_registry_busy(tmp_path, monkeypatch):
    from vsteer.engine.registry_files import ADOPT_PREFIX

    monkeypatch.setenv("VSTEER_REGISTRY_LOCK_TIMEOUT_S", "0.3")
    reg = VectorRegistry(tmp_path)
    with _LockHolder(tmp_path, 20):
        (tmp_path / (ADOPT_PREFIX + "v")).touch()
        with pytest.raises(SteeringError) as e:  # a request error with its code, not a 500 or a hang
            SteeringResolver(reg, hidden_size=H, num_layers=L).resolve({"vectors": [{"name": "v"}]})
    assert e.value.reason == "registry_busy"


def test_writers_give_up_on_a_held_lock_and_change_nothing(tmp_path, monkeypatch):
    from vsteer.engine.errors import RegistryBusyError

    monkeypatch.setenv("VSTEER_REGISTRY_LOCK_TIMEOUT_S", "0.5")
    reg = VectorRegistry(tmp_path)
    reg.add("v", _set(1.0))
    with _LockHolder(tmp_path, 20):
        start = time.monotonic()
        with pytest.raises(RegistryBusyError):
            reg.add("v", _set(2.0), overwrite=True)
        with pytest.raises(RegistryBusyError):
            reg.remove("v")
        assert time.monotonic() - start < 4
    assert reg.load("v").vectors[1][0] == 1.0


def test_readers_see_a_takeover_of_a_hand_made_directory_as_one_swap(tmp_path):
    """A hand-made directory replaced through the registry: a reader never gets
    unknown_vector (or a broken file) although the name is missing for a moment."""
    from vsteer.engine.formats import save_vector_set

    errors: list[str] = []
    stop = threading.Event()
    for round_ in range(5):
        name = f"hand{round_}"
        save_vector_set(_set(1.0), tmp_path / name)
        reg = VectorRegistry(tmp_path)
        stop.clear()

        def read(name=name) -> None:
            r = VectorRegistry(tmp_path)
            while not stop.is_set():
                try:
                    r.load(name)
                except Exception as e:  # noqa: BLE001 - every failure is the finding
                    errors.append(f"{type(e).__name__}: {e}")

        readers = [threading.Thread(target=read) for _ in range(3)]
        for t in readers:
            t.start()
        time.sleep(0.05)
        reg.add(name, _set(2.0), overwrite=True)
        time.sleep(0.05)
        stop.set()
        for t in readers:
            t.join()
    assert not errors, errors[:5]


# 5. reads racing deletes: unknown, never broken -------------------------------------------------------

def test_reads_racing_deletes_are_unknown_never_broken(tmp_path, monkeypatch):
    """150 reads while another thread adds and deletes the name (symlinked versions and
    hand-made directories): each read succeeds or says unknown_vector."""
    from vsteer.engine.formats import save_vector_set

    monkeypatch.setenv("VSTEER_CACHE_BYTES", "0")  # every read goes to disk
    reg = VectorRegistry(tmp_path)
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            i += 1
            if i % 2:
                reg.add("v", _set(float(i)), overwrite=True)
            else:
                save_vector_set(_set(float(i)), tmp_path / "v")  # a hand-made directory (removed below)
            try:
                reg.remove("v")
            except KeyError:
                pass

    writer = threading.Thread(target=churn)
    writer.start()
    reasons: dict[str, int] = {}
    try:
        for resolver in [SteeringResolver(VectorRegistry(tmp_path), hidden_size=H, num_layers=L) for _ in range(150)]:
            try:
                resolver.resolve({"vectors": [{"name": "v"}]})
                reasons["ok"] = reasons.get("ok", 0) + 1
            except SteeringError as e:
                reasons[e.reason] = reasons.get(e.reason, 0) + 1
    finally:
        stop.set()
        writer.join()
    assert set(reasons) <= {"ok", "unknown_vector"}, reasons


# 3. a version directory written into by hand is never pruned ---------------------------------------------

def test_writing_through_the_live_link_does_not_let_pruning_destroy_the_name(tmp_path, monkeypatch):
    """`vsteer extract --out <vectors>/<name>` on a registered name writes into the live
    version directory (through the symlink). Pruning must not trust that directory's name:
    the name keeps working after the grace period and the next writes."""
    from vsteer.engine.formats import save_vector_set

    monkeypatch.setenv("VSTEER_LEASE_GRACE_S", "0.05")
    reg = VectorRegistry(tmp_path)
    reg.add("v", _set(1.0))
    reg.add("v", _set(2.0), overwrite=True)  # now an old version exists too
    save_vector_set(_set(3.0), tmp_path / "v", overwrite=True)  # through the link, into the live version
    time.sleep(0.1)
    reg.add("other", _set(4.0))  # a write: prunes what it may
    time.sleep(0.1)
    reg.add("other", _set(5.0), overwrite=True)
    assert torch.equal(reg.load("v").vectors[1], torch.full((H,), 3.0))
    assert "v" in reg.names()
    versions = list((tmp_path / ".versions" / "v").iterdir())
    assert len(versions) == 1, versions  # the retired, untouched version went; the hand-written one stayed


def test_a_version_changed_by_hand_while_retired_is_kept(tmp_path, monkeypatch):
    from vsteer.engine.formats import save_vector_set

    monkeypatch.setenv("VSTEER_LEASE_GRACE_S", "0.05")
    reg = VectorRegistry(tmp_path)
    reg.add("v", _set(1.0))
    old = os.readlink(tmp_path / "v")
    reg.add("v", _set(2.0), overwrite=True)
    save_vector_set(_set(7.0), tmp_path / old, overwrite=True)  # someone's data in a retired version
    time.sleep(0.1)
    reg.add("v", _set(3.0), overwrite=True)
    assert (tmp_path / old / "vsteer.json").is_file()


# 8. a failed first write leaves no empty version directory ------------------------------------------------

def test_a_full_disk_leaves_no_empty_versions_directory(tmp_path):
    script = textwrap.dedent(f"""
        import resource, signal, torch
        from vsteer.engine import SteeringVectorSet, VectorRegistry
        reg = VectorRegistry({str(tmp_path)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))
        try:
            reg.add("big", SteeringVectorSet("big", {{0: torch.ones(4096)}}))
        except OSError as e:
            print("failed", e.errno)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.stdout.startswith("failed"), out.stderr[-2000:]
    assert not (tmp_path / ".versions").exists()
    assert not list(tmp_path.rglob(".tmp-*"))


# 9. both files get the umask's mode ------------------------------------------------------------------------

@pytest.mark.parametrize("umask", [0o002, 0o022, 0o027])
def test_both_files_are_written_with_the_process_umask(tmp_path, umask):
    script = textwrap.dedent(f"""
        import os, torch
        from vsteer.engine import SteeringVectorSet, VectorRegistry
        os.umask({umask})
        VectorRegistry({str(tmp_path)!r}).add("v", SteeringVectorSet("v", {{1: torch.ones(8)}}))
    """)
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
    version = (tmp_path / "v").resolve()
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in version.iterdir() if not f.name.startswith(".")}
    assert modes == {"vectors.safetensors": 0o666 & ~umask, "vsteer.json": 0o666 & ~umask}, modes


# found attacking the fixes as an operator ------------------------------------------------------------------

def test_reads_in_another_process_racing_deletes_are_unknown_never_broken(tmp_path):
    """Two replicas on one volume: one adds and deletes, the other reads 150 times."""
    churn = textwrap.dedent(f"""
        import sys, time, torch
        from vsteer.engine import SteeringVectorSet, VectorRegistry
        reg = VectorRegistry({str(tmp_path)!r})
        print("go", flush=True)
        end = time.monotonic() + 60
        i = 0
        while time.monotonic() < end and not sys.stdin.closed:
            i += 1
            reg.add("v", SteeringVectorSet("v", {{1: torch.full(({H},), float(i))}}), overwrite=True)
            reg.remove("v")
    """)
    proc = subprocess.Popen([sys.executable, "-c", churn], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "VSTEER_CACHE_BYTES": "0"})
    try:
        assert proc.stdout.readline().strip() == "go"
        reasons: dict[str, int] = {}
        for _ in range(150):
            try:
                SteeringResolver(VectorRegistry(tmp_path), hidden_size=H, num_layers=L).resolve(
                    {"vectors": [{"name": "v"}]})
                reasons["ok"] = reasons.get("ok", 0) + 1
            except SteeringError as e:
                reasons[e.reason] = reasons.get(e.reason, 0) + 1
    finally:
        proc.kill()
        proc.wait(30)
    assert set(reasons) <= {"ok", "unknown_vector"}, reasons


def test_a_broken_hand_made_set_can_be_deleted(tmp_path):
    """It answers bad_vector_file to every request; deleting it used to fail (500) because
    the registry tried to keep its (unreadable) content for pinned requests."""
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "vsteer.json").write_text("{not json")
    reg = VectorRegistry(tmp_path)
    reg.remove("broken")
    assert not (tmp_path / "broken").exists() and reg.names() == []


def test_a_failed_swap_leaves_the_hand_made_set_live(tmp_path, monkeypatch):
    """No room for the new link: the write fails before the hand-made set is moved (it
    used to be moved first, leaving the name missing)."""
    import errno

    from vsteer.engine.formats import save_vector_set

    save_vector_set(_set(1.0), tmp_path / "v")
    reg = VectorRegistry(tmp_path)

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "symlink", no_space)
    with pytest.raises(OSError):
        reg.add("v", _set(2.0), overwrite=True)
    monkeypatch.undo()
    assert reg.load("v").vectors[1][0] == 1.0 and not (tmp_path / "v").is_symlink()


def test_a_prune_failure_does_not_fail_a_write_that_happened(tmp_path, monkeypatch):
    from vsteer.engine import registry_prune

    monkeypatch.setenv("VSTEER_LEASE_GRACE_S", "0.05")
    reg = VectorRegistry(tmp_path)
    reg.add("v", _set(1.0))
    reg.add("v", _set(2.0), overwrite=True)
    time.sleep(0.1)

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    original = registry_prune.remove_path
    monkeypatch.setattr(registry_prune, "remove_path", denied)
    reg.add("v", _set(3.0), overwrite=True)  # swapped; the old versions stay for the next write
    assert reg.load("v").vectors[1][0] == 3.0
    monkeypatch.setattr(registry_prune, "remove_path", original)
    time.sleep(0.1)
    reg.add("v", _set(4.0), overwrite=True)
    assert len(list((tmp_path / ".versions" / "v").iterdir())) <= 2  # the next write pruned them
