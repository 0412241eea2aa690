"""Per-token mask overhead of xgrammar against llguidance, on the CPU, with the bundled model's tokenizer.

What decided worker/engine/grammar.py's library: for the throughput benchmark's five-field schema,
the time to fill one row's token mask and accept its token, per generated token, for one row and
for 64 rows (xgrammar's batch filler, llguidance's parallel executor). Both run in compact-JSON mode.
llguidance is not a dependency: `pip install llguidance==1.9.1` to run its half.

  python benchmarks/grammar_overhead.py [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.throughput import EXTRACTION_SCHEMA  # noqa: E402

DOC = {"category": "billing", "priority": 3, "confidence": 0.75,
       "summary": "The login page crashes when the password field is empty",
       "keywords": ["login", "crash", "ui", "auth"]}


def xgrammar_us(tok, vocab: int, ids: list[int], rows: int, reps: int) -> tuple[float, float]:
    import torch
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=vocab, stop_token_ids=[tok.eos_token_id])
    t = time.perf_counter()
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(EXTRACTION_SCHEMA), any_whitespace=False,
                                                              separators=(",", ":"))
    compile_s = time.perf_counter() - t
    bitmask = xgr.allocate_token_bitmask(rows, vocab)
    batch = xgr.BatchGrammarMatcher()
    total = 0.0
    for _ in range(reps):
        ms = [xgr.GrammarMatcher(compiled) for _ in range(rows)]
        t = time.perf_counter()
        for i in ids:
            batch.batch_fill_next_token_bitmask(ms, bitmask, list(range(rows)))
            assert (int(bitmask[0, i // 32]) >> (i % 32)) & 1
            for m in ms:
                assert m.accept_token(i)
        total += time.perf_counter() - t
    del torch
    return total / reps / len(ids) * 1e6, compile_s


def llguidance_us(tok, vocab: int, ids: list[int], rows: int, reps: int) -> tuple[float, float]:
    import llguidance as llg
    import llguidance.hf
    import llguidance.numpy as lnp

    lt = llguidance.hf.from_tokenizer(tok, n_vocab=vocab)
    grammar = llg.LLMatcher.grammar_from_json_schema(EXTRACTION_SCHEMA, defaults={"whitespace_flexible": False})
    t = time.perf_counter()
    llg.LLMatcher(lt, grammar)
    compile_s = time.perf_counter() - t
    bitmask = lnp.allocate_token_bitmask(rows, vocab)
    executor = llg.LLExecutor()
    total = 0.0
    for _ in range(reps):
        ms = [llg.LLMatcher(lt, grammar) for _ in range(rows)]
        t = time.perf_counter()
        for i in ids:
            lnp.fill_next_token_bitmask_par(executor, [(m, k) for k, m in enumerate(ms)], bitmask)
            assert (bitmask[0, i // 32] >> (i % 32)) & 1
            for m in ms:
                assert m.consume_token(i)
        total += time.perf_counter() - t
    return total / reps / len(ids) * 1e6, compile_s


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cache-dir")
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    from transformers import AutoTokenizer

    from llmbatch.worker.engine import EngineConfig, loading

    tok = AutoTokenizer.from_pretrained(
        loading.resolve_checkpoint(EngineConfig(model="smollm2-135m-instruct", cache_dir=args.cache_dir)))
    vocab = len(tok)
    ids = tok(json.dumps(DOC, separators=(",", ":")), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    out = {"tokens": len(ids), "vocab": vocab}
    for name, fn in (("xgrammar", xgrammar_us), ("llguidance", llguidance_us)):
        try:
            for rows in (1, 64):
                us, compile_s = fn(tok, vocab, ids, rows, args.reps if rows == 1 else 1)
                out[f"{name}_rows{rows}_us_per_token"] = round(us, 1)
                out[f"{name}_compile_s"] = round(compile_s, 4)
        except ImportError as exc:
            out[name] = f"not installed ({exc})"
    print(json.dumps(out, indent=1))
    return out


if __name__ == "__main__":
    main()
