"""Continuous batching over a Runner's slots.

Waiting prompts (longest first) are prefilled in chunks into free slots; every step decodes all
live rows; a finished row leaves at once and the last live row moves into its slot, so live
rows stay packed in slots [0, n) and a step costs what the live rows need. Free slots are
refilled once enough of them open (or none is live), so a prefill chunk is big enough to be cheap.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .generate import RowOutput
from .runner import Runner
from .sampling import RowSampling, sample
from .types import SamplingParams

MIN_PREFILL = 4096  # padded tokens a prefill chunk may take whatever its padding: smaller ones run slowly


@dataclass
class Item:
    ids: list[int]
    params: SamplingParams
    adapter: int = -1  # issue 11: its LoRA adapter's stack slot in runner.lora; -1 = the base model


@dataclass
class Seq:
    index: int  # into the items list
    params: SamplingParams
    generator: torch.Generator | None  # a seeded row's own random stream, kept for its whole life
    pos: int  # position (= cache column) of the token fed next: prompt length + generated - 1
    row: RowOutput = field(default_factory=lambda: RowOutput(started_at=time.time()))


@dataclass
class Stats:
    """Work done, in token slots: what was computed versus what was useful."""

    prefill_tokens: int = 0  # real prompt tokens
    prefill_slots: int = 0  # prompt tokens computed, right padding included
    decode_tokens: int = 0  # live rows summed over steps
    decode_slots: int = 0  # rows computed (live rows bucketed up) summed over steps
    steps: int = 0
    prefills: int = 0
    prefill_s: float = 0.0  # host wall time in prefill chunks (each ends in a sync)
    decode_s: float = 0.0  # host wall time in decode steps, bookkeeping included

    def add(self, other: "Stats") -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


class InFlight(Exception):
    """Raised from the loop with the failure as __cause__ and the items it had in flight."""

    def __init__(self, indices: list[int]):
        super().__init__(f"failed with {len(indices)} items in flight")
        self.indices = indices


def run_slots(runner: Runner, items: list[Item], slots: int, prefill_tokens: int,
              finished: Callable[[RowOutput, SamplingParams], bool], stats: Stats,
              refill_fraction: float = 0.125, flush_seconds: float = 1.0) -> Iterator[list[tuple[int, RowOutput]]]:
    """Generate every item; yield (item index, row) lists as rows finish, at most every flush_seconds."""
    device = runner.device
    waiting = deque(sorted(range(len(items)), key=lambda i: -len(items[i].ids)))
    active: list[Seq] = []  # active[j] lives in slot j
    done: list[tuple[int, RowOutput]] = []
    refill_at = max(1, int(slots * refill_fraction))
    last_flush = time.monotonic()
    sampling, dirty = None, True
    try:
        while waiting or active:
            free = slots - len(active)
            if waiting and free and (not active or free >= refill_at):
                _admit(runner, items, waiting, active, free, prefill_tokens, finished, stats)
                dirty = True
            if any(s.row.finish_reason for s in active):
                done += _retire(runner, active)
                dirty = True
            if active:
                t_step = time.perf_counter()
                B = len(active)
                if dirty:  # the live set changed: reload the step's inputs from the host
                    runner.tokens[:B] = torch.tensor([s.row.tokens[-1] for s in active], device=device)
                    runner.pos[:B] = torch.tensor([s.pos for s in active], device=device)
                    sampling = RowSampling.build([s.params for s in active], device, [s.generator for s in active])
                    dirty = False
                logits = runner.decode(B, max(s.pos for s in active))
                nxt = sample(logits, sampling)  # [B]
                runner.tokens[:B] = nxt  # stays on the device for the next step
                runner.pos[:B] += 1
                for s, t in zip(active, nxt.tolist()):
                    s.row.tokens.append(t)
                    s.pos += 1
                    finished(s.row, s.params)
                stats.steps += 1
                stats.decode_s += time.perf_counter() - t_step
                stats.decode_tokens += B
                stats.decode_slots += runner.last_rows
                if any(s.row.finish_reason for s in active):
                    done += _retire(runner, active)
                    dirty = True
            if done and (not (waiting or active) or time.monotonic() - last_flush >= flush_seconds):
                yield done
                done, last_flush = [], time.monotonic()
    except Exception as exc:
        raise InFlight([s.index for s in active]) from exc
    if done:
        yield done


def _admit(runner: Runner, items: list[Item], waiting: deque, active: list[Seq], free: int,
           prefill_tokens: int, finished, stats: Stats) -> None:
    """Prefill waiting prompts into the free slots, in chunks of at most prefill_tokens padded tokens."""
    device = runner.device
    while free and waiting:
        width = len(items[waiting[0]].ids)  # the longest waiting prompt: they are sorted
        chunk, real = [waiting.popleft()], width
        while waiting and len(chunk) < free and (len(chunk) + 1) * width <= prefill_tokens:
            # Right padding to `width` is wasted compute: past a small chunk, keep it under 10%.
            nxt = len(items[waiting[0]].ids)
            if (len(chunk) + 1) * width > MIN_PREFILL and real + nxt < 0.9 * (len(chunk) + 1) * width:
                break
            chunk.append(waiting.popleft())
            real += nxt
        ids = torch.tensor([items[i].ids + [0] * (width - len(items[i].ids)) for i in chunk], device=device)
        lengths = torch.tensor([len(items[i].ids) for i in chunk], device=device)
        seqs = [Seq(i, items[i].params, RowSampling.generator(items[i].params, device), len(items[i].ids))
                for i in chunk]
        t0 = time.perf_counter()
        first_slot = len(active)
        active += seqs  # in flight from here, should the prefill fail
        if runner.lora is not None:  # issue 11: each row's adapter goes into its slot
            runner.lora.assign(first_slot, [items[i].adapter for i in chunk])
        logits = runner.prefill(first_slot, ids, lengths)  # [k, V]
        first = sample(logits, RowSampling.build([s.params for s in seqs], device, [s.generator for s in seqs]))
        for s, t in zip(seqs, first.tolist()):
            s.row.tokens.append(t)
            finished(s.row, s.params)
        free -= len(chunk)
        stats.prefills += 1
        stats.prefill_s += time.perf_counter() - t0
        stats.prefill_tokens += int(sum(len(items[i].ids) for i in chunk))
        stats.prefill_slots += len(chunk) * width


def _retire(runner: Runner, active: list[Seq]) -> list[tuple[int, RowOutput]]:
    """Drop finished rows; move the last live rows into their slots so live rows stay packed."""
    out = [(s.index, s.row) for s in active if s.row.finish_reason]
    n = len(active) - len(out)
    holes = [j for j in range(n) if active[j].row.finish_reason]
    movers = [j for j in range(n, len(active)) if not active[j].row.finish_reason]
    for h, m in zip(holes, movers):
        runner.move(m, h)
        active[h] = active[m]
    del active[n:]
    return out
