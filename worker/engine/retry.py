"""The engine's failure policy: run a batch, and when it fails, find out what to do with the rest.

Out of memory: halve the rows and retry what is not done (the engine keeps the smaller size for later
calls and grows it back a step after each batch that succeeds); one item out of memory alone fails
`out_of_memory`. Any other failure: split the items not done in two and run each half, until the
item that fails is alone (`engine_error`); its batch mates succeed. Every such failure counts in
Stats.batch_failures, so a run on valid input can be checked to have stayed off this path.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Iterator

import torch

from .generate import RowOutput
from .scheduler import InFlight
from .types import Result

if TYPE_CHECKING:
    from .engine import Engine, Prepared

log = logging.getLogger(__name__)
UNRUN = ("too_long", "too_many_rows")  # rows the scheduler ended without running: the item is done


def run(engine: Engine, batch: list[Prepared], slots: int, feed: Callable[[], list[Prepared]] | None = None,
        late_failures: list[Result] | None = None, drops=None) -> Iterator[list[Result]]:
    """Generate the batch with at most `slots` rows at once; on failure, back off and retry the rest.

    `feed` appends to `batch` while it runs; failures it met in preparing are yielded as they come.
    `drops` (engine._Drops): requests cancelled while they run, which leave at the next step.
    """
    initial = slots
    while batch or feed is not None:
        started = time.time()
        done: set[int] = set()
        partial: dict[int, list[RowOutput]] = {}  # choices of n > 1 items finished so far
        try:
            if engine.config.oom_above_batch is not None and slots > engine.config.oom_above_batch:
                raise torch.OutOfMemoryError(f"test hook: batch {slots} > {engine.config.oom_above_batch}")
            for rows in engine._loop(batch, slots, feed, drops):
                complete = []
                for i, row in rows:  # an item is done once all its n choices are
                    partial.setdefault(i, []).append(row)
                    if len(partial[i]) == batch[i].params.n or row.finish_reason in UNRUN:
                        complete.append((i, sorted(partial.pop(i), key=lambda r: r.choice)))
                done.update(i for i, _ in complete)
                out = [engine._result(batch[i], rs[0], started, rs[1:]) for i, rs in complete]
                if late_failures:
                    out += late_failures
                    late_failures.clear()
                yield out
            if engine.max_batch_size < engine.config.max_batch_size:  # it fits again: grow back a step
                engine.max_batch_size = min(engine.config.max_batch_size, 2 * engine.max_batch_size)
            return
        except Exception as exc:
            engine.stats.batch_failures += 1
            cause = exc.__cause__ if isinstance(exc, InFlight) else exc
            in_flight = exc.indices if isinstance(exc, InFlight) else []
        feed = None  # what was fed is in `batch` now; a retry takes no more
        rest = [i for i in range(len(batch)) if i not in done]
        if isinstance(cause, torch.OutOfMemoryError):
            engine._free_memory()
            if min(slots, len(rest)) > 1:
                slots = min(slots, len(rest)) // 2
                engine.max_batch_size = min(engine.max_batch_size, slots)  # later calls start at what fits
                log.warning("out of memory; retrying %d items with %d rows", len(rest), slots)
                batch = [batch[i] for i in rest]
                continue
            bad = ([i for i in in_flight if i in rest] or rest)[:1]
            yield [Result.failure(batch[i].request.id, "out_of_memory",
                                  "out of memory generating this item alone", started) for i in bad]
            batch, slots = [batch[i] for i in rest if i not in bad], initial
            continue
        if not rest:
            return
        if len(rest) == 1:
            log.error("item %s failed", batch[rest[0]].request.id, exc_info=cause)
            yield [Result.failure(batch[rest[0]].request.id, "engine_error",
                                  f"{type(cause).__name__}: {cause}", started)]
            return
        log.warning("%d items failed together (%s); splitting to isolate the cause", len(rest), cause)
        half = len(rest) // 2
        yield from run(engine, [batch[i] for i in rest[:half]], slots, drops=drops)
        yield from run(engine, [batch[i] for i in rest[half:]], slots, drops=drops)
        return
