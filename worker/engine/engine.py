"""The engine: requests in, results out, as rows finish.

It tokenizes (applying the chat template to `messages`), sizes a KV cache of slots from a token
budget, runs continuous batching over it (scheduler.py, runner.py), halves the slots when memory
runs out, and isolates an item that makes generation fail so the others still succeed.
Architectures the slot runner does not know fall back to length-sorted padded batches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from . import loading
from .config import EngineConfig
from .generate import RowOutput, check_finished, decode_output, generate_padded
from .runner import COLUMN_BUCKET, Dims, Runner, supports
from .scheduler import InFlight, Item, Stats, run_slots
from .types import Request, Result, SamplingParams, Usage

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    request: Request
    ids: list[int]
    params: SamplingParams  # max_tokens clamped to the context left
    warning: str | None = None  # set when that clamp cut max_tokens, so the result can say so


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

    def generate(self, requests: list[Request]) -> Iterator[list[Result]]:
        """Yield results as rows finish (grouped, at least every flush_seconds); each request gets one."""
        prepared, failed = self._prepare(requests)
        if failed:
            yield failed
        if prepared:
            columns = max(len(p.ids) + p.params.max_tokens for p in prepared)
            slots = max(1, min(self.max_batch_size, len(prepared), self.token_budget() // columns))
            yield from self._run(prepared, slots)

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
                        f"prompt is {len(ids)} tokens; the model's context is {self.context_length}",
                        usage=Usage(prompt_tokens=len(ids))))  # the real length, not 0
                    continue
                params, warning = r.params, None
                if params.max_tokens > room:
                    warning = (f"max_tokens {params.max_tokens} cut to {room}: the prompt is {len(ids)} tokens "
                               f"of the model's context of {self.context_length}")
                    params = SamplingParams(**{**params.__dict__, "max_tokens": room})
                prepared.append(Prepared(r, ids, params, warning))
        return prepared, failed

    def _run(self, batch: list[Prepared], slots: int) -> Iterator[list[Result]]:
        """Generate the batch with at most `slots` rows at once; on failure, back off and retry the rest."""
        initial = slots
        while batch:
            started = time.time()
            done: set[int] = set()
            try:
                if self.config.oom_above_batch is not None and slots > self.config.oom_above_batch:
                    raise torch.OutOfMemoryError(f"test hook: batch {slots} > {self.config.oom_above_batch}")
                for rows in self._loop(batch, slots):
                    done.update(i for i, _ in rows)
                    yield [self._result(batch[i], row, started) for i, row in rows]
                return
            except Exception as exc:
                cause = exc.__cause__ if isinstance(exc, InFlight) else exc
                in_flight = exc.indices if isinstance(exc, InFlight) else []
            rest = [i for i in range(len(batch)) if i not in done]
            if isinstance(cause, torch.OutOfMemoryError):
                self._free_memory()
                if min(slots, len(rest)) > 1:
                    slots = min(slots, len(rest)) // 2
                    self.max_batch_size = min(self.max_batch_size, slots)  # later calls start at what fits
                    log.warning("out of memory; retrying %d items with %d slots", len(rest), slots)
                    batch = [batch[i] for i in rest]
                    continue
                bad = ([i for i in in_flight if i in rest] or rest)[:1]
                yield [Result.failure(batch[i].request.id, "out_of_memory",
                                      "out of memory generating this item alone", started) for i in bad]
                batch, slots = [batch[i] for i in rest if i not in bad], initial
                continue
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

    def _finished(self, row: RowOutput, params: SamplingParams) -> bool:
        return check_finished(self.tokenizer, row, params, self.eos_ids)

    def _loop(self, batch: list[Prepared], slots: int) -> Iterator[list[tuple[int, RowOutput]]]:
        """(index into batch, row) lists as rows finish."""
        if self.runner is None:
            yield from self._loop_padded(batch, slots)
            return
        need = max(len(p.ids) + p.params.max_tokens for p in batch)
        columns = -(-need // COLUMN_BUCKET) * COLUMN_BUCKET if self.device.type == "cuda" else need
        r = self.runner
        # Keep the cache (and its captured graphs) across calls when it fits without much waste.
        if r.kv is None or r.slots < slots or not need <= r.columns <= 2 * columns:
            r.allocate(slots, columns)
        yield from run_slots(r, [Item(p.ids, p.params) for p in batch], slots, self.config.prefill_tokens,
                             self._finished, self.stats, self.config.refill_fraction, self.config.flush_seconds)

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
        return Result(id=p.request.id, output=decode_output(self.tokenizer, row, self.eos_ids),
                      finish_reason=row.finish_reason,
                      usage=Usage(prompt_tokens=len(p.ids), completion_tokens=len(row.tokens)),
                      started_at=row.started_at or started, finished_at=row.finished_at, token_ids=row.tokens,
                      warning=p.warning)

    def _free_memory(self) -> None:
        if self.runner is not None:
            self.runner.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
