"""The scheduler's caps on steering configs: no more distinct configs running at once than
the worker tables hold (``VSTEER_MAX_CONFIGS``), no more new ones per step than
``VSTEER_MAX_NEW_CONFIGS_PER_STEP``; held-back requests keep their place and run a step
later, everyone else runs now. On vLLM's real request queue and a stand-in scheduler."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vsteer.serving.keys import PINS_KEY
from vsteer.serving.scheduling import DEFERRED_ATTR, hold_back, schedule_wrapper


class _Request:
    """What the scheduler wrapper reads of vLLM's ``Request`` (hashable by identity, like it)."""

    def __init__(self, rid: str, fingerprint: str | None):
        self.request_id = rid
        extra = {PINS_KEY: {"fingerprint": fingerprint}} if fingerprint else None
        self.sampling_params = SimpleNamespace(extra_args=extra)


_request = _Request


def test_hold_back_caps_new_and_total_configs():
    running = [_request("r0", "A"), _request("r1", None)]
    waiting = [_request("w0", "A"), _request("w1", "B"), _request("w2", "C"), _request("w3", None),
               _request("w4", "B"), _request("w5", "D")]
    held = hold_back(running, waiting, max_running=16, rows=8, new_per_step=1)
    # A is running (not new); B is the one new config this step (w4 shares it); C and D wait
    assert [r.request_id for r in held] == ["w2", "w5"]
    held = hold_back(running, waiting, max_running=16, rows=2, new_per_step=8)
    assert [r.request_id for r in held] == ["w2", "w5"]  # A and B fill the two rows
    assert hold_back(running, waiting, max_running=16, rows=8, new_per_step=8) == []
    # only requests that could be admitted at all are looked at
    assert hold_back(running, waiting, max_running=3, rows=1, new_per_step=1) == []


def test_held_requests_keep_their_place_in_vllms_queue(monkeypatch):
    pytest.importorskip("vllm")
    from vllm.v1.core.sched.request_queue import SchedulingPolicy, create_request_queue

    monkeypatch.setenv("VSTEER_MAX_NEW_CONFIGS_PER_STEP", "1")
    scheduled_rounds = []

    class Scheduler:
        max_num_running_reqs = 8

        def __init__(self):
            self.running, self.waiting = [], create_request_queue(SchedulingPolicy.FCFS)

        def schedule(self):
            # stand-in for vLLM's schedule(): admit everything waiting, in queue order
            admitted = list(self.waiting)
            for request in admitted:
                self.waiting.remove_request(request)
            self.running += admitted
            scheduled_rounds.append([r.request_id for r in admitted])
            return SimpleNamespace()

    sched = Scheduler()
    for rid, fp in (("a", "X"), ("b", "Y"), ("c", "Z"), ("d", None), ("e", "X")):
        sched.waiting.add_request(_request(rid, fp))
    schedule = schedule_wrapper(Scheduler.schedule)
    first = schedule(sched)
    assert scheduled_rounds[0] == ["a", "d", "e"] and getattr(first, DEFERRED_ATTR) == 2
    assert [r.request_id for r in sched.waiting] == ["b", "c"]  # in their original order, at the front
    second = schedule(sched)
    assert scheduled_rounds[1] == ["b"] and getattr(second, DEFERRED_ATTR) == 1
    third = schedule(sched)
    assert scheduled_rounds[2] == ["c"] and not hasattr(third, DEFERRED_ATTR)
