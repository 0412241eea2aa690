"""Per-row request controls in the slot loop (issue 10): grammar masks, penalties, logit_bias, logprobs.

Controls keeps, per KV slot, what a row needs beyond plain sampling, and the scheduler calls it
at four points (each marked `# issue 10:` in scheduler.py):

  admit(slot, params, grammar, row, prompt_ids)  a row has taken a slot (its prompt is in the cache)
  move(src, dst)                                 a live row moved slot (retire packs rows)
  free(slot)                                     a row left its slot (its penalty table is free again)
  process(lo, logits) -> logits                  between launching the step and sampling: fills the
                                                 grammar masks on the CPU while the GPU decodes,
                                                 then applies penalties, bias and masks on the GPU
  logprobs(lo, logits, chosen)                   the logprobs rows' values, on the device: copied to
                                                 the host with the step's tokens, read when they are
  after(lo, chosen, tokens)                      once the step's tokens are chosen: counts for the
                                                 penalties; the grammar matchers take the tokens at
                                                 the next process(), while the GPU works

`lo` is the slot of logits' first row (0 for a decode step, the chunk's first slot for a prefill).
Every method that edits a tensor runs under torch.inference_mode, as the runner's forward does:
the logits are inference tensors, and an in-place edit of one outside the mode raises.
Penalty rows hold penalty tables, counts [P, V] int32 and seen [P, V] bool, reserved with the KV
cache (Runner.allocate, inside its memory budget): a row takes a table when admitted and gives it
back when it leaves; a penalty row waits for a free table (scheduler._admit). Each step gathers the
penalty rows' logits [R, V], penalizes them and scatters them back: the other rows cost nothing.
The scheduler makes one Controls per run and calls it only once it is `active`; process() and
after() return at once for rows that need nothing. Host values reach the device through
host.upload (pinned, asynchronous): none of this waits for the step in flight.
Logprobs are taken from the logits after penalties, bias and the grammar mask, before temperature,
top-p and top-k: the distribution the request asked for, not the sampler's truncation of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import logits as L
from .grammar import Grammars, bitmask_words
from .host import upload
from .types import SamplingParams


def needs_controls(p: SamplingParams) -> bool:
    return p.response_format != "text" or p.logprobs or p.uses_penalties or bool(p.logit_bias)


@dataclass
class _Row:
    params: SamplingParams
    matcher: Any  # the row's grammar state, or None
    table: int = -1  # its penalty table, -1 for none


class Controls:
    def __init__(self, slots: int, vocab: int, device: torch.device, grammars: Grammars | None,
                 counts: torch.Tensor | None = None, seen: torch.Tensor | None = None):
        """counts [P, V] int32 and seen [P, V] bool: the runner's penalty tables (P may be 0)."""
        self.vocab, self.device, self.grammars = vocab, device, grammars
        self.rows: list[_Row | None] = [None] * slots
        self.active = False  # a row that needs controls was admitted: the scheduler calls us from then on
        self.counts, self.seen = counts, seen  # generated tokens; prompt or generated (repetition penalty)
        tables = counts.shape[0] if counts is not None else 0
        self.penalty = torch.zeros(tables, 3, dtype=torch.float32, device=device)  # [P, (freq, pres, rep)]
        self.free_tables = list(range(tables - 1, -1, -1))  # a stack: pop() takes the lowest
        self._batch: dict | None = None  # per-row tensors for the current rows; rebuilt when rows change
        self._batch_key: tuple | None = None
        # (tokens(), [(matcher, row)]): tokens chosen for grammar rows, not yet accepted (_catch_up)
        self.pending: list[tuple[Callable[[], list[int]], list[tuple[Any, int]]]] = []

    # -- slot bookkeeping -------------------------------------------------------

    @torch.inference_mode()
    def admit(self, slot: int, params: SamplingParams, grammar, out, prompt_ids: list[int]) -> None:
        """A row in `slot`; one with penalties takes a free table (the caller checked there is one)."""
        if not needs_controls(params):
            self.rows[slot] = None
        else:
            matcher = self.grammars.matcher(grammar) if grammar is not None else None
            if params.logprobs:
                out.logprobs = []
            row = self.rows[slot] = _Row(params, matcher)
            self.active = True
            if params.uses_penalties:
                row.table = t = self.free_tables.pop()
                self.counts[t].zero_()
                self.seen[t].zero_()
                self.seen[t, upload(prompt_ids, torch.long, self.device)] = True
                self.penalty[t] = upload([params.frequency_penalty, params.presence_penalty,
                                          params.repetition_penalty], torch.float32, self.device)
        self._batch_key = None

    @property
    def tables(self) -> int:
        return self.penalty.shape[0]

    def tables_free(self) -> int:
        return len(self.free_tables)

    def free(self, slot: int) -> None:
        r = self.rows[slot]
        if r is not None and r.table >= 0:
            self.free_tables.append(r.table)
        self.rows[slot] = None
        self._batch_key = None

    def move(self, src: int, dst: int) -> None:
        self.rows[dst], self.rows[src] = self.rows[src], None  # a penalty table stays where it is
        self._batch_key = None

    # -- per step ---------------------------------------------------------------

    def _tensors(self, lo: int, B: int) -> dict | None:
        """The per-row tensors for slots [lo, lo + B), or None when no row there needs anything."""
        if self._batch_key == (lo, B):
            return self._batch
        live = [(j, r) for j, r in enumerate(self.rows[lo:lo + B]) if r is not None]
        b = None
        if live:
            dev = self.device
            pen = [(j, r.table) for j, r in live if r.table >= 0]
            bias = [(j, t, v) for j, r in live for t, v in r.params.logit_bias if 0 <= t < self.vocab]
            b = {
                "grammar": [j for j, r in live if r.matcher is not None],
                "logprobs": [j for j, r in live if r.params.logprobs],
                "top": max((r.params.top_logprobs for _, r in live if r.params.logprobs), default=0),
            }
            if pen:  # rows [R] among the B, and their tables [R]
                b["penalties"] = upload([j for j, _ in pen], torch.long, dev), upload([t for _, t in pen], torch.long, dev)
            if bias:
                b["bias"] = (upload([j for j, _, _ in bias], torch.long, dev),
                             upload([t for _, t, _ in bias], torch.long, dev),
                             upload([v for _, _, v in bias], torch.float32, dev))
            if b["grammar"]:
                b["grammar_rows"] = upload(b["grammar"], torch.long, dev)
            if b["logprobs"]:
                b["logprobs_rows"] = upload(b["logprobs"], torch.long, dev)
        self._batch, self._batch_key = b, (lo, B)
        return b

    @torch.inference_mode()  # the runner's logits are inference tensors; in-place edits need the mode
    def process(self, lo: int, logits: torch.Tensor) -> torch.Tensor:
        """logits [B, V] for slots [lo, lo + B) -> the logits to sample from (float32 when changed)."""
        B = logits.shape[0]
        # CPU work first, before anything that could wait for the device: on CUDA the decode step is
        # still running, so advancing the matchers and filling the masks costs no GPU time.
        matchers = [r.matcher for r in self.rows[lo:lo + B] if r is not None and r.matcher is not None]
        if self.pending and matchers:  # a prefill's fresh rows have nothing pending: no wait for them
            mine = {id(m) for m in matchers}
            if any(id(m) in mine for _, rows in self.pending for m, _ in rows):
                self._catch_up()
        mask = None
        if matchers:
            # The grammar rows' masks [R, W], in slot order. A fresh pinned tensor each time: the caching
            # host allocator reuses its memory only after this copy's event (host.upload).
            cuda = self.device.type == "cuda"
            host = torch.empty(len(matchers), bitmask_words(self.vocab), dtype=torch.int32, pin_memory=cuda)
            self.grammars.fill(matchers, list(range(len(matchers))), host)
            mask = host.to(self.device, non_blocking=True) if cuda else host
        b = self._tensors(lo, B)
        if b is None or not ("penalties" in b or "bias" in b or mask is not None):
            return logits  # logprobs alone read the logits as they are (token_logprobs: [R, V] in float32)
        logits = logits.float() if logits.dtype != torch.float32 else logits
        if "penalties" in b:  # only the penalty rows: [R, V]
            rows, tables = b["penalties"]
            x = logits[rows]
            L.apply_penalties(x, self.counts[tables], self.seen[tables], *self.penalty[tables].unbind(1))
            logits[rows] = x
        if "bias" in b:
            L.apply_bias(logits, *b["bias"])
        if mask is not None:
            L.apply_bitmask(logits, mask, b["grammar_rows"])
        return logits

    @torch.inference_mode()
    def logprobs(self, lo: int, logits: torch.Tensor, chosen: torch.Tensor) -> tuple[list[int], list[torch.Tensor]]:
        """For the rows of slots [lo, lo + B) that asked for logprobs: their indices j among the B, and
        on the device the chosen tokens' logprobs [R], the top ones [R, k] and their ids [R, k]
        (k the largest top_logprobs among them), for the host to read with the step's tokens."""
        b = self._tensors(lo, chosen.shape[0])
        if b is None or not b["logprobs"]:
            return [], []
        idx = b["logprobs_rows"]
        return b["logprobs"], list(L.token_logprobs(logits[idx], chosen[idx], b["top"]))

    @torch.inference_mode()
    def after(self, lo: int, chosen: torch.Tensor, tokens: Callable[[], list[int]]) -> None:
        """Record the chosen tokens [B] of slots [lo, lo + B): `chosen` on the device, and `tokens()`
        their host copy, read by the grammar matchers at the next process()."""
        b = self._tensors(lo, chosen.shape[0])
        if b is None:
            return
        if "penalties" in b:
            rows, tables = b["penalties"]
            mine = chosen[rows]
            self.counts.index_put_((tables, mine), torch.ones_like(mine, dtype=torch.int32), accumulate=True)
            self.seen[tables, mine] = True
        if b["grammar"]:
            # The matchers take these tokens at the next process(), after the next step is launched:
            # waiting for them here, and accepting (tens of microseconds a row inside a string),
            # would idle the GPU.
            self.pending.append((tokens, [(self.rows[lo + j].matcher, j) for j in b["grammar"]]))

    def _catch_up(self) -> None:
        """Advance the matchers by the tokens after() recorded (before any mask is filled).
        A refused token cannot happen (it was masked); should it, the row ends by max_tokens.
        A terminated matcher belongs to a finished row taking its one extra step: nothing to accept."""
        live = []
        for tokens, rows in self.pending:
            host = tokens()
            live += [(m, host[j]) for m, j in rows if not m.is_terminated()]
        self.pending = []
        self.grammars.accept([m for m, _ in live], [t for _, t in live])
