"""Scheduler: admit no more distinct steering configs than the worker tables hold, and no
more new ones per step than ``VSTEER_MAX_NEW_CONFIGS_PER_STEP``.

Like vLLM's own ``max_loras`` check, it works on the waiting queue: before each
``Scheduler.schedule`` the requests whose configs would overflow the caps are taken out of
the queue and put back at its front afterwards, so they run a step later and everyone
else runs now. Running requests are never touched (their configs are resident). The count
reaches the workers' counters through the scheduler output (``vsteer_deferred``).
"""

from __future__ import annotations

import functools
import itertools
from typing import Any, Callable

from vsteer.engine.settings import settings

from .keys import PINS_KEY

DEFERRED_ATTR = "vsteer_deferred"


def fingerprint_of(request: Any) -> str | None:
    extra = getattr(getattr(request, "sampling_params", None), "extra_args", None)
    pins = extra.get(PINS_KEY) if extra else None
    return pins.get("fingerprint") if isinstance(pins, dict) else None


def hold_back(running: Any, waiting: Any, *, max_running: int, rows: int, new_per_step: int) -> list[Any]:
    """The waiting requests this step must not admit (in queue order). Only as many as
    could be admitted at all are looked at, so the cost is bounded by ``max_running``."""
    seen = {fp for fp in map(fingerprint_of, running) if fp is not None}
    new, held = 0, []
    for request in itertools.islice(waiting, max(0, max_running - len(running))):
        fp = fingerprint_of(request)
        if fp is None or fp in seen:
            continue
        if new >= new_per_step or len(seen) >= rows:
            held.append(request)
            continue
        seen.add(fp)
        new += 1
    return held


def schedule_wrapper(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def schedule(self, *args, **kwargs):
        held: list[Any] = []
        if self.waiting:
            s = settings()
            limit = self.max_num_running_reqs
            held = hold_back(self.running, self.waiting, max_running=limit, rows=s.table_rows(limit),
                             new_per_step=s.max_new_configs_per_step)
            if held:
                self.waiting.remove_requests(held)
        try:
            output = original(self, *args, **kwargs)
        finally:
            if held:
                self.waiting.prepend_requests(reversed(held))  # it prepends in reverse
        if held:
            setattr(output, DEFERRED_ATTR, len(held))
        return output

    return schedule
