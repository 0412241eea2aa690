"""The engine: requests in, results out, as rows finish.

It tokenizes (applying the chat template to `messages`), sizes a paged KV cache from a token
budget, runs continuous batching over it (scheduler.py, runner.py), halves the rows when memory
runs out and grows them back once batches succeed, and isolates an item that makes generation
fail so the others still succeed. `generate` can be fed more requests while it runs, so the
tail of one chunk decodes together with the head of the next.
Architectures the slot runner does not know fall back to length-sorted padded batches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from . import loading
from .config import EngineConfig
from .generate import RowOutput, check_finished, decode_output, generate_padded
from .runner import BLOCK, Dims, Runner, supports
from .scheduler import InFlight, Item, Stats, run_slots
from .types import Request, Result, SamplingParams, Usage

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    request: Request
    ids: list[int]
    params: SamplingParams  # max_tokens clamped to the context left

    @property
    def need(self) -> int:
        return len(self.ids) + self.params.max_tokens


class Engine:
    def __init__(self, config: EngineConfig, loaded: tuple | None = None):
        """loaded: (model, tokenizer, device, dtype) already in memory, to share one model between engines."""
        self.config = config
        self.model, self.tokenizer, self.device, self.dtype = loaded or loading.load(config)
        cfg = self.model.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
        self.eos_ids = self._eos_ids()
        self.max_batch_size = config.max_batch_size
        self.runner = Runner(self.model, self.dtype, config.cuda_graphs) if supports(self.model) else None
        if self.runner is None:
            log.warning("%s: no slot runner for this architecture; using padded batches", cfg.model_type)
        self.stats = Stats()

    # -- set-up ---------------------------------------------------------------

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if source is None:
                continue
            ids.update(source if isinstance(source, (list, tuple)) else [source])
        return ids

    def kv_bytes_per_token(self) -> int:
        return Dims.of(self.model).kv_bytes_per_token(self.dtype)

    def token_budget(self) -> int:
        """KV cache tokens (slots x columns): a share of the free GPU memory over KV bytes per token."""
        if self.config.max_batch_tokens:
            return self.config.max_batch_tokens
        if self.device.type != "cuda":
            return 64 * 1024
        free, _ = torch.cuda.mem_get_info(self.device)
        # Memory our own cache and the allocator's idle blocks hold is free for this purpose.
        held = torch.cuda.memory_reserved(self.device) - torch.cuda.memory_allocated(self.device)
        if self.runner is not None and self.runner.kv is not None:
            held += self.runner.kv.numel() * self.runner.kv.element_size()
        return int((free + held) * self.config.kv_memory_fraction / self.kv_bytes_per_token())

    # -- public ---------------------------------------------------------------

    def generate(self, requests: list[Request],
                 more: Callable[[], list[Request]] | None = None) -> Iterator[list[Result]]:
        """Yield results as rows finish (grouped, at least every flush_seconds); each request gets one.

        more: called when the engine could take more work; returns further requests (or none).
        """
        prepared, failed = self._prepare(requests)
        if failed:
            yield failed
        late_failures: list[Result] = []

        def feed() -> list[Prepared]:
            fresh, bad = self._prepare(more())
            late_failures.extend(bad)
            return fresh

        if prepared or more is not None:
            yield from self._run(prepared, self.max_batch_size, feed if more is not None else None, late_failures)
        if late_failures:
            yield late_failures
    def generate_all(self, requests: list[Request]) -> list[Result]:
        by_id = {r.id: r for batch in self.generate(requests) for r in batch}
        return [by_id[r.id] for r in requests]

    # -- internals ------------------------------------------------------------

    def _prompt_text(self, request: Request) -> tuple[str, bool]:
        """(text, add_special_tokens). A chat template already holds the BOS token."""
        if request.messages is not None:
            return self.tokenizer.apply_chat_template(request.messages, tokenize=False,
                                                      add_generation_prompt=True), False
        return request.prompt or "", True

    def _prepare(self, requests: list[Request]) -> tuple[list[Prepared], list[Result]]:
        prepared, failed = [], []
        texts: dict[bool, list[tuple[Request, str]]] = {True: [], False: []}
        for r in requests:
            try:
                text, special = self._prompt_text(r)
            except Exception as exc:  # a template that rejects these messages fails this item only
                failed.append(Result.failure(r.id, "invalid_request", f"chat template failed: {exc}"))
                continue
            texts[special].append((r, text))
        for special, group in texts.items():
            if not group:
                continue
            # One call for the whole group: the fast tokenizer batches in Rust.
            encoded = self.tokenizer([t for _, t in group], add_special_tokens=special)["input_ids"]
            for (r, _), ids in zip(group, encoded):
                room = self.context_length - len(ids)
                if not ids:
                    failed.append(Result.failure(r.id, "invalid_request", "the prompt is empty"))
                    continue
                if room <= 0:
                    failed.append(Result.failure(
                        r.id, "context_length_exceeded",
                        f"prompt is {len(ids)} tokens; the model's context is {self.context_length}"))
                    continue
                params = r.params
                if params.max_tokens > room:
                    params = SamplingParams(**{**params.__dict__, "max_tokens": room})
                prepared.append(Prepared(r, ids, params))
        return prepared, failed

    def _run(self, batch: list[Prepared], slots: int, feed: Callable[[], list[Prepared]] | None = None,
             late_failures: list[Result] | None = None) -> Iterator[list[Result]]:
        """Generate the batch with at most `slots` rows at once; on failure, back off and retry the rest.

        `feed` appends to `batch` while it runs; failures it met in preparing are yielded as they come.
        """
        initial = slots
        while batch or feed is not None:
            started = time.time()
            done: set[int] = set()
            try:
                if self.config.oom_above_batch is not None and slots > self.config.oom_above_batch:
                    raise torch.OutOfMemoryError(f"test hook: batch {slots} > {self.config.oom_above_batch}")
                for rows in self._loop(batch, slots, feed):
                    done.update(i for i, _ in rows)
                    out = [self._result(batch[i], row, started) for i, row in rows]
                    if late_failures:
                        out += late_failures
                        late_failures.clear()
                    yield out
                if self.max_batch_size < self.config.max_batch_size:  # it fits again: grow back a step
                    self.max_batch_size = min(self.config.max_batch_size, 2 * self.max_batch_size)
                return
            except Exception as exc:
                cause = exc.__cause__ if isinstance(exc, InFlight) else exc
                in_flight = exc.indices if isinstance(exc, InFlight) else []
            feed = None  # what was fed is in `batch` now; a retry takes no more
            rest = [i for i in range(len(batch)) if i not in done]
            if isinstance(cause, torch.OutOfMemoryError):
                self._free_memory()
                if min(slots, len(rest)) > 1:
                    slots = min(slots, len(rest)) // 2
                    self.max_batch_size = min(self.max_batch_size, slots)  # later calls start at what fits
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
            yield from self._run([batch[i] for i in rest[:half]], slots)
            yield from self._run([batch[i] for i in rest[half:]], slots)
            return

    def _check(self, rows: list[tuple[RowOutput, SamplingParams]]) -> None:
        check_finished(self.tokenizer, rows, self.eos_ids)

    def _ensure_pool(self, batch: list[Prepared], slots: int) -> int:
        """Size the block pool and the slots; returns the rows to run with.

        On GPUs the pool takes the memory budget and is kept across calls (graphs with it). On the
        CPU it is as large as this batch needs (at least 4,096 tokens, so fed chunks fit too).
        """
        r = self.runner
        budget = max(1, self.token_budget() // BLOCK)
        if self.device.type == "cuda":
            want, rows = budget, self.config.max_batch_size
        else:
            want = min(budget, max(sum(Runner.blocks_for(p.need) for p in batch), 4096 // BLOCK))
            rows = min(self.config.max_batch_size, max(len(batch), 64))
        if r.kv is None or r.slots < min(rows, slots) or r.blocks < want:
            r.allocate(max(rows, min(slots, self.config.max_batch_size)), want, self.context_length)
        return min(slots, r.slots)

    def _loop(self, batch: list[Prepared], slots: int,
              feed: Callable[[], list[Prepared]] | None = None) -> Iterator[list[tuple[int, RowOutput]]]:
        """(index into batch, row) lists as rows finish; `feed`'s requests are appended to batch."""
        if self.runner is None:
            yield from self._loop_padded(batch, slots)
            return
        slots = self._ensure_pool(batch, slots)
        items = [Item(p.ids, p.params) for p in batch]

        def more() -> list[Item]:
            fresh = feed()
            batch.extend(fresh)
            return [Item(p.ids, p.params) for p in fresh]

        yield from run_slots(self.runner, items, slots, self.config.prefill_tokens,
                             self._check, self.stats, self.config.refill_fraction, self.config.flush_seconds,
                             more if feed is not None else None)

    def _loop_padded(self, batch: list[Prepared], rows: int) -> Iterator[list[tuple[int, RowOutput]]]:
        order = sorted(range(len(batch)), key=lambda i: -len(batch[i].ids))
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), rows):
            idx = order[start:start + rows]
            try:
                width = max(len(batch[i].ids) for i in idx)
                input_ids = torch.tensor([[pad] * (width - len(batch[i].ids)) + batch[i].ids for i in idx],
                                         device=self.device)
                mask = torch.tensor([[0] * (width - len(batch[i].ids)) + [1] * len(batch[i].ids) for i in idx],
                                    device=self.device)
                out = generate_padded(self.model, self.tokenizer, input_ids, mask,
                                      [batch[i].params for i in idx], self.eos_ids)
            except Exception as exc:
                raise InFlight(idx) from exc
            yield list(zip(idx, out))

    def _result(self, p: Prepared, row: RowOutput, started: float) -> Result:
        if row.finish_reason == "too_long":
            return Result.failure(p.request.id, "context_length_exceeded",
                                  f"prompt and max_tokens need {p.need} tokens of KV cache; this worker holds "
                                  f"{self.runner.blocks * BLOCK}", started)
        return Result(id=p.request.id, output=decode_output(self.tokenizer, row, self.eos_ids, p.params.stop),
                      finish_reason=row.finish_reason,
                      usage=Usage(prompt_tokens=len(p.ids), completion_tokens=len(row.tokens)),
                      started_at=row.started_at or started, finished_at=row.finished_at, token_ids=row.tokens)

    def _free_memory(self) -> None:
        if self.runner is not None:
            self.runner.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
