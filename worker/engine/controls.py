"""Per-row request controls in the slot loop (issue 10): grammar masks, penalties, logit_bias, logprobs.

Controls keeps, per KV slot, what a row needs beyond plain sampling, and the scheduler calls it
at four points (each marked `# issue 10:` in scheduler.py):

  admit(slot, params, grammar, row, prompt_ids)  a row has taken a slot (its prompt is in the cache)
  move(src, dst)                                 a live row moved slot (retire packs rows)
  process(lo, logits) -> logits                  between launching the step and sampling: fills the
                                                 grammar masks on the CPU while the GPU decodes,
                                                 then applies penalties, bias and masks on the GPU
  after(lo, logits, chosen, tokens)              once the step's tokens are chosen: counts for the
                                                 penalties, logprobs; the grammar matchers take the
                                                 tokens at the next process(), while the GPU works

`lo` is the slot of logits' first row (0 for a decode step, the chunk's first slot for a prefill).
Every method that makes or edits a tensor runs under torch.inference_mode, as the runner's forward
does: counts/seen are inference tensors, and an in-place edit of one outside the mode raises.
Nothing is allocated for a batch that uses none of this: the scheduler makes one Controls per run
(lists only; tensors come with the first row that needs them) and calls it only once it is `active`,
and process()/after() return at once for rows that need nothing.
Logprobs are taken from the logits after penalties, bias and the grammar mask, before temperature,
top-p and top-k: the distribution the request asked for, not the sampler's truncation of it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from . import logits as L
from .grammar import Grammars, bitmask_words
from .types import SamplingParams


def needs_controls(p: SamplingParams) -> bool:
    return p.response_format != "text" or p.logprobs or p.uses_penalties or bool(p.logit_bias)


def _on(device: torch.device, values: list) -> torch.Tensor:
    """A small host list on the device without waiting for the step in flight (a plain copy would)."""
    t = torch.tensor(values)
    return t.to(device, non_blocking=True) if device.type == "cuda" else t


@dataclass
class _Row:
    params: SamplingParams
    matcher: Any  # the row's grammar state, or None
    out: Any  # the RowOutput whose .logprobs gets an entry per token


class Controls:
    def __init__(self, slots: int, vocab: int, device: torch.device, grammars: Grammars | None):
        self.vocab, self.device, self.grammars = vocab, device, grammars
        self.rows: list[_Row | None] = [None] * slots
        self.active = False  # a row that needs controls was admitted: the scheduler calls us from then on
        self.counts: torch.Tensor | None = None  # [S, V] int32, generated tokens; made when a row has penalties
        self.seen: torch.Tensor | None = None  # [S, V] bool, prompt or generated (repetition penalty)
        self.bitmask: torch.Tensor | None = None  # [S, W] int32 on the CPU (pinned with CUDA), refilled per step
        self._batch: dict | None = None  # per-row tensors for the current rows; rebuilt when rows change
        self._batch_key: tuple | None = None
        # (tokens(), [(matcher, row)]): tokens chosen for grammar rows, not yet accepted (_catch_up)
        self.pending: list[tuple[Callable[[], list[int]], list[tuple[Any, int]]]] = []

    # -- slot bookkeeping -------------------------------------------------------

    @torch.inference_mode()
    def admit(self, slot: int, params: SamplingParams, grammar, out, prompt_ids: list[int]) -> None:
        if not needs_controls(params):
            self.rows[slot] = None
        else:
            matcher = self.grammars.matcher(grammar) if grammar is not None else None
            if params.logprobs:
                out.logprobs = []
            self.rows[slot] = _Row(params, matcher, out)
            self.active = True
            if params.uses_penalties:
                if self.counts is None:
                    S = len(self.rows)
                    self.counts = torch.zeros(S, self.vocab, dtype=torch.int32, device=self.device)
                    self.seen = torch.zeros(S, self.vocab, dtype=torch.bool, device=self.device)
                self.counts[slot].zero_()
                self.seen[slot].zero_()
                self.seen[slot, torch.tensor(prompt_ids, device=self.device)] = True
        self._batch_key = None

    @torch.inference_mode()  # counts/seen are inference tensors (made in admit): in-place edits need the mode
    def move(self, src: int, dst: int) -> None:
        self.rows[dst], self.rows[src] = self.rows[src], None
        if self.counts is not None:
            self.counts[dst].copy_(self.counts[src])
            self.seen[dst].copy_(self.seen[src])
        self._batch_key = None

    # -- per step ---------------------------------------------------------------

    def _tensors(self, lo: int, B: int) -> dict | None:
        """The per-row tensors for slots [lo, lo + B), or None when no row there needs anything."""
        if self._batch_key == (lo, B):
            return self._batch
        rows = self.rows[lo:lo + B]
        live = [(j, r) for j, r in enumerate(rows) if r is not None]
        b = None
        if live:
            dev = self.device
            pen = [j for j, r in live if r.params.uses_penalties]
            bias = [(j, t, v) for j, r in live for t, v in r.params.logit_bias if 0 <= t < self.vocab]
            b = {
                "grammar": [j for j, r in live if r.matcher is not None],
                "logprobs": [j for j, r in live if r.params.logprobs],
                "top": max((r.params.top_logprobs for _, r in live if r.params.logprobs), default=0),
                "penalties": bool(pen),
            }
            if pen:
                b["frequency"] = _on(dev, [r.params.frequency_penalty if r else 0.0 for r in rows])
                b["presence"] = _on(dev, [r.params.presence_penalty if r else 0.0 for r in rows])
                b["repetition"] = _on(dev, [r.params.repetition_penalty if r else 1.0 for r in rows])
            if bias:
                b["bias"] = (_on(dev, [j for j, _, _ in bias]), _on(dev, [t for _, t, _ in bias]),
                             _on(dev, [v for _, _, v in bias]))
            if b["grammar"]:
                b["grammar_rows"] = _on(dev, b["grammar"])
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
        if matchers:
            if self.bitmask is None:
                self.bitmask = torch.empty(len(self.rows), bitmask_words(self.vocab), dtype=torch.int32,
                                           pin_memory=self.device.type == "cuda")
            # The grammar rows' masks go to bitmask rows [0, R) in slot order, pinned, copied async.
            self.grammars.fill(matchers, list(range(len(matchers))), self.bitmask)
        b = self._tensors(lo, B)
        if b is None:
            return logits
        mask = self.bitmask[:len(matchers)].to(self.device, non_blocking=True) if matchers else None
        logits = logits.float() if logits.dtype != torch.float32 else logits
        if b["penalties"]:
            L.apply_penalties(logits, self.counts[lo:lo + B], self.seen[lo:lo + B], b["frequency"],
                              b["presence"], b["repetition"])
        if "bias" in b:
            L.apply_bias(logits, *b["bias"])
        if mask is not None:
            L.apply_bitmask(logits, mask, b["grammar_rows"])
        return logits

    @torch.inference_mode()
    def after(self, lo: int, logits: torch.Tensor, chosen: torch.Tensor, tokens: Callable[[], list[int]]) -> None:
        """Record the chosen tokens [B] of slots [lo, lo + B): `chosen` on the device, and `tokens()`
        their host copy, which waits for the step (only logprobs call it here)."""
        B = chosen.shape[0]
        b = self._tensors(lo, B)
        if b is None:
            return
        if b["penalties"]:
            rows = torch.arange(lo, lo + B, device=self.device)
            self.counts.index_put_((rows, chosen), torch.ones_like(chosen, dtype=torch.int32), accumulate=True)
            self.seen[rows, chosen] = True
        if b["logprobs"]:
            idx = _on(self.device, b["logprobs"])
            mine, top, ids = L.token_logprobs(logits[idx], chosen[idx], b["top"])
            host = tokens()
            for j, lp, tl, ti in zip(b["logprobs"], mine.tolist(), top.tolist(), ids.tolist()):
                r = self.rows[lo + j]
                k = r.params.top_logprobs
                r.out.logprobs.append((host[j], lp, list(zip(ti[:k], tl[:k]))))
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
