"""The engine: requests in, results out, one micro-batch at a time.

It tokenizes (applying the chat template to `messages`), sorts by length so a batch pads
little, sizes batches by a token budget, halves a batch that runs out of memory, and isolates
an item that makes generation fail so its batch-mates still succeed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Iterator

import torch

from . import loading
from .config import EngineConfig
from .generate import decode_output, generate
from .types import Request, Result, SamplingParams, Usage

log = logging.getLogger(__name__)


@dataclass
class Prepared:
    request: Request
    ids: list[int]
    params: SamplingParams  # max_tokens clamped to the context left


class Engine:
    def __init__(self, config: EngineConfig):
        self.config = config
        self.model, self.tokenizer, self.device, self.dtype = loading.load(config)
        cfg = self.model.config
        self.context_length = int(getattr(cfg, "max_position_embeddings", 0) or 4096)
        self.eos_ids = self._eos_ids()
        self.max_batch_size = config.max_batch_size
        self.max_batch_tokens = config.max_batch_tokens or self._token_budget()

    # -- set-up ---------------------------------------------------------------

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if source is None:
                continue
            ids.update(source if isinstance(source, (list, tuple)) else [source])
        return ids

    def kv_bytes_per_token(self) -> int:
        cfg = self.model.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return 2 * cfg.num_hidden_layers * kv_heads * head_dim * self.dtype.itemsize

    def _token_budget(self) -> int:
        """Padded tokens per batch that fit: half the free GPU memory over KV + MLP bytes per token."""
        if self.device.type != "cuda":
            return 64 * 1024
        free, _ = torch.cuda.mem_get_info(self.device)
        per_token = self.kv_bytes_per_token() + 3 * self.model.config.intermediate_size * self.dtype.itemsize
        return max(4096, int(free * 0.5 / per_token))

    # -- public ---------------------------------------------------------------

    def generate(self, requests: list[Request]) -> Iterator[list[Result]]:
        """Yield results one micro-batch at a time; every request gets exactly one result."""
        prepared, failed = self._prepare(requests)
        if failed:
            yield failed
        for batch in self._plan(prepared):
            yield from self._run(batch)

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

    def _plan(self, prepared: list[Prepared]) -> Iterator[list[Prepared]]:
        """Longest prompts first; a batch grows while rows and padded tokens stay in budget."""
        prepared = sorted(prepared, key=lambda p: len(p.ids), reverse=True)
        batch: list[Prepared] = []
        width = 0
        for p in prepared:
            new_width = max(width, len(p.ids) + p.params.max_tokens)
            if batch and (len(batch) >= self.max_batch_size or new_width * (len(batch) + 1) > self.max_batch_tokens):
                yield batch
                batch, new_width = [], len(p.ids) + p.params.max_tokens
            batch.append(p)
            width = new_width
        if batch:
            yield batch

    def _run(self, batch: list[Prepared]) -> Iterator[list[Result]]:
        started = time.time()
        try:
            yield self._generate(batch, started)
            return
        except torch.OutOfMemoryError:
            self._free_memory()
            if len(batch) == 1:
                yield [Result.failure(batch[0].request.id, "out_of_memory",
                                      "out of memory generating this item alone", started)]
                return
            # Later batches start at the size that fit.
            self.max_batch_size = max(1, min(self.max_batch_size, len(batch) // 2))
            log.warning("out of memory at batch %d; halving to %d", len(batch), len(batch) // 2)
        except Exception as exc:
            if len(batch) == 1:
                log.exception("item %s failed", batch[0].request.id)
                yield [Result.failure(batch[0].request.id, "engine_error", f"{type(exc).__name__}: {exc}", started)]
                return
            log.warning("batch of %d failed (%s); splitting to isolate the cause", len(batch), exc)
        half = len(batch) // 2
        yield from self._run(batch[:half])
        yield from self._run(batch[half:])

    def _generate(self, batch: list[Prepared], started: float) -> list[Result]:
        if self.config.oom_above_batch is not None and len(batch) > self.config.oom_above_batch:
            raise torch.OutOfMemoryError(f"test hook: batch {len(batch)} > {self.config.oom_above_batch}")
        width = max(len(p.ids) for p in batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (width - len(p.ids)) + p.ids for p in batch], device=self.device)
        mask = torch.tensor([[0] * (width - len(p.ids)) + [1] * len(p.ids) for p in batch], device=self.device)
        rows = generate(self.model, self.tokenizer, input_ids, mask, [p.params for p in batch], self.eos_ids)
        return [
            Result(id=p.request.id, output=decode_output(self.tokenizer, row, self.eos_ids),
                   finish_reason=row.finish_reason,
                   usage=Usage(prompt_tokens=len(p.ids), completion_tokens=len(row.tokens)),
                   started_at=started, finished_at=row.finished_at)
            for p, row in zip(batch, rows)
        ]

    def _free_memory(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
