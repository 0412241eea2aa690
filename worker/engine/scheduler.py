"""Continuous batching over a Runner's slots and paged cache.

Waiting prompts (largest prompt + max_tokens first, so long lines start early and their tail
overlaps the rest) are prefilled in chunks into free slots, each reserving the blocks it may
use; every step decodes all live rows; a finished row leaves, frees its blocks, and the last
live row moves into its slot, so live rows stay packed in slots [0, n). Free slots are refilled
once enough of them open (or none is live), so a prefill chunk is big enough to be cheap.

The host never waits for the step it just launched: step t+1 is queued on the device before the
host reads step t's tokens back (copied asynchronously) and does its bookkeeping, so that work
overlaps the GPU. Every read goes through host.Readback, which counts in Stats.host_waits the
launches whose results were read before another was queued (0 in a loop that keeps this promise);
host values go to the device through pinned, asynchronous copies (host.upload), and the rows'
sampling settings live on the device per slot (SlotSampling), written when a row comes or moves.
A row found finished at step t has computed one token too many at t+1, which is dropped. `more`
lets the caller feed new prompts while the tail of the current ones decodes; `dropped` lets it
take items out (a cancelled job): they leave the batch at the next step, freed like finished rows,
and come back as rows with finish_reason "cancelled".

Rows with per-step controls (controls.py: grammar masks, penalties, logit_bias, logprobs) have
their masks filled on the CPU while the step's forward runs: the grammar matchers take step t's
tokens (waiting for them) only once step t+1 is queued, so the GPU keeps going while the host
advances them and fills the masks. Logprobs are computed on the device and copied with the step's
tokens, and recorded when those are absorbed.
An item with n > 1 choices is prefilled once; its other choices fork the prompt's cache blocks.

Prompts that share a token prefix of at least `prefix_min` tokens (a system prompt, few-shot
examples) share it: the prefix is prefilled once into the runner's prefix store, each row keeps
only its own tokens in its blocks, and decode attends to the prefix for all its rows at once
(forward.py, paged.attend_prefixes). Rows with an adapter do not share (their K/V differ).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from .controls import Controls, needs_controls
from .generate import RowOutput
from .forward import Runner
from .host import Copy, Readback, upload
from .prefixes import Prefix, Prefixes
from .sampling import SlotSampling, row_seed, sample
from .types import SamplingParams

MIN_PREFILL = 4096  # padded tokens a prefill chunk may take whatever its padding: smaller ones run slowly
MORE_EVERY_S = 0.5  # how often to ask `more` for prompts while it has none
CANCELLED = "cancelled"  # finish_reason of a row taken out by `dropped`


@dataclass
class Prompt:
    """A tokenized request as the slot loop runs it (jobs.models.Item is an input line's database row)."""

    ids: list[int]
    params: SamplingParams
    grammar: Any = None  # the compiled grammar of a json_object / json_schema request
    adapter: int = -1  # its LoRA adapter's stack slot in runner.lora; -1 = the base model
    prefix: Prefix | None = None  # a prefix it shares with other prompts, if any

    @property
    def need(self) -> int:
        """Cache positions one of its rows may fill: its prompt and its new tokens."""
        return len(self.ids) + self.params.max_tokens


@dataclass
class Seq:
    index: int  # into the items list
    params: SamplingParams
    seed: int  # drawn once: its draws depend only on (seed, position)
    pos: int  # position of the token fed next: prompt length + generated - 1
    row: RowOutput = field(default_factory=lambda: RowOutput(started_at=time.time()))
    prefix: Prefix | None = None


@dataclass
class Launch:
    """Results of one launch for `seqs` (in slot order at launch), being copied to the host: the tokens
    [B], then for the rows `logprob_rows` (indices into seqs) logprob [R], top [R, k], top ids [R, k]."""

    seqs: list[Seq]
    copy: Copy
    readback: Readback
    logprob_rows: list[int]

    @classmethod
    def of(cls, readback: Readback, step: int, seqs: list[Seq], tokens: torch.Tensor,
           logprobs: tuple[list[int], list[torch.Tensor]]) -> "Launch":
        rows, tensors = logprobs
        return cls(seqs, readback.copy(step, [tokens, *tensors]), readback, rows)

    def values(self) -> list[int]:
        return self.readback.read(self.copy)[0]


@dataclass
class Stats:
    """Work done, in token slots: what was computed versus what was useful."""

    prefill_tokens: int = 0  # real prompt tokens
    prefill_slots: int = 0  # prompt tokens computed, right padding included
    decode_tokens: int = 0  # live rows summed over steps
    decode_slots: int = 0  # rows computed (live rows bucketed up) summed over steps
    steps: int = 0
    prefills: int = 0
    prefill_s: float = 0.0  # host wall time launching and waiting on prefill chunks
    decode_s: float = 0.0  # host wall time in the decode loop outside prefill, bookkeeping included
    controls_s: float = 0.0  # of which in per-step controls (grammar masks, logprobs), not waiting for tokens
    # Launches (decode steps, prefill chunks) whose results the host read before it queued the next one,
    # the device idling meanwhile (host.Readback): 0 when the loop overlaps as it promises.
    host_waits: int = 0
    # Runs of items that failed together and took the engine's retry path (out-of-memory back-off,
    # split, or a lone item failed): 0 whenever the input is valid and memory suffices.
    batch_failures: int = 0
    feed_errors: int = 0  # calls of the `more` feed that raised: the feed stopped, the items in flight ran on

    def add(self, other: "Stats") -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))


