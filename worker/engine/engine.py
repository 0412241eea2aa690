"""The engine: requests in, results out, as rows finish.

It tokenizes (applying the chat template to `messages`), sizes a paged KV cache from a token
budget, runs continuous batching over it (scheduler.py, forward.py) and shapes the results; the
policy for a batch that fails (halve the rows when memory runs out and grow them back once batches
succeed, isolate an item that makes generation fail so the others still succeed) is retry.py's.
`generate` can be fed more requests while it runs, so the tail of one chunk decodes together with
the head of the next.
Architectures the slot runner does not know fall back to length-sorted padded batches.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Collection, Iterator

import torch

from . import chat, invariant, loading, lora, retry
from .config import EngineConfig
from .generate import RowOutput, check_finished, decode_output, generate_padded
from .forward import BLOCK, Dims, Runner, supports
from .controls import needs_controls
from .scheduler import CANCELLED, InFlight, Prompt, Stats, run_slots
from .types import Choice, Request, Result, SamplingParams, Usage

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    request: Request
    ids: list[int]
    params: SamplingParams  # max_tokens clamped to the context left
    grammar: Any = None  # compiled grammar for json_object / json_schema
    adapter: int = -1  # stack slot of its LoRA adapter in self.lora; -1 = none
    warning: str | None = None  # set when that clamp cut max_tokens, so the result can say so

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
        self.runner = Runner(self.model, self.dtype, config.cuda_graphs, config.batch_invariant) \
            if supports(self.model) else None
        if self.runner is None and config.batch_invariant:
            raise ValueError(f"batch-invariant mode needs the slot runner, which {cfg.model_type} lacks "
                             "(LLMBATCH_BATCH_INVARIANT)")
        if config.batch_invariant and self.device.type == "cuda":  # the CPU's runner goes row by row instead
            log.info("batch-invariant mode: %d modules swapped", invariant.use(self.model))
            t = time.perf_counter()
            log.info("batch-invariant mode: %d kinds of layer warmed in %.1fs (Triton's compiles)",
                     invariant.warm(self.model, self.dtype), time.perf_counter() - t)
        if self.runner is None:
            log.warning("%s: no slot runner for this architecture; using padded batches", cfg.model_type)
        self.stats = Stats()
        self._grammars = None  # made on the first structured request (imports xgrammar)
        self.lora: lora.Registry | None = None  # made when the first adapter is asked for
        self._token_text: dict[int, str] = {}  # token id -> text, for logprobs
        self._rows = self.max_batch_size  # rows of the current run (for messages)

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
        if self.runner is not None and self.runner.kv is not None:  # the cache and its penalty tables
            held += self.runner.kv.numel() * self.runner.kv.element_size()
            held += Runner.penalty_bytes(self.runner.penalty_counts.shape[0], self.runner.dims.vocab)
        # The penalty tables come out of the same share, reserved before any row asks for them.
        tables = Runner.penalty_bytes(self.penalty_tables(), Dims.of(self.model).vocab)
        return int(((free + held) * self.config.kv_memory_fraction - tables) / self.kv_bytes_per_token())

    def penalty_tables(self) -> int:
        """Rows with penalties that may decode at once (controls.py), at least one."""
        return max(1, min(self.config.penalty_rows or self.config.max_batch_size, self.config.max_batch_size))

    # -- public ---------------------------------------------------------------

    def generate(self, requests: list[Request],
                 more: Callable[[], list[Request]] | None = None,
                 cancelled: Callable[[], Collection[Any]] | None = None) -> Iterator[list[Result]]:
        """Yield results as rows finish (grouped, at least every flush_seconds); each request gets one.

        more: called when the engine could take more work; returns further requests (or none).
        cancelled: called once per decode step (so keep it cheap); returns the ids of requests to
        drop so far, a collection that only grows. A dropped request not yet finished leaves the
        batch at the next step, its slot, blocks and prefix freed, and is yielded at once as a
        Result with finish_reason and error_code "cancelled".
        """
        drops = _Drops(cancelled) if cancelled is not None else None
        prepared, failed = self._prepare(requests)
        if drops is not None:
            gone = drops.cancelled()
            failed += [_cancelled(p.request.id, "cancelled before it started", time.time())
                       for p in prepared if p.request.id in gone]
            prepared = [p for p in prepared if p.request.id not in gone]
        if failed:
            yield failed
        late_failures: list[Result] = []
        deferred: list[Request] = []  # fed requests whose adapters cannot be held beside those running

        fed = {"stopped": False}

        def feed() -> list[Prepared]:
            # A feed that raises (a database error claiming the next chunk) stops feeding: it is no
            # failure of the items in flight, which run on. What it had not handed over stays its own.
            if fed["stopped"]:
                return []
            try:
                requests = more()
            except Exception:
                log.exception("the feed of more requests failed; finishing the items in flight without it")
                fed["stopped"] = True
                self.stats.feed_errors += 1
                return []
            fresh, bad = self._prepare(requests)
            late_failures.extend(bad)
            running = {p.request.adapter for p in batch if p.request.adapter}
            new = list(dict.fromkeys(p.request.adapter for p in fresh if p.request.adapter and
                                     p.request.adapter not in running))
            if len(running) + len(new) > self.config.max_adapters:
                keep = set(new[:max(0, self.config.max_adapters - len(running))]) | running
                deferred.extend(p.request for p in fresh if p.request.adapter and p.request.adapter not in keep)
                fresh = [p for p in fresh if not p.request.adapter or p.request.adapter in keep]
            fresh, bad = self._with_adapters(fresh)
            late_failures.extend(bad)
            return fresh

        # At most max_adapters distinct adapters run together, each loaded before its group.
        groups = lora.groups([p.request.adapter for p in prepared], self.config.max_adapters) or [[]]
        for n, group in enumerate(groups):
            batch, bad = self._with_adapters([prepared[i] for i in group])
            if bad:
                yield bad
            last = n == len(groups) - 1
            if batch or (last and more is not None):
                yield from retry.run(self, batch, self.max_batch_size, feed if last and more is not None else None,
                                     late_failures, drops)
        if late_failures:
            yield late_failures
        if deferred:
            yield from self.generate(deferred, cancelled=cancelled)

    def generate_all(self, requests: list[Request]) -> list[Result]:
        by_id = {r.id: r for batch in self.generate(requests) for r in batch}
        return [by_id[r.id] for r in requests]

    # -- internals ------------------------------------------------------------

    def _with_adapters(self, batch: list[Prepared]) -> tuple[list[Prepared], list[Result]]:
        """Load the adapters the batch names; an item whose adapter cannot run fails alone."""
        sources = list(dict.fromkeys(p.request.adapter for p in batch if p.request.adapter))
        if not sources:
            return batch, []
        slots, errors = {}, {}
        for src in sources:
            if self.runner is None:
                errors[src] = ("invalid_request", f"adapter {src!r}: adapters need a Llama-family model "
                               f"({self.model.config.model_type} is run without the slot runner)")
                continue
            if self.lora is None:
                names = [self.config.model, getattr(self.model.config, "_name_or_path", "") or ""]
                self.lora = lora.Registry(self.model, [n for n in names if n], self.config.max_adapters,
                                          self.config.max_batch_size, self.dtype, self.device)
                self.runner.lora = self.lora
            try:
                slots[src] = self.lora.acquire(src)
            except lora.AdapterError as exc:
                errors[src] = ("invalid_request", str(exc))
            except Exception as exc:  # out of memory for the stacks, say: these items only
                log.exception("loading adapter %s failed", src)
                errors[src] = ("engine_error", f"loading adapter {src!r}: {type(exc).__name__}: {exc}")
        ok, failed = [], []
        for p in batch:
            src = p.request.adapter
            if src in errors:
                failed.append(Result.failure(p.request.id, *errors[src]))
            else:
                p.adapter = slots.get(src, -1)
                ok.append(p)
        return ok, failed

    def _prepare(self, requests: list[Request]) -> tuple[list[Prepared], list[Result]]:
        prepared, failed = [], []
        raw = [r for r in requests if r.messages is None]
        chats = [r for r in requests if r.messages is not None]
        # Raw prompts are the user's own text, tokenized as given (special-token text included);
        # chat contents are tokenized so that such text stays text (chat.py).
        encoded = self.tokenizer([r.prompt or "" for r in raw], add_special_tokens=True)["input_ids"] if raw else []
        groups = [list(zip(raw, encoded)), []]
        for r, ids in zip(chats, chat.encode_chats(self.tokenizer, [r.messages for r in chats])):
            if isinstance(ids, Exception):  # a template that rejects these messages fails this item only
                failed.append(Result.failure(r.id, "invalid_request", f"chat template failed: {ids}"))
            else:
                groups[1].append((r, ids))
        for group in groups:
            for r, ids in group:
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
                try:
                    grammar = self._grammar(params)
                except ValueError as exc:
                    failed.append(Result.failure(r.id, "invalid_request", str(exc)))
                    continue
                prepared.append(Prepared(r, ids, params, grammar, warning=warning))
        return prepared, failed

    @property
    def grammars(self):
        if self._grammars is None:
            from .grammar import Grammars

            self._grammars = Grammars(self.tokenizer, Dims.of(self.model).vocab, self.eos_ids)
        return self._grammars

    def _grammar(self, params: SamplingParams):
        """The request's compiled grammar (cached per schema), or None; ValueError if not usable."""
        if self.runner is None and (needs_controls(params) or params.n > 1):
            raise ValueError(f"{self.model.config.model_type}: response_format, logprobs, n, penalties and "
                             "logit_bias need the slot runner, which this architecture lacks")
        if params.response_format == "text":
            return None
        from .grammar import GrammarError

        try:
            return self.grammars.compile(params.response_format, params.json_schema)
        except GrammarError as exc:
            raise ValueError(f"response_format: the schema cannot be compiled: {exc}") from None

    def _check(self, rows: list[tuple[RowOutput, SamplingParams]]) -> None:
        check_finished(self.tokenizer, rows, self.eos_ids)

    def _ensure_pool(self, batch: list[Prepared], slots: int) -> int:
        """Size the block pool and the slots; returns the rows to run with.

        On GPUs the pool takes the memory budget and is kept across calls (graphs with it). On the
        CPU it is as large as this batch needs (at least 4,096 tokens, so fed chunks fit too).
        """
        r, c = self.runner, self.config
        tables = self.penalty_tables()
        total = self.token_budget()
        prefix_len = c.prefix_max_len if self.device.type == "cuda" else \
            min(c.prefix_max_len, max((len(p.ids) for p in batch), default=1))
        # The prefix store comes out of the same budget as the blocks, half of it at most; with no
        # room for one prefix worth sharing, there is none.
        prefixes = min(c.prefix_slots, total // 2 // max(prefix_len, 1)) if c.shared_prefix_min > 0 else 0
        if not prefixes or prefix_len < c.shared_prefix_min:
            prefixes = prefix_len = 0
        budget = max(1, (total - prefixes * prefix_len) // BLOCK)
        if self.device.type == "cuda":
            want, rows = budget, c.max_batch_size
        else:
            want = min(budget, max(sum(p.params.n * Runner.blocks_for(p.need) for p in batch), 4096 // BLOCK))
            rows = min(c.max_batch_size, max(sum(p.params.n for p in batch), 64))
        stored = r.prefix_kv.shape[2] if r.kv is not None and r.prefix_kv is not None else 0
        if r.kv is None or r.slots < min(rows, slots) or r.blocks < want or stored != prefixes or \
                (prefixes and r.prefix_kv.shape[4] < prefix_len) or r.penalty_counts.shape[0] != tables:
            r.allocate(max(rows, min(slots, c.max_batch_size)), want, self.context_length, prefixes, prefix_len,
                       tables)
        return min(slots, r.slots)

    def _loop(self, batch: list[Prepared], slots: int, feed: Callable[[], list[Prepared]] | None = None,
              drops: "_Drops | None" = None) -> Iterator[list[tuple[int, RowOutput]]]:
        """(index into batch, row) lists as rows finish; `feed`'s requests are appended to batch."""
        if self.runner is None:
            yield from self._loop_padded(batch, slots, drops)
            return
        slots = self._rows = self._ensure_pool(batch, slots)
        items = [Prompt(p.ids, p.params, p.grammar, p.adapter) for p in batch]

        def more() -> list[Prompt]:
            fresh = feed()
            batch.extend(fresh)
            return [Prompt(p.ids, p.params, p.grammar, p.adapter) for p in fresh]

        yield from run_slots(self.runner, items, slots, self.config.prefill_tokens,
                             self._check, self.stats, self.config.refill_fraction, self.config.flush_seconds,
                             more if feed is not None else None, self._grammars, self.config.shared_prefix_min,
                             (lambda: drops.indices(batch)) if drops is not None else None)

    def _loop_padded(self, batch: list[Prepared], rows: int,
                     drops: "_Drops | None" = None) -> Iterator[list[tuple[int, RowOutput]]]:
        order = sorted(range(len(batch)), key=lambda i: -len(batch[i].ids))
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(order), rows):
            idx = order[start:start + rows]
            gone = drops.indices(batch) if drops is not None else set()
            if gone:  # padded batches run whole: a dropped item is taken out before its batch starts
                now = time.time()
                yield [(i, RowOutput(finish_reason=CANCELLED, started_at=now, finished_at=now, choice=c))
                       for i in idx if i in gone for c in range(batch[i].params.n)]
                idx = [i for i in idx if i not in gone]
                if not idx:
                    continue
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

    def _result(self, p: Prepared, row: RowOutput, started: float, more: list[RowOutput] = ()) -> Result:
        """more: choices 1..n-1 of an n > 1 request; completion_tokens counts them all."""
        if any(r.finish_reason == CANCELLED for r in (row, *more)):
            done = len(row.tokens) + sum(len(c.tokens) for c in more)
            return _cancelled(p.request.id, "cancelled while it was generating", started,
                              Usage(prompt_tokens=len(p.ids), completion_tokens=done, cached_tokens=row.cached))
        if row.finish_reason == "too_long":
            return Result.failure(p.request.id, "context_length_exceeded",
                                  f"prompt and max_tokens need {p.need} tokens of KV cache; this worker holds "
                                  f"{self.runner.blocks * BLOCK}", started)
        if row.finish_reason == "too_many_rows":
            n, most = p.params.n, self.config.max_batch_size
            if n > most:  # this worker can never run it: a retry would fail the same way
                return Result.failure(p.request.id, "too_many_choices",
                                      f"n={n} choices decode side by side and need {n} rows at once; this "
                                      f"worker runs at most {most} (LLMBATCH_MAX_BATCH_SIZE)", started)
            return Result.failure(p.request.id, "out_of_memory",  # it may fit once memory is back
                                  f"n={n} choices need {n} rows at once; out of memory, this worker runs "
                                  f"{self._rows} rows now", started)
        stops = p.params.stop
        choices = [Choice(decode_output(self.tokenizer, c, self.eos_ids, stops), c.finish_reason, len(c.tokens),
                          self._logprobs(c), c.tokens) for c in more]
        return Result(id=p.request.id, output=decode_output(self.tokenizer, row, self.eos_ids, stops),
                      finish_reason=row.finish_reason,
                      usage=Usage(prompt_tokens=len(p.ids),
                                  completion_tokens=len(row.tokens) + sum(c.completion_tokens for c in choices),
                                  cached_tokens=row.cached),
                      started_at=row.started_at or started,
                      finished_at=max([row.finished_at, *(c.finished_at for c in more)]),
                      token_ids=row.tokens, logprobs=self._logprobs(row), choices=choices,
                      warning=p.warning)

    def _text(self, token: int) -> str:
        if token not in self._token_text:
            self._token_text[token] = self.tokenizer.decode([token])
        return self._token_text[token]

    def _logprobs(self, row: RowOutput) -> list[dict] | None:
        """The row's (id, logprob, top) triples as OpenAI-shaped entries with token text."""
        if row.logprobs is None:
            return None
        # One entry per kept token: a finished row's one extra step (scheduler.py) made one more.
        # A token the grammar forbids has logprob -inf, which JSON cannot hold: it is left out of the
        # alternatives; OpenAI's floor, -9999.0, stands for it anywhere else.
        kept = len(row.tokens)
        if row.finish_reason == "stop" and row.stop_text is None and kept and row.tokens[-1] in self.eos_ids:
            kept -= 1  # the end-of-turn token is not part of the output text: OpenAI lists no entry for it
        return [{"token": self._text(t), "logprob": max(lp, -9999.0),
                 "top_logprobs": [{"token": self._text(a), "logprob": alp} for a, alp in top if alp > -1e30]}
                for t, lp, top in row.logprobs[:kept]]

    def _free_memory(self) -> None:
        if self.runner is not None:
            self.runner.release()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


def _cancelled(request_id: Any, message: str, started: float, usage: Usage | None = None) -> Result:
    r = Result.failure(request_id, CANCELLED, message, started, usage)
    r.finish_reason = CANCELLED
    return r


class _Drops:
    """The caller's `cancelled` ids, as batch indices for the scheduler; cheap while nothing changed."""

    def __init__(self, cancelled: Callable[[], Collection[Any]]):
        self.cancelled = cancelled
        self.seen: tuple = ()  # (ids, batch, batch length) last mapped: ids only grow, a batch grows when fed

    def indices(self, batch: list[Prepared]) -> set[int]:
        ids = self.cancelled()
        key = (len(ids), id(batch), len(batch))
        if not ids or key == self.seen:
            return set()
        self.seen = key
        return {i for i, p in enumerate(batch) if p.request.id in ids}
