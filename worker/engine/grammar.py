"""Structured outputs (response_format json_object / json_schema) through xgrammar's token masks.

Why xgrammar rather than llguidance: per-token mask overhead, measured on the 2-core dev machine
with the bundled model's tokenizer (SmolLM2, 49,152 tokens) and the throughput benchmark's
five-field schema (benchmarks/grammar_overhead.py: fill a row's mask and accept its token).
Quiet machine: one row 8.8 us per token with xgrammar 0.2.8 against 18.9 us with llguidance
1.9.1; 64 rows 0.32 ms against 1.3 ms per step. Under a load average of 16: 186 against 324 us,
and 10.7 against 20.4 ms. llguidance compiles faster (13 ms against 2.9 s under that load), which
matters only for many distinct schemas: compiles are cached. llguidance imports without torch,
but submit checks schemas with `jsonschema` (jobs/inputs.py), so only the worker needs a grammar
library.

I/O-free: a compiled grammar per schema, cached per process; one matcher per row; masks filled
into a CPU int32 bitmask [B, ceil(V / 32)] (bit t of a row set = token t allowed).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections import OrderedDict
from typing import Any

import torch

CACHE_SIZE = 1024  # compiled grammars kept per process; a job has one schema or a few
# Compact JSON (no free whitespace): a model may otherwise emit whitespace until max_tokens.
SEPARATORS = (",", ":")


class GrammarError(ValueError):
    """The schema cannot be compiled; str() is the library's reason."""


def bitmask_words(vocab: int) -> int:
    return (vocab + 31) // 32


def cache_key(response_format: str, schema: str | None) -> str:
    return hashlib.sha256(f"{response_format}\0{schema or ''}".encode()).hexdigest()


class Grammars:
    """Compiles and caches grammars for one tokenizer, and fills masks for a batch of matchers."""

    def __init__(self, tokenizer, vocab: int, stop_ids: set[int], threads: int | None = None):
        import xgrammar as xgr  # imports torch: worker-side only

        self.xgr = xgr
        self.vocab = vocab
        # vocab: the logits' width, which may exceed the tokenizer's (padded embedding tables).
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab, stop_token_ids=sorted(stop_ids))
        self.compiler = xgr.GrammarCompiler(info, cache_enabled=False)  # we cache, by schema hash
        # Every core this process may use: xgrammar's "auto" takes half the hardware threads, and a
        # step's masks (hundreds of rows, ~0.3 ms each inside a free string) must be ready before
        # the GPU's step is, or the step waits for them.
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.batch = xgr.BatchGrammarMatcher(threads or min(32, max(1, cores)))
        self.cache: OrderedDict[str, Any] = OrderedDict()  # key -> CompiledGrammar or GrammarError
        self.compiles = 0  # grammars actually compiled (a test counts them)

    def compile(self, response_format: str, schema: str | None):
        """The compiled grammar for a request's response_format; raises GrammarError, cached too."""
        key = cache_key(response_format, schema)
        if key in self.cache:
            self.cache.move_to_end(key)
            found = self.cache[key]
        else:
            self.compiles += 1
            try:
                if response_format == "json_object":
                    # Any object with any keys: strict_mode would forbid keys the schema does not name.
                    found = self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                              separators=SEPARATORS, strict_mode=False)
                else:
                    found = self.compiler.compile_json_schema(schema or "{}", any_whitespace=False,
                                                              separators=SEPARATORS, strict_mode=True)
            except Exception as exc:  # xgrammar raises RuntimeError/ValueError with its reason
                found = GrammarError(_reason(exc))
            self.cache[key] = found
            if len(self.cache) > CACHE_SIZE:
                self.cache.popitem(last=False)
        if isinstance(found, GrammarError):
            raise found
        return found

    def matcher(self, compiled):
        """A fresh per-row state, at the start of the output."""
        return self.xgr.GrammarMatcher(compiled)

    def fill(self, matchers: list, rows: list[int], bitmask: torch.Tensor) -> None:
        """Write the allowed next tokens of matchers[i] into bitmask[rows[i]] (CPU int32 [B, W]).

        A matcher that has accepted its stop token has no next token: its row (a finished row that
        the scheduler decodes one step more, and whose token it drops) allows every token."""
        live = [(m, r) for m, r in zip(matchers, rows) if not m.is_terminated()]
        for m, r in zip(matchers, rows):
            if m.is_terminated():
                bitmask[r] = -1
        if live:
            self.batch.batch_fill_next_token_bitmask([m for m, _ in live], bitmask, [r for _, r in live])

    def accept(self, matchers: list, tokens: list[int]) -> list[bool]:
        """Advance each matcher by its row's sampled token, in one call into the library; False where
        the grammar refuses it."""
        return self.xgr.BatchGrammarMatcher.batch_accept_token(matchers, tokens) if matchers else []


def _reason(exc: Exception) -> str:
    """The library's message without its C++ log prefix ("[09:56:41] /project/cpp/x.cc:4950: ")."""
    lines = str(exc).strip().splitlines()
    return _LOG_PREFIX.sub("", lines[0]) if lines else type(exc).__name__


_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")