class InFlight(Exception):
    """Raised from the loop with the failure as __cause__ and the items it had in flight."""

    def __init__(self, indices: list[int]):
        super().__init__(f"failed with {len(indices)} items in flight")
        self.indices = indices


Check = Callable[[list[tuple[RowOutput, SamplingParams]]], None]


def run_slots(runner: Runner, items: list[Prompt], slots: int, prefill_tokens: int, check: Check, stats: Stats,
              refill_fraction: float = 0.125, flush_seconds: float = 1.0,
              more: Callable[[], list[Prompt]] | None = None, grammars=None,
              prefix_min: int = 0,
              dropped: Callable[[], set[int]] | None = None) -> Iterator[list[tuple[int, RowOutput]]]:
    """Generate every item (and those `more` hands over, appended to `items`); yield (item index, row)
    lists as rows finish, at most every flush_seconds. `check` marks rows finished after new tokens.
    An item with n > 1 yields n rows (row.choice 0..n-1).

    dropped: asked once per step for item indices to take out; each such item still waiting or
    live ends at once with n rows of finish_reason CANCELLED (tokens so far kept), yielded without
    waiting for flush_seconds. Items already finished are not affected."""
    controls = Controls(runner.slots, runner.dims.vocab, runner.device, grammars, runner.penalty_counts,
                        runner.penalty_seen)
    sampling = SlotSampling(runner.slots, runner.device)
    readback = Readback(stats)
    runner.reset()
    prefixes = Prefixes(runner, prefix_min, stats)
    done: list[tuple[int, RowOutput]] = []

    def fits(new: range) -> list[int]:
        """The new items that can run; one whose n choices need more rows than there are slots ends
        now ("too_many_rows"), before it takes a prefix or blocks the queue."""
        ok = []
        for i in new:
            p = items[i].params
            if p.n > slots or (p.uses_penalties and p.n > controls.tables):
                done.append((i, RowOutput(finish_reason="too_many_rows", started_at=time.time(),
                                          finished_at=time.time())))
            else:
                ok.append(i)
        prefixes.assign(items, ok)
        return ok

    def order(i: int) -> tuple[int, int]:  # a prefix's rows together; the largest need first
        p = items[i].prefix
        return (p.order if p is not None else -1, -items[i].need)

    waiting = deque(sorted(fits(range(len(items))), key=order))
    active: list[Seq] = []  # active[j] lives in slot j
    inflight: list[Launch] = []
    refill_at = max(1, int(slots * refill_fraction))
    last_flush = time.monotonic()
    asked = 0.0
    try:
        while True:
            t_loop = time.perf_counter()
            launch = None
            if active:  # 1. queue step t+1 before looking at step t
                B = len(active)
                logits = runner.decode(B, max(s.pos for s in active))
                step = readback.launch()
                ctl = controls if controls.active else None
                if ctl is not None:  # masks filled on the CPU while the forward runs, applied on the GPU
                    t_ctl = time.perf_counter()
                    logits = ctl.process(0, logits)
                    stats.controls_s += time.perf_counter() - t_ctl
                nxt = sample(logits, sampling.rows(0, B), runner.pos[:B] + 1)  # [B], stays on the device
                runner.tokens[:B] = nxt
                runner.pos[:B] += 1
                t_ctl = time.perf_counter()
                lp = ctl.logprobs(0, logits, nxt) if ctl is not None else ([], [])  # read with the tokens
                launch = Launch.of(readback, step, list(active), nxt, lp)
                if ctl is not None:  # penalty counts on the device; the grammar takes the tokens later
                    ctl.after(0, nxt, launch.values)
                    stats.controls_s += time.perf_counter() - t_ctl
                for s in active:
                    s.pos += 1
                stats.steps += 1
                stats.decode_tokens += B
                stats.decode_slots += runner.last_rows
            for earlier in inflight:  # 2. the host catches up while the device works
                _absorb(earlier, check)
            inflight = [launch] if launch else []
            if dropped is not None:
                gone = dropped()
                if gone and _drop(gone, items, waiting, active, done, prefixes):
                    last_flush = float("-inf")  # hand them back now
            if any(s.row.finish_reason for s in active):  # 3. free finished rows' blocks and slots
                done += _retire(runner, active, sampling, controls if controls.active else None, prefixes)
            if more is not None and len(waiting) < slots and (
                    not (waiting or active or inflight) or time.monotonic() - asked >= MORE_EVERY_S):
                asked = time.monotonic()
                fresh = more()
                if fresh:
                    first = len(items)
                    items.extend(fresh)
                    waiting = deque(sorted([*waiting, *fits(range(first, len(items)))], key=order))
            stats.decode_s += time.perf_counter() - t_loop
            free = slots - len(active)
            if waiting and free and (not active or free >= refill_at):  # 4. refill
                t0 = time.perf_counter()
                admitted = _admit(runner, items, waiting, active, free, prefill_tokens, stats, controls, prefixes,
                                  sampling, readback)
                if admitted:
                    inflight += admitted
                elif not active and not inflight:
                    i = waiting.popleft()  # alone in an empty pool and still too big: it can never run
                    row = RowOutput(finish_reason="too_long", started_at=time.time(), finished_at=time.time())
                    done.append((i, row))
                    if items[i].prefix is not None:  # its rows will never use the prefix: free it for others
                        prefixes.release(items[i].prefix, items[i].params.n)
                stats.prefill_s += time.perf_counter() - t0
            idle = not (waiting or active or inflight)  # and `more`, asked just now, had nothing
            if done and (idle or time.monotonic() - last_flush >= flush_seconds):
                yield done
                done, last_flush = [], time.monotonic()
            if idle:
                return
    except GeneratorExit:
        raise
    except Exception as exc:
        raise InFlight([s.index for s in active]) from exc


