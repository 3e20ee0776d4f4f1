"""GPU-safe tables: no host memory handed to an asynchronous host-to-device copy is ever
written while that copy may still be pending.

On GPU with async scheduling the host prepares step N+1 (and runs dummy steps for idle
data-parallel ranks) while step N's copies may still be in flight. Before this design the
tables kept a persistent pinned staging buffer and ``clear()`` zeroed it between steps: a
pending copy of the previous step could read those zeros and run that step unsteered.

These tests instrument every staged buffer: each upload records the exact host tensor
its copy reads and a snapshot of it, and the scenario (steps, dummy-run clears, evictions,
capture jobs) must leave every one of them untouched. No GPU needed: the staging path is
taken on CPU by injecting the uploader.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from vsteer.engine.resolver import SteeringResolver, encode_inline
from vsteer.serving import uploads
from vsteer.serving.prepared import PreparedSteering
from vsteer.serving.tables import SteeringTables

HIDDEN = 8


class PendingCopies:
    """An uploader that stages like ``uploads.upload_staged`` and remembers what each
    asynchronous copy would read, and what it held when the copy was issued."""

    def __init__(self) -> None:
        self.issued: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __call__(self, out: torch.Tensor, host) -> None:
        staged = uploads.stage(host, out.dtype)
        self.issued.append((staged, staged.clone()))
        out.copy_(staged)

    def assert_untouched(self) -> None:
        for i, (live, snapshot) in enumerate(self.issued):
            assert torch.equal(live, snapshot), f"copy {i}: its host buffer was written while it was pending"


def _prepared(value: float, positions: str = "all") -> PreparedSteering:
    resolver = SteeringResolver(None, hidden_size=HIDDEN, num_layers=4)
    spec = {"vectors": [{"name": "v", "data": {1: encode_inline(torch.full((HIDDEN,), value))}}],
            "positions": positions}
    return PreparedSteering.build(resolver.resolve(spec), dtype=torch.float32, max_projections=2)


def test_steps_and_dummy_runs_never_write_a_pending_copy_source():
    copies = PendingCopies()
    tables = SteeringTables([0, 1, 2], HIDDEN, max_configs=2, max_tokens=32, dtype=torch.float32, device="cpu",
                            uploader=copies)
    for step in range(6):
        configs = {f"c{step}": _prepared(1.0 + step), "shared": _prepared(9.0, "prompt")}  # evicts every step
        rows = tables.assign_rows(configs)
        n = 3 + step
        tables.set_token_rows(np.array([n, 2]), np.array([0, 1]), np.array([n, 2]),
                              np.array([rows[f"c{step}"], rows["shared"]]), np.array([0, 1]))
        expected = [rows[f"c{step}"]] * n + [rows["shared"], 0]
        assert tables.rows[: n + 2].tolist() == expected and not tables.rows[n + 2:].any()
        tables.clear()  # a dummy run of an idle data-parallel rank, between two real steps
        assert not tables.rows.any()
    assert copies.issued  # the staging path ran (rows and table rows alike)
    copies.assert_untouched()


def test_capture_uploads_never_write_a_pending_copy_source(monkeypatch):
    from torch import nn

    from vsteer.serving import capture
    from vsteer.serving.runners.base import StepBatch

    copies = PendingCopies()
    monkeypatch.setattr(capture, "uploader_for", lambda device: copies)
    runner = SimpleNamespace(model_config=SimpleNamespace(get_hidden_size=lambda: HIDDEN), max_num_tokens=32,
                             device="cpu", cache_config=SimpleNamespace(block_size=16))
    blocks = {i: nn.Identity() for i in range(2)}
    worker = capture.WorkerCapture(runner, blocks)
    worker.begin({"job": "j", "layers": [0, 1], "position": "mean"})
    request = SimpleNamespace(sampling_params=SimpleNamespace(extra_args={capture.CAPTURE_KEY: {"job": "j",
                                                                                                "group": 0}}),
                              prompt_token_ids=list(range(5)))
    for computed, n in ((0, 3), (3, 2)):
        worker.step(StepBatch(["r"], np.array([n]), np.array([computed]), np.array([5])), {"r": request}.get)
        worker.idle()  # a dummy run between the chunks
    assert copies.issued
    copies.assert_untouched()


def test_tables_and_capture_keep_no_pinned_staging():
    """The structural half: nothing persistent is staged; uploads take fresh blocks."""
    tables = SteeringTables([0], HIDDEN, max_configs=1, max_tokens=8, dtype=torch.float32, device="cpu")
    assert not any(isinstance(v, torch.Tensor) and v.is_pinned() for v in vars(tables).values())
    assert isinstance(tables._rows_host, np.ndarray)
    first, second = uploads.stage(np.arange(4), torch.int64), uploads.stage(np.arange(4), torch.int64)
    assert first.data_ptr() != second.data_ptr()