def _drop(gone: set[int], items: list[Prompt], waiting: deque, active: list[Seq],
          done: list[tuple[int, RowOutput]], prefixes: Prefixes) -> bool:
    """End the waiting and live rows of items in `gone` as CANCELLED; True if any was.
    Live ones are retired (blocks, slot and prefix freed) by the loop's next _retire."""
    now, hit = time.time(), False
    for s in active:
        if s.index in gone and not s.row.finish_reason:
            s.row.finish_reason, s.row.finished_at, hit = CANCELLED, now, True
    if any(i in gone for i in waiting):
        kept = [i for i in waiting if i not in gone]
        for i in waiting:
            if i in gone:
                it = items[i]
                done.extend((i, RowOutput(finish_reason=CANCELLED, started_at=now, finished_at=now, choice=c))
                            for c in range(it.params.n))
                if it.prefix is not None:
                    prefixes.release(it.prefix, it.params.n)
        waiting.clear()
        waiting.extend(kept)
        hit = True
    return hit


def _absorb(launch: Launch, check: Check) -> None:
    """Append a launch's tokens (and logprobs) to rows still running, then mark the finished ones.
    A launch whose rows had all finished is not read: its tokens are dropped anyway."""
    if all(s.row.finish_reason for s in launch.seqs):
        return
    tokens, *logprobs = launch.readback.read(launch.copy)
    lp = dict(zip(launch.logprob_rows, zip(*logprobs))) if launch.logprob_rows else {}
    rows = []
    for j, (s, t) in enumerate(zip(launch.seqs, tokens)):
        if s.row.finish_reason:
            continue  # finished at the step before: this token was computed in flight, and is dropped
        s.row.tokens.append(t)
        if j in lp:  # (the token, its logprob, the top_logprobs (id, logprob) pairs)
            mine, top, ids = lp[j]
            k = s.params.top_logprobs
            s.row.logprobs.append((t, mine, list(zip(ids[:k], top[:k]))))
        rows.append((s.row, s.params))
    if rows:
        check(rows)


def _admit(runner: Runner, items: list[Prompt], waiting: deque, active: list[Seq], free: int,
           prefill_tokens: int, stats: Stats, controls: Controls, prefixes: Prefixes, sampling: SlotSampling,
           readback: Readback) -> list[Launch]:
    """Prefill waiting prompts into free slots and free blocks, in chunks of at most prefill_tokens
    padded tokens; their first tokens are chosen on the device. Returns the launches to absorb.

    A chunk's rows share one prefix (or none): only their own tokens are prefilled, against it.
    An item with n > 1 takes n slots: its prompt is prefilled once into the first, and the other
    choices fork its blocks (the full ones shared, the partly filled last one copied)."""
    device = runner.device
    launches = []
    while free and waiting:
        head = items[waiting[0]].prefix
        if head is not None and not prefixes.ensure(head):  # no store slot free: these rows run alone
            for i in waiting:
                if items[i].prefix is head:
                    items[i].prefix = None
            prefixes.release(head, head.users)
            head = None
        skip = len(head.ids) if head is not None else 0  # prompt tokens the prefix holds
        chunk: list[int] = []
        width = used = tables = 0
        while waiting and used + items[waiting[0]].params.n <= free and items[waiting[0]].prefix is head:
            i = waiting[0]
            it = items[i]
            own, need = len(it.ids) - skip, it.need - skip
            w = max(width, own)
            if chunk and (len(chunk) + 1) * w > prefill_tokens:
                break
            # Right padding to the widest prompt is wasted compute: past a small chunk, keep it under 10%.
            real = sum(len(items[j].ids) - skip for j in chunk) + own
            if chunk and (len(chunk) + 1) * w > MIN_PREFILL and real < 0.9 * (len(chunk) + 1) * w:
                break
            forks = (it.params.n - 1) * runner.fork_cost(own, need)
            pen = it.params.n if it.params.uses_penalties else 0
            if tables + pen > controls.tables_free():
                break  # its penalty tables are in use until penalty rows finish
            if not runner.can_take(runner.blocks_for(need) + forks) or \
                    not runner.reserve(len(active) + len(chunk), need):
                break  # the pool is full until rows finish
            runner.hold(forks)  # kept back for the choices, given to them after the prefill
            chunk.append(waiting.popleft())
            width, used, tables = w, used + it.params.n, tables + pen
        if not chunk:
            break
        ids = upload([items[i].ids[skip:] + [0] * (width - len(items[i].ids) + skip) for i in chunk], torch.long,
                     device)
        lengths = upload([len(items[i].ids) - skip for i in chunk], torch.long, device)  # own tokens
        seqs = [Seq(i, items[i].params.for_choice(0), row_seed(items[i].params), len(items[i].ids),
                    RowOutput(started_at=time.time(), cached=skip), head) for i in chunk]
        first_slot = len(active)
        active += seqs  # in flight from here, should the prefill fail
        if runner.lora is not None:  # each row's adapter goes into its slot
            runner.lora.assign(first_slot, [items[i].adapter for i in chunk])
        logits = runner.prefill(first_slot, ids, lengths, head.slot if head else -1, skip)  # [k, V]
        step = readback.launch()
        src = list(range(len(chunk)))
        for j, i in enumerate(chunk):  # the other choices of n > 1 items: no second prefill
            it = items[i]
            own, need = len(it.ids) - skip, it.need - skip
            for c in range(1, it.params.n):
                runner.release_held(runner.fork_cost(own, need))
                runner.fork(first_slot + j, len(active), own, need)
                pc = it.params.for_choice(c)
                extra = Seq(i, pc, row_seed(pc), len(it.ids),
                            RowOutput(started_at=seqs[j].row.started_at, choice=c, cached=skip), head)
                active.append(extra)
                seqs.append(extra)
                src.append(j)
        if len(src) > len(chunk):
            idx = upload(src, torch.long, device)
            logits, lengths = logits[idx], lengths[idx]
        ctl = controls if controls.active or any(needs_controls(s.params) for s in seqs) else None
        if ctl is not None:
            for j, s in enumerate(seqs):
                ctl.admit(first_slot + j, s.params, items[s.index].grammar, s.row, items[s.index].ids)
            logits = ctl.process(first_slot, logits)
        k = len(seqs)
        sampling.admit(first_slot, [s.params for s in seqs], [s.seed for s in seqs])
        at = lengths + skip  # the first new token sits at position len(prompt)
        first = sample(logits, sampling.rows(first_slot, k), at)
        runner.tokens[first_slot:first_slot + k] = first
        runner.pos[first_slot:first_slot + k] = at
        lp = ctl.logprobs(first_slot, logits, first) if ctl is not None else ([], [])
        launch = Launch.of(readback, step, seqs, first, lp)
        if ctl is not None:
            ctl.after(first_slot, first, launch.values)
        launches.append(launch)
        free -= k
        stats.prefills += 1
        stats.prefill_tokens += int(sum(len(items[i].ids) - skip for i in chunk))
        stats.prefill_slots += len(chunk) * width
    return launches


def _retire(runner: Runner, active: list[Seq], sampling: SlotSampling, ctl: Controls | None = None,
            prefixes: Prefixes | None = None) -> list[tuple[int, RowOutput]]:
    """Drop finished rows and free their blocks; move the last live rows into their slots."""
    out = [(s.index, s.row) for s in active if s.row.finish_reason]
    for j, s in enumerate(active):
        if s.row.finish_reason:
            runner.free(j)
            if ctl is not None:
                ctl.free(j)
            if s.prefix is not None and prefixes is not None:
                prefixes.release(s.prefix)
    n = len(active) - len(out)
    holes = [j for j in range(n) if active[j].row.finish_reason]
    movers = [j for j in range(n, len(active)) if not active[j].row.finish_reason]
    for h, m in zip(holes, movers):
        runner.move(m, h)
        sampling.move(m, h)
        if ctl is not None:  # the row's controls follow it
            ctl.move(m, h)
        active[h] = active[m]
    del active[n:]
    return out
