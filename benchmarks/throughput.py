"""Throughput: the engine against naive padded `model.generate`, one NF4 model, one process, one GPU.

By default the model is the Llama-3.1-8B architecture with random weights, built on the GPU in
bf16, saved to disk and loaded back through the engine's own NF4 path (`--model PATH` takes a real
checkpoint instead). Prompts are random token ids written as the words of a word-level tokenizer
saved with the model ("t17 t90233 ..."), so each text tokenizes back to exactly its ids and every
contender tokenizes the same text.

Contenders, on the same prompts and the same loaded model:
  baseline  `model.generate`, fixed batches of --batch in file order, left-padded
  single    `model.generate` one prompt at a time, on the first --single prompts
  engine    `engine.generate(requests)`, exactly as the worker calls it

  python benchmarks/throughput.py --json-out bench.json      # GPU: 1000 prompts of 16-512 tokens, 128 new
  python benchmarks/throughput.py --smoke                     # CPU, bundled small model, about a minute

Workload `adapters` (issue 11): four random rank-16 LoRA adapters on all seven projections, fixed-length
prompts spread over them round-robin in file order, against the base-only engine on the same prompts
and peft's own `generate` run adapter by adapter at --batch (on the first --peft-prompts lines):

  python benchmarks/throughput.py --workloads adapters --json-out adapters.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import random
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from llmbatch.worker.engine import EngineConfig, Request, SamplingParams, load_engine  # noqa: E402
from llmbatch.worker.engine.engine import Engine  # noqa: E402
from llmbatch.worker.engine.scheduler import Stats  # noqa: E402

WORD_VOCAB = 128000  # prompt words t0..t127999; ids from 128000 up are Llama 3's special tokens


# -- the model ------------------------------------------------------------------


def llama31_8b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, max_position_embeddings=131072, rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        tie_word_embeddings=False, bos_token_id=128000, eos_token_id=128001)


def word_tokenizer(vocab: int, bos: int, eos: int, pad: int):
    """A word-level tokenizer: token i is the word t{i}; no special tokens are added to prompts."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=f"t{bos}", eos_token=f"t{eos}", pad_token=f"t{pad}")


def build_random_model(path: Path, layer_std: float) -> None:
    """Random Llama-3.1-8B weights made on the GPU in bf16 (seconds), saved with a word tokenizer.

    Embeddings and the LM head keep transformers' init (std 0.02). The decoder layers' matrices get
    std layer_std: at 0.02 each layer's output outweighs the residual stream many times over, the
    network is chaotic, and bf16 rounding differences between two batch shapes change the greedy
    text of nearly every prompt (measured: `generate` alone vs batched agreed on none), so the
    match rate would say nothing. Values do not change the cost of any kernel.
    """
    from transformers import AutoModelForCausalLM

    if (path / "config.json").exists():
        print(f"reusing {path}")
        return
    torch.manual_seed(0)
    t = time.perf_counter()
    cfg = llama31_8b_config()
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)  # initialised on the device
    with torch.no_grad():
        for p in model.model.layers.parameters():
            if p.dim() == 2:
                p.normal_(0.0, layer_std)
    built = time.perf_counter() - t
    model.save_pretrained(path)
    word_tokenizer(cfg.vocab_size, 128000, 128001, 128002).save_pretrained(path)
    print(f"built random {cfg.model_type} in {built:.1f}s, saved to {path} in {time.perf_counter() - t - built:.1f}s")
    del model
    torch.cuda.empty_cache()


# -- the workload ---------------------------------------------------------------


@dataclasses.dataclass
class Item:
    text: str
    params: SamplingParams


STOPS = ("<never-a-stop>", "qq zz")  # two stop strings that never match: their cost is checking for them
LONG_TOKENS = 1024  # mixed: the long lines' max_tokens


WORKLOADS = ("fixed", "varied", "sampled", "mixed", "penalties", "logprobs1")  # make_workload's kinds


def make_workload(kind: str, n: int, min_len: int, max_len: int, new_tokens: int, tokenizer, seed: int,
                  words: bool) -> list[Item]:
    """fixed: every row makes exactly new_tokens (EOS ignored). varied: EOS allowed, max_tokens in 16..2*new_tokens.
    sampled: fixed's prompts at temperature 0.7, top_p 0.9, a seed per line, two stop strings.
    mixed: fixed with every 50th line (2%) at max_tokens 1,024.
    penalties: fixed with a few lines asking for more (issue 19): every 200th line a frequency and presence
    penalty, every 200th (offset 100) logprobs with 5 alternatives; a small run gets one of each, first.
    logprobs1: fixed with its middle line asking for logprobs with 5 alternatives (issue 18: one such row
    must not make every step wait; compare vs_fixed and scheduler.host_waits)."""
    rng = random.Random(seed)
    items = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        if words:
            text = " ".join(f"t{rng.randrange(WORD_VOCAB)}" for _ in range(length))
        else:  # a real tokenizer: decode random ordinary ids (re-tokenizing gives about `length` tokens)
            text = tokenizer.decode([rng.randrange(1000, tokenizer.vocab_size - 1000) for _ in range(length)])
        if kind == "fixed":
            params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
        elif kind == "logprobs1":
            one = len(items) == n // 2
            params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True, logprobs=one,
                                    top_logprobs=5 * one)
        elif kind == "sampled":
            params = SamplingParams(max_tokens=new_tokens, temperature=0.7, top_p=0.9, seed=len(items), stop=STOPS,
                                    ignore_eos=True)
        elif kind == "mixed":  # 2% long lines; a small run gets one, its last
            long = len(items) % 50 == 49 or (n < 50 and len(items) == n - 1)
            params = SamplingParams(max_tokens=min(LONG_TOKENS, 8 * new_tokens) if long else new_tokens,
                                    temperature=0.0, ignore_eos=True)
        elif kind == "penalties":
            at = len(items) % 200 if n >= 200 else len(items)
            penalty, logprobs = at == 0, at == (100 if n >= 200 else 1)
            params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True,
                                    frequency_penalty=0.5 * penalty, presence_penalty=0.3 * penalty,
                                    logprobs=logprobs, top_logprobs=5 * logprobs)
        else:
            params = SamplingParams(max_tokens=rng.randint(16, 2 * new_tokens), temperature=0.0)
        items.append(Item(text, params))
    return items


# -- contenders -----------------------------------------------------------------


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _start(device) -> float:
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    return time.perf_counter()


def _finish(device, t0: float, prompt_tokens: int, output_tokens: int, computed: int, **extra) -> dict:
    _sync(device)
    wall = time.perf_counter() - t0
    gb = 1024 ** 3
    return {
        "wall_s": round(wall, 3), "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "output_tok_s": round(output_tokens / wall, 1), "total_tok_s": round((prompt_tokens + output_tokens) / wall, 1),
        "padding_fraction": round(1 - (prompt_tokens + output_tokens) / computed, 4) if computed else 0.0,
        "peak_alloc_gb": round(torch.cuda.max_memory_allocated(device) / gb, 2) if device.type == "cuda" else None,
        "peak_reserved_gb": round(torch.cuda.max_memory_reserved(device) / gb, 2) if device.type == "cuda" else None,
        **extra,
    }


def useful(row: list[int], max_tokens: int, eos_ids: set[int], ignore_eos: bool) -> list[int]:
    """What the row is worth: up to its own max_tokens, and up to and including EOS if EOS counts."""
    row = row[:max_tokens]
    if not ignore_eos:
        for j, t in enumerate(row):
            if t in eos_ids:
                return row[: j + 1]
    return row


class TailStops:
    """What a `generate` user without StopStringCriteria writes: decode each row's tail, look for the stops."""

    def __init__(self, tokenizer, stops):
        self.tokenizer, self.stops = tokenizer, stops
        self.window = max(map(len, stops)) + 2

    def __call__(self, input_ids, scores, **kw):
        tails = self.tokenizer.batch_decode(input_ids[:, -self.window:].tolist(), skip_special_tokens=True)
        return torch.tensor([any(s in t for s in self.stops) for t in tails], device=input_ids.device)


@torch.inference_mode()
def run_generate(model, tokenizer, items: list[Item], batch: int, eos_ids: set[int]) -> tuple[dict, list[list[int]]]:
    """Naive: `model.generate` on fixed batches in file order, left-padded, to the batch's largest max_tokens."""
    device = model.device
    outs, prompt_tokens, computed = [], 0, 0
    t0 = _start(device)
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        enc = tokenizer([it.text for it in chunk], padding=True, return_tensors="pt").to(device)
        ignore = chunk[0].params.ignore_eos
        p = chunk[0].params
        sampling = dict(do_sample=True, temperature=p.temperature, top_p=p.top_p) if p.temperature > 0 else \
            dict(do_sample=False)
        if p.stop:  # transformers' StopStringCriteria cannot read the word-level tokenizer: the plain way
            from transformers import StoppingCriteriaList

            sampling["stopping_criteria"] = StoppingCriteriaList([TailStops(tokenizer, p.stop)])
        seq = model.generate(**enc, **sampling, max_new_tokens=max(it.params.max_tokens for it in chunk),
                             eos_token_id=None if ignore else sorted(eos_ids), pad_token_id=tokenizer.pad_token_id)
        width = enc["input_ids"].shape[1]
        gen = seq[:, width:].tolist()
        outs += [useful(row, it.params.max_tokens, eos_ids, ignore) for row, it in zip(gen, chunk)]
        prompt_tokens += int(enc["attention_mask"].sum())
        computed += len(chunk) * seq.shape[1]
    stats = _finish(device, t0, prompt_tokens, sum(map(len, outs)), computed, batches=-(-len(items) // batch))
    return stats, outs


def run_engine(engine: Engine, items: list[Item]) -> tuple[dict, list[list[int]]]:
    """Exactly the worker's call: requests in, lists of results out as rows finish."""
    requests = [Request(id=i, prompt=it.text, params=it.params) for i, it in enumerate(items)]
    engine.stats = Stats()
    if engine.runner is not None:
        engine.runner.stats = dict.fromkeys(engine.runner.stats, 0)
    results, yields = {}, 0
    t0 = _start(engine.device)
    for batch in engine.generate(requests):
        yields += 1
        results.update({r.id: r for r in batch})
    rs = [results[i] for i in range(len(items))]
    s = engine.stats
    errors = [r.error_code for r in rs if not r.ok]
    stats = _finish(engine.device, t0, sum(r.usage.prompt_tokens for r in rs),
                    sum(r.usage.completion_tokens for r in rs), s.prefill_slots + s.decode_slots,
                    yields=yields, errors=len(errors), batch_failures=s.batch_failures, slots=_slots(engine),
                    host_waits=s.host_waits,  # issue 18: launches read back before the next was queued
                    scheduler=dataclasses.asdict(s),
                    runner=dict(engine.runner.stats) if engine.runner is not None else None)
    return stats, [r.token_ids for r in rs]


def _slots(engine: Engine):
    r = engine.runner
    return None if r is None or r.kv is None else {"slots": r.slots, "blocks": r.blocks, "block_tokens": r.blocks * 16}


def match_rate(a: list[list[int]], b: list[list[int]], n: int = 32) -> float:
    return round(sum(x[:n] == y[:n] for x, y in zip(a, b)) / max(1, min(len(a), len(b))), 4)


def common_prefix(a: list[list[int]], b: list[list[int]], n: int = 32) -> float:
    """Mean number of leading tokens (of the first n) two runs agree on."""
    def one(x, y):
        k = 0
        while k < min(n, len(x), len(y)) and x[k] == y[k]:
            k += 1
        return k
    return round(sum(one(x, y) for x, y in zip(a, b)) / max(1, min(len(a), len(b))), 2)


# -- workload `adapters` (issue 11) ------------------------------------------------


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_random_adapters(engine: Engine, out: Path, n: int, rank: int, seed: int) -> list[str]:
    """n random LoRA adapters in peft's own format (adapter_config.json + adapter_model.safetensors),
    on every projection of every layer, written straight from the model's shapes: no peft model of
    the big base is needed to make them. lora_B is small but non-zero, so the adapters change the text."""
    from peft import LoraConfig
    from safetensors.torch import save_file

    from llmbatch.worker.engine.lora import target_modules

    modules = target_modules(engine.model)
    paths = []
    for k in range(n):
        path = out / f"adapter-{k}"
        paths.append(str(path))
        if (path / "adapter_model.safetensors").exists():
            continue
        g = torch.Generator().manual_seed(seed + k)
        weights = {}
        for (layer, proj), m in modules.items():
            parent = "mlp" if proj in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            key = f"base_model.model.model.layers.{layer}.{parent}.{proj}"
            weights[f"{key}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) / m.in_features ** 0.5
            weights[f"{key}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * 0.01
        path.mkdir(parents=True, exist_ok=True)
        LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(LORA_TARGETS),
                   base_model_name_or_path=engine.config.model).save_pretrained(path)
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in weights.items()},
                  str(path / "adapter_model.safetensors"))
    return paths


def adapter_workload(n: int, length: int, new_tokens: int, adapters: list[str], tokenizer, seed: int,
                     words: bool) -> list[tuple[Item, str]]:
    """n prompts of `length` tokens, each making exactly new_tokens; line i runs adapter i % len(adapters)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if words:
            text = " ".join(f"t{rng.randrange(WORD_VOCAB)}" for _ in range(length))
        else:
            text = tokenizer.decode([rng.randrange(1000, tokenizer.vocab_size - 1000) for _ in range(length)])
        out.append((Item(text, SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)),
                    adapters[i % len(adapters)]))
    return out


def run_engine_adapters(engine: Engine, lines: list[tuple[Item, str | None]]) -> tuple[dict, list[list[int]]]:
    """run_engine, each request naming its adapter (None: the base)."""
    requests = [Request(id=i, prompt=it.text, params=it.params, adapter=a) for i, (it, a) in enumerate(lines)]
    engine.stats = Stats()
    if engine.runner is not None:
        engine.runner.stats = dict.fromkeys(engine.runner.stats, 0)
    results = {}
    t0 = _start(engine.device)
    for batch in engine.generate(requests):
        results.update({r.id: r for r in batch})
    rs = [results[i] for i in range(len(lines))]
    s = engine.stats
    stats = _finish(engine.device, t0, sum(r.usage.prompt_tokens for r in rs), sum(r.usage.completion_tokens for r in rs),
                    s.prefill_slots + s.decode_slots, errors=len([r for r in rs if not r.ok]),
                    error_sample=next((r.error_message for r in rs if not r.ok), None), scheduler=dataclasses.asdict(s),
                    runner=dict(engine.runner.stats) if engine.runner is not None else None)
    return stats, [r.token_ids for r in rs]


@torch.inference_mode()
def run_peft(engine: Engine, lines: list[tuple[Item, str]], batch: int) -> tuple[dict, list[list[int]]]:
    """peft's own generate over the engine's NF4 model: all adapters loaded, run adapter by adapter in
    batches of `batch`, left-padded. The model is unwrapped again afterwards (peft wraps it in place)."""
    from peft import PeftModel

    model, tok, eos = engine.model, engine.tokenizer, engine.eos_ids
    names = {a: f"a{k}" for k, a in enumerate(dict.fromkeys(a for _, a in lines))}
    t_load = time.perf_counter()
    first = next(iter(names))
    pm = PeftModel.from_pretrained(model, first, adapter_name=names[first])
    for a, name in names.items():
        if a != first:
            pm.load_adapter(a, adapter_name=name)
    pm.eval()
    load_s = time.perf_counter() - t_load
    outs: dict[int, list[int]] = {}
    prompt_tokens = computed = batches = 0
    t0 = _start(engine.device)
    for a, name in names.items():
        pm.set_adapter(name)
        idx = [i for i, (_, aa) in enumerate(lines) if aa == a]
        for k in range(0, len(idx), batch):
            chunk = idx[k:k + batch]
            enc = tok([lines[i][0].text for i in chunk], padding=True, return_tensors="pt").to(engine.device)
            n_new = max(lines[i][0].params.max_tokens for i in chunk)
            # No EOS, as the engine's ignore_eos: every row makes n_new tokens (as run_generate).
            seq = pm.generate(**enc, do_sample=False, max_new_tokens=n_new, eos_token_id=None,
                              pad_token_id=tok.pad_token_id)
            width = enc["input_ids"].shape[1]
            for i, row in zip(chunk, seq[:, width:].tolist()):
                outs[i] = useful(row, lines[i][0].params.max_tokens, eos, True)
            prompt_tokens += int(enc["attention_mask"].sum())
            computed += len(chunk) * seq.shape[1]
            batches += 1
    rows = [outs[i] for i in range(len(lines))]
    stats = _finish(engine.device, t0, prompt_tokens, sum(map(len, rows)), computed, batches=batches,
                    adapter_load_s=round(load_s, 2))
    pm.unload()  # give the engine its own modules back
    return stats, rows


def adapters_benchmark(engine: Engine, args, words: bool) -> dict:
    """The base-only engine, the engine with adapters, and peft generate, on the same prompts."""
    out_dir = Path(args.adapter_dir)
    paths = build_random_adapters(engine, out_dir, 4, 16, args.seed)
    lines = adapter_workload(args.prompts, args.adapter_len, args.new_tokens, paths, engine.tokenizer, args.seed, words)
    w: dict = {"prompts": len(lines), "adapters": len(paths), "rank": 16, "prompt_len": args.adapter_len}
    if engine.runner is not None:
        engine.runner.release()  # peft's generate gets the memory
    # peft first: on the CPU, bitsandbytes repacks a 4-bit weight on its first forward, and a model
    # wrapped by peft after the engine has run it computed something else in the smoke run (match 0).
    sub = lines[:args.peft_prompts]
    w["peft"], peft_rows = run_peft(engine, sub, args.batch)
    w["peft"]["prompts"] = len(sub)
    print("peft", w["peft"], flush=True)
    w["engine_base"], _ = run_engine_adapters(engine, [(it, None) for it, _ in lines])
    print("engine_base", w["engine_base"], flush=True)
    w["engine_adapters"], eng_rows = run_engine_adapters(engine, lines)
    print("engine_adapters", w["engine_adapters"], flush=True)
    w["vs_base"] = round(w["engine_adapters"]["output_tok_s"] / w["engine_base"]["output_tok_s"], 3)  # target >= 0.7
    w["vs_peft"] = round(w["engine_adapters"]["output_tok_s"] / w["peft"]["output_tok_s"], 2)  # target >= 8
    w["ratio"] = w["vs_peft"]
    w["match32"] = match_rate(eng_rows[:len(sub)], peft_rows)
    w["prefix32"] = common_prefix(eng_rows[:len(sub)], peft_rows)
    return w


def md_row_adapters(res: dict) -> str:
    w, e = res["workloads"]["adapters"], res["env"]
    b, a, p = w["engine_base"], w["engine_adapters"], w["peft"]
    return (f"| {res['date']} | {e['gpu']} | {res['model']} | adapters ({w['adapters']} x rank {w['rank']}, "
            f"len {w['prompt_len']}) | {w['prompts']} | peft {p['output_tok_s']} ({p['prompts']} prompts) | - | "
            f"{a['output_tok_s']} (base-only {b['output_tok_s']}) | **{w['vs_peft']}x peft, {w['vs_base']}x base** | "
            f"{a['total_tok_s']} | {p['wall_s']} / {a['wall_s']} | {p['peak_reserved_gb']} / {a['peak_reserved_gb']} | "
            f"{p['padding_fraction']} / {a['padding_fraction']} | {w['match32']} | "
            f"torch {e['torch']}, transformers {e['transformers']}, bnb {e['bitsandbytes']} | `{res['command']}` |")


# -- micro-benchmark of one decode step and one prefill --------------------------


@torch.inference_mode()
def timed(fn, reps: int) -> float:
    """ms per call of fn on the GPU: one warm-up call, then reps back to back between two events."""
    fn()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(reps):
        fn()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / reps


def micro(engine: Engine, sizes: list[int], columns: int) -> list[dict]:
    """ms per decode step, eager vs CUDA graph, at several batch sizes (each row `columns` tokens deep);
    prefill tok/s; and the paged kernel against the gather reference on this GPU."""
    from llmbatch.worker.engine import paged

    r, dev = engine.runner, engine.device
    r.allocate(max(sizes), max(sizes) * (-(-columns // 16)) + 64, columns)
    for slot in range(max(sizes)):
        r.reserve(slot, columns)
    rows = []
    r.kv.normal_()
    for B in sizes:
        r.tokens[:B] = torch.randint(0, WORD_VOCAB, (B,), device=dev)
        r.pos[:B] = torch.randint(columns // 4, columns - 1, (B,), device=dev)
        eager = timed(lambda: r._decode(B, columns), 3)
        r.decode(B, columns - 1)  # eager first sight, then capture on the next call
        graph = timed(lambda: r.decode(B, columns - 1), 10)
        rows.append({"batch": B, "columns": columns, "eager_ms": round(eager, 2), "graph_ms": round(graph, 2),
                     "graph_tok_s": round(B / graph * 1000)})
        print(rows[-1], flush=True)
    d = r.dims
    for B in (1, 16, 512):
        q = torch.randn(B, d.q_heads, d.head_dim, device=dev, dtype=engine.dtype)
        lens = torch.randint(1, columns, (B,), device=dev)
        ref, ref_lse = paged.attend_gather(q, r.kv[0, 0], r.kv[0, 1], r.block_table[:B], lens, 0.088, columns)
        got, lse = paged.attend_triton(q, r.kv[0, 0], r.kv[0, 1], r.block_table[:B], lens, 0.088,
                                       paged.splits_for(B, d.kv_heads))
        err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
        ms = timed(lambda: paged.attend_triton(q, r.kv[0, 0], r.kv[0, 1], r.block_table[:B], lens, 0.088,
                                               paged.splits_for(B, d.kv_heads)), 10)
        kv_bytes = int(lens.sum()) * 2 * d.kv_heads * d.head_dim * r.kv.element_size()
        rows.append({"kernel_rows": B, "rel_err_vs_gather": round(err, 5),
                     "lse_max_abs_err": round((lse - ref_lse).abs().max().item(), 5), "ms": round(ms, 3),
                     "kv_gb_s": round(kv_bytes / ms / 1e6)})
        print(rows[-1], flush=True)
    r.release()
    r.allocate(64, 64 * 512 // 16 + 64, 512)
    for slot in range(64):
        r.reserve(slot, 512)
    for k, T in ((16, 512), (32, 512), (64, 512)):
        ids = torch.randint(0, WORD_VOCAB, (k, T), device=dev)
        ms = timed(lambda: r.prefill(0, ids, torch.full((k,), T, device=dev)), 3)
        rows.append({"prefill_rows": k, "prefill_len": T, "ms": round(ms, 1), "prefill_tok_s": round(k * T / ms * 1000)})
        print(rows[-1], flush=True)
    r.release()
    return rows


def check_kernel(engine: Engine) -> dict:
    """The paged kernel against the gather reference on this GPU, bf16 and fp32; stops the run if off."""
    from llmbatch.worker.engine import paged

    d, dev, out = engine.runner.dims, engine.device, {}
    for dtype, tol in ((torch.bfloat16, 2e-2), (torch.float32, 1e-5)):
        k_pool = torch.randn(600, d.kv_heads, 16, d.head_dim, device=dev, dtype=dtype)
        v_pool = torch.randn_like(k_pool)
        for B in (1, 7, 300):
            table = torch.randint(0, 600, (B, 40), device=dev, dtype=torch.int32)  # rows may share blocks
            lens = torch.randint(1, 640, (B,), device=dev)
            q = torch.randn(B, d.q_heads, d.head_dim, device=dev, dtype=dtype)
            ref, ref_lse = paged.attend_gather(q, k_pool, v_pool, table, lens, 0.088, 640)
            got, lse = paged.attend_triton(q, k_pool, v_pool, table, lens, 0.088, paged.splits_for(B, d.kv_heads))
            err = ((got.float() - ref.float()).norm() / ref.float().norm()).item()
            out[f"{str(dtype)[6:]}_rows{B}"] = round(err, 7)
            if not err < tol or not torch.allclose(lse, ref_lse, atol=tol * 10):
                raise SystemExit(f"paged kernel disagrees with the reference: {dtype} rows {B} rel err {err}")
        # The shared-prefix kernel against its reference: 4 prefixes, rows in no order, some with none.
        pk, pv = (torch.randn(4, d.kv_heads, 1100, d.head_dim, device=dev, dtype=dtype) for _ in range(2))
        plens = torch.tensor([1024, 1100, 64, 300], device=dev)
        for B in (5, 300):
            prefix_of = torch.randint(-1, 4, (B,), device=dev)
            q = torch.randn(B, d.q_heads, d.head_dim, device=dev, dtype=dtype)
            ref, ref_lse = paged.attend_prefixes(q, pk, pv, prefix_of, plens, 0.088)
            order, starts = paged.prefix_rows(prefix_of, 4)
            o, lse = paged.attend_prefixes_triton(q, pk, pv, order, starts, plens, 0.088,
                                                  paged.prefix_splits(B, d.q_heads, d.kv_heads))
            got, lse = paged.merge(o, lse, dim=2)
            err = ((got - ref).norm() / ref.norm()).item()
            some = prefix_of >= 0
            out[f"prefix_{str(dtype)[6:]}_rows{B}"] = round(err, 7)
            if not err < tol or not torch.allclose(lse[some], ref_lse[some], atol=tol * 10):
                raise SystemExit(f"prefix kernel disagrees with the reference: {dtype} rows {B} rel err {err}")
    print("kernel check (relative error vs gather):", out, flush=True)
    return out


# -- issue 10 workloads: json (structured outputs) and n4 (n choices) -------------
#
# They compare the engine with itself, not with `generate`, so each returns its own dict:
#   json  1,000 extraction prompts under one five-field json_schema, against the same prompts
#         unconstrained with each row's max_tokens set to its constrained output's length and EOS
#         ignored, so both make exactly the same number of tokens and the difference is the cost of
#         the masks. Target: >= 0.85x, and every stop-finished output validates.
#   n4    250 prompts at n=4 (sampled, EOS ignored), against the same prompts as 1,000 lines.
#         Target: >= 1.0x.
#
# The random model's word tokenizer ("t0".."t127999") cannot spell JSON, so `json` uses the bundled
# SmolLM2 tokenizer: a real byte-level BPE vocabulary (49,152 tokens, as JSON-capable as Llama 3's),
# padded to the model's 128,256 logits (the grammar never allows the ids past it). A real Llama 3
# vocabulary is 2.6x larger, so its per-token mask work is larger too; the CPU fill runs while the
# GPU decodes, which is what this workload measures.

EXTRACTION_SCHEMA = {
    "type": "object",
    "properties": {
        "category": {"enum": ["billing", "technical", "account", "other"]},
        "priority": {"type": "integer", "minimum": 1, "maximum": 5},
        "confidence": {"type": "number", "minimum": 0, "maximum": 1},
        "summary": {"type": "string", "maxLength": 80},
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 20}, "maxItems": 5},
    },
    "required": ["category", "priority", "confidence", "summary", "keywords"],
    "additionalProperties": False,
}
_TICKET_WORDS = ("the invoice was charged twice after I upgraded my plan and now the login page shows an "
                 "error whenever I reset the password from the mobile app please refund the duplicate "
                 "payment and fix access to my account before the renewal date next week thanks").split()


def json_tokenizer(args, engine: Engine):
    """A tokenizer that can spell JSON: the engine's own for a real checkpoint, else SmolLM2's (above)."""
    if not (args.model is None):
        return engine.tokenizer
    from transformers import AutoTokenizer

    if args.json_tokenizer:  # a GPU machine without the bundled model: its tokenizer files, carried
        return AutoTokenizer.from_pretrained(args.json_tokenizer)

    from llmbatch.worker.engine import loading

    path = loading.resolve_checkpoint(EngineConfig(model="smollm2-135m-instruct", cache_dir=args.cache_dir))
    return AutoTokenizer.from_pretrained(path)


def _run_requests(engine: Engine, requests: list[Request]) -> tuple[dict, list]:
    """run_engine for prepared requests; also returns the results (outputs are checked)."""
    engine.stats = Stats()
    results = {}
    t0 = _start(engine.device)
    for batch in engine.generate(requests):
        results.update({r.id: r for r in batch})
    rs = [results[r.id] for r in requests]
    s = engine.stats
    stats = _finish(engine.device, t0, sum(r.usage.prompt_tokens for r in rs), sum(r.usage.completion_tokens for r in rs),
                    s.prefill_slots + s.decode_slots, errors=sum(not r.ok for r in rs),
                    decode_ms_per_step=round(1000 * s.decode_s / max(1, s.steps), 2), steps=s.steps,
                    controls_ms_per_step=round(1000 * s.controls_s / max(1, s.steps), 2),
                    prefill_tokens_computed=s.prefill_tokens)
    return stats, rs


def workload_json(engine: Engine, config: EngineConfig, args) -> dict:
    import jsonschema

    tok = json_tokenizer(args, engine)
    if engine.runner is not None:
        engine.runner.release()
    eng = Engine(config, loaded=(engine.model, tok, engine.device, engine.dtype))  # same weights, JSON tokenizer
    rng = random.Random(args.seed)
    texts = []
    for _ in range(args.prompts):
        length = rng.randint(args.min_len, args.max_len)
        words = " ".join(rng.choice(_TICKET_WORDS) for _ in range(length))
        texts.append(f"Extract the support ticket's category, priority, confidence, summary and keywords as JSON.\n"
                     f"Ticket: {words}\nJSON:")
    schema = json.dumps(EXTRACTION_SCHEMA)  # key order kept: the output's properties follow it
    constrained = [Request(id=i, prompt=t, params=SamplingParams(
        max_tokens=args.new_tokens, response_format="json_schema", json_schema=schema)) for i, t in enumerate(texts)]
    _run_requests(eng, constrained)  # warm-up (graphs, grammar compile) and the lengths to match
    _, first = _run_requests(eng, constrained)
    plain = [Request(id=i, prompt=t, params=SamplingParams(max_tokens=max(1, len(r.token_ids)), ignore_eos=True))
             for i, (t, r) in enumerate(zip(texts, first))]
    out: dict = {"prompts": len(texts), "schema": EXTRACTION_SCHEMA}
    out["unconstrained"], _ = _run_requests(eng, plain)
    print("json unconstrained", out["unconstrained"], flush=True)
    out["constrained"], rs = _run_requests(eng, constrained)
    print("json constrained", out["constrained"], flush=True)
    stopped = [r for r in rs if r.finish_reason == "stop"]
    valid = 0
    for r in stopped:
        try:
            jsonschema.validate(json.loads(r.output), EXTRACTION_SCHEMA)
            valid += 1
        except (ValueError, jsonschema.ValidationError):
            pass
    out.update(stop=len(stopped), length=sum(r.finish_reason == "length" for r in rs), stop_valid=valid,
               ratio=round(out["constrained"]["output_tok_s"] / out["unconstrained"]["output_tok_s"], 3),
               target=0.85, sample_output=stopped[0].output if stopped else (rs[0].output if rs else None))
    if eng.runner is not None:
        eng.runner.release()
    return out


def workload_n4(engine: Engine, config: EngineConfig, args, words: bool) -> dict:
    n_prompts = max(1, args.prompts // 4)
    base = make_workload("fixed", n_prompts, args.min_len, args.max_len, args.new_tokens, engine.tokenizer,
                         args.seed, words)
    sampled = [SamplingParams(max_tokens=args.new_tokens, temperature=1.0, seed=i, ignore_eos=True)
               for i in range(n_prompts)]
    n4 = [Request(id=i, prompt=it.text, params=dataclasses.replace(p, n=4)) for i, (it, p) in enumerate(zip(base, sampled))]
    # The same 1,000 rows as lines: choice c of prompt i with the seed n=4 would give it.
    lines = [Request(id=4 * i + c, prompt=it.text, params=dataclasses.replace(p, n=4).for_choice(c))
             for i, (it, p) in enumerate(zip(base, sampled)) for c in range(4)]
    if engine.runner is not None:
        engine.runner.release()
    out: dict = {"prompts": n_prompts, "rows": len(lines)}
    runs = {"lines": [], "n4": []}
    passes = 1 if args.smoke else 2  # best of two, alternating
    for name, reqs in [("lines", lines), ("n4", n4)] * passes:
        stats, _ = _run_requests(engine, reqs)
        print(f"n4 {name}", stats, flush=True)
        runs[name].append(stats)
    out["lines"] = max(runs["lines"], key=lambda x: x["output_tok_s"])
    out["n4"] = max(runs["n4"], key=lambda x: x["output_tok_s"])
    out.update(ratio=round(out["n4"]["output_tok_s"] / out["lines"]["output_tok_s"], 3), target=1.0)
    return out


def extra_md_row(res: dict, workload: str) -> str:
    w, e = res["workloads"][workload], res["env"]
    ref, mine = ("unconstrained", "constrained") if workload == "json" else ("lines", "n4")
    check = f"stop {w['stop']}, valid {w['stop_valid']}, length {w['length']}" if workload == "json" else \
        f"prefill tokens {w['lines']['prefill_tokens_computed']} / {w['n4']['prefill_tokens_computed']}"
    return (f"| {res['date']} | {e['gpu']} | {res['model']} | {workload} | {w['prompts']} | {ref} {w[ref]['output_tok_s']} | "
            f"{mine} {w[mine]['output_tok_s']} | **{w['ratio']}x** (target {w['target']}x) | "
            f"{w[ref]['decode_ms_per_step']} / {w[mine]['decode_ms_per_step']} | {check} | `{res['command']}` |")


EXTRA_MD_HEADER = ("| date | GPU | model | workload | prompts | reference out tok/s | engine out tok/s | ratio | "
                   "decode ms/step (ref / engine) | check | command |\n|---|---|---|---|---|---|---|---|---|---|---|\n")
EXTRA_WORKLOADS = ("json", "n4")


# -- issue 9 workloads: shared (one 1,024-token prefix) and shared4 (four, interleaved) ------

PREFIX_TOKENS = 1024


def shared_workload(kind: str, n: int, new_tokens: int, tokenizer, seed: int, words: bool,
                    prefix_tokens: int = PREFIX_TOKENS) -> list[Item]:
    """n lines: one shared prefix of prefix_tokens (shared4: four, in turn) plus a unique tail of 16-256
    tokens; new_tokens each, greedy, EOS ignored."""
    rng = random.Random(seed)

    def text(length: int) -> str:
        if words:
            return " ".join(f"t{rng.randrange(WORD_VOCAB)}" for _ in range(length))
        return tokenizer.decode([rng.randrange(1000, tokenizer.vocab_size - 1000) for _ in range(length)])

    prefixes = [text(prefix_tokens) for _ in range(4 if kind == "shared4" else 1)]
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    return [Item(prefixes[i % len(prefixes)] + " " + text(rng.randint(16, 256)), params) for i in range(n)]


def shared_benchmark(engine: Engine, config: EngineConfig, args, kind: str, words: bool) -> dict:
    """Naive generate (batch 64), the engine with sharing off, and with it on, on the same lines."""
    prefix_tokens = PREFIX_TOKENS if not args.smoke else 80
    items = shared_workload(kind, args.prompts, args.new_tokens, engine.tokenizer, args.seed, words, prefix_tokens)
    out: dict = {"prompts": len(items), "prefix_tokens": prefix_tokens}
    loaded = (engine.model, engine.tokenizer, engine.device, engine.dtype)
    if engine.runner is not None:
        engine.runner.release()
    out["baseline"], base_rows = run_generate(engine.model, engine.tokenizer, items[:args.baseline_prompts],
                                              args.batch, engine.eos_ids)
    print("baseline", out["baseline"], flush=True)
    runs = {}
    for name, minimum in (("off", 0), ("on", config.shared_prefix_min or 64)):
        e = Engine(dataclasses.replace(config, shared_prefix_min=minimum), loaded=loaded)
        run_engine(e, items[:16])  # warm-up: graphs for this engine's runner
        out[name], runs[name] = run_engine(e, items)
        out[name]["prompt_tokens_computed"] = e.stats.prefill_tokens
        print(name, out[name], flush=True)
        if e.runner is not None:
            e.runner.release()
    out["on_vs_off"] = round(out["on"]["output_tok_s"] / out["off"]["output_tok_s"], 2)
    out["on_vs_baseline"] = round(out["on"]["output_tok_s"] / out["baseline"]["output_tok_s"], 2)
    out["match32_on_off"] = match_rate(runs["on"], runs["off"])
    if args.fp32_check and engine.device.type == "cuda":
        out["fp32_match32_on_off"] = fp32_shared_match(config, items[:64])
    return out


def fp32_shared_match(config: EngineConfig, items: list[Item]) -> float:
    """Sharing on and off in float32 over the same NF4 weights: the first 32 tokens must agree."""
    f32 = load_engine(dataclasses.replace(config, compute_dtype="float32"))
    loaded = (f32.model, f32.tokenizer, f32.device, f32.dtype)
    rows = []
    for minimum in (0, config.shared_prefix_min or 64):
        e = Engine(dataclasses.replace(f32.config, shared_prefix_min=minimum), loaded=loaded)
        rows.append(run_engine(e, [Item(it.text, dataclasses.replace(it.params, max_tokens=32)) for it in items])[1])
        if e.runner is not None:
            e.runner.release()
    del f32
    torch.cuda.empty_cache()
    return match_rate(rows[0], rows[1])


def shared_md_row(res: dict, workload: str) -> str:
    w, e = res["workloads"][workload], res["env"]
    return (f"| {res['date']} | {e['gpu']} | {res['model']} | {workload} | {w['prompts']} | "
            f"{w['baseline']['output_tok_s']} | {w['off']['output_tok_s']} | {w['on']['output_tok_s']} | "
            f"**{w['on_vs_off']}x** | **{w['on_vs_baseline']}x** | {w['match32_on_off']} / "
            f"{w.get('fp32_match32_on_off', '-')} | {w['off']['peak_reserved_gb']} / {w['on']['peak_reserved_gb']} | "
            f"`{res['command']}` |")


SHARED_WORKLOADS = ("shared", "shared4")
SHARED_MD_HEADER = ("| date | GPU | model | workload | prompts | naive out tok/s | sharing off | sharing on | on / off | "
                    "on / naive | match@32 on vs off (bf16 / fp32) | peak reserved GB (off / on) | command |\n"
                    "|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


# -- main -----------------------------------------------------------------------


def parse_variants(specs: list[str]) -> dict[str, dict]:
    """name=key:value,key:value -> {name: {key: value}} with bools, ints and floats parsed."""
    def value(v: str):
        if v.lower() in ("true", "false"):
            return v.lower() == "true"
        for cast in (int, float):
            try:
                return cast(v)
            except ValueError:
                pass
        return v

    out = {}
    for spec in specs:
        name, _, kvs = spec.partition("=")
        out[name] = {k: value(v) for k, v in (kv.split(":", 1) for kv in kvs.split(",") if kv)}
    return out


def env_info(engine: Engine) -> dict:
    import bitsandbytes
    import transformers

    dev = engine.device
    return {"gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "torch": torch.__version__, "transformers": transformers.__version__,
            "bitsandbytes": bitsandbytes.__version__, "compute_dtype": str(engine.dtype).replace("torch.", ""),
            "model_type": engine.model.config.model_type}


def md_row(res: dict, workload: str) -> str:
    w, e = res["workloads"][workload], res["env"]
    b, g, s = w.get("baseline") or {}, w["engine"], w.get("single") or {}
    ratio = f"**{w['ratio']}x**" if "ratio" in w else "-"
    if "vs_fixed" in w:
        ratio += f" ({w['vs_fixed']}x fixed's engine)"
    if "host_waits" in g:
        ratio += f", {g['host_waits']} host waits"
    return (f"| {res['date']} | {e['gpu']} | {res['model']} | {workload} | {w['prompts']} | {b.get('output_tok_s', '-')} | "
            f"{s.get('output_tok_s', '-')} | {g['output_tok_s']} | {ratio} | {g['total_tok_s']} | "
            f"{b.get('wall_s', '-')} / {g['wall_s']} | {b.get('peak_reserved_gb', '-')} / {g['peak_reserved_gb']} | "
            f"{b.get('padding_fraction', '-')} / {g['padding_fraction']} | {w.get('match32', '-')} | "
            f"torch {e['torch']}, transformers {e['transformers']}, bnb {e['bitsandbytes']} | `{res['command']}` |")


MD_HEADER = ("| date | GPU | model | workload | prompts | baseline out tok/s | single out tok/s | engine out tok/s | "
             "engine/baseline | engine total tok/s | wall s (base / engine) | peak reserved GB (base / engine) | "
             "padding (base / engine) | match@32 | versions | command |\n"
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a checkpoint to use instead of the random Llama-3.1-8B")
    ap.add_argument("--model-dir", default="/tmp/llmbatch-random-llama31-8b", help="where the random model is saved")
    ap.add_argument("--layer-std", type=float, default=0.002, help="init std of the random model's layer matrices")
    ap.add_argument("--cache-dir", help="engine cache_dir (the bundled model's conversion)")
    ap.add_argument("--smoke", action="store_true", help="CPU, bundled small model, a few prompts")
    ap.add_argument("--prompts", type=int, default=1000)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batch", type=int, default=64, help="baseline batch size")
    ap.add_argument("--baseline-prompts", type=int, help="time the baseline on the first N prompts only (its rate is "
                                                          "what is compared; default all)")
    ap.add_argument("--single", type=int, default=16, help="prompts for one-at-a-time (0: skip)")
    ap.add_argument("--workloads", default="fixed,varied")
    ap.add_argument("--variants", nargs="*", default=[], help="engine ablations, name=key:value,key:value")
    ap.add_argument("--variant-workload", default="fixed", choices=WORKLOADS)
    ap.add_argument("--variant-prompts", type=int, help="prompts for the ablations (default --prompts)")
    ap.add_argument("--micro", action="store_true", help="also time one decode step, eager vs graph")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-tokenizer", help="workload json on the random model: a tokenizer directory (default: "
                                                "the bundled SmolLM2's)")
    ap.add_argument("--fp32-check", action="store_true", help="shared workloads: sharing on vs off in float32")
    ap.add_argument("--adapter-dir", default="/tmp/llmbatch-random-adapters", help="workload adapters: where they go")
    ap.add_argument("--adapter-len", type=int, default=256, help="workload adapters: prompt length in tokens")
    ap.add_argument("--peft-prompts", type=int, default=256, help="workload adapters: prompts peft generate runs")
    ap.add_argument("--json-out")
    ap.add_argument("--results-md", help="append a row per workload here (default benchmarks/RESULTS.md, "
                                          "none with --smoke; '' to skip)")
    args = ap.parse_args(argv)
    unknown = [w for w in args.workloads.split(",")
               if w and w not in WORKLOADS + EXTRA_WORKLOADS + SHARED_WORKLOADS + ("adapters",)]
    if unknown:
        ap.error(f"unknown workload(s) {', '.join(unknown)}: choose from "
                 f"{', '.join(WORKLOADS + EXTRA_WORKLOADS + SHARED_WORKLOADS + ('adapters',))}")
    command = "python benchmarks/throughput.py " + " ".join(map(shlex.quote, argv if argv is not None else sys.argv[1:]))
    if args.smoke:
        args.model = args.model or "smollm2-135m-instruct"
        args.prompts, args.min_len, args.max_len, args.new_tokens = min(args.prompts, 6), 8, 40, 8
        args.batch, args.single = 4, min(args.single, 2)
        args.adapter_len, args.peft_prompts = 16, min(args.peft_prompts, 8)
        if args.adapter_dir == ap.get_default("adapter_dir"):
            args.adapter_dir += "-smoke"
    if args.results_md is None and not args.smoke:
        args.results_md = str(Path(__file__).with_name("RESULTS.md"))

    if args.model is None:
        build_random_model(Path(args.model_dir), args.layer_std)
    model_path = args.model or args.model_dir
    t = time.perf_counter()
    config = EngineConfig(model=model_path, cache_dir=args.cache_dir, device="cpu" if args.smoke else "auto")
    engine = load_engine(config)
    print(f"loaded {model_path} in NF4 in {time.perf_counter() - t:.1f}s; slot runner: {engine.runner is not None}")
    words = args.model is None
    res = {"date": datetime.date.today().isoformat(), "command": command, "model": args.model or "random Llama-3.1-8B",
           "env": env_info(engine), "workloads": {}, "variants": {}}
    model, tok, eos = engine.model, engine.tokenizer, engine.eos_ids

    if engine.device.type == "cuda" and engine.runner is not None:
        res["kernel_check"] = check_kernel(engine)
    # Warm-up, untimed: Triton compiles the attention kernel, the first row buckets get their graphs.
    warm = make_workload("fixed", min(64, args.prompts), args.min_len, args.max_len, 4, tok, args.seed + 99, words)
    run_engine(engine, warm)
    for wl in [w for w in args.workloads.split(",") if w]:
        if wl in EXTRA_WORKLOADS:  # issue 10: the engine against itself
            print(f"== {wl}", flush=True)
            res["workloads"][wl] = workload_json(engine, config, args) if wl == "json" else \
                workload_n4(engine, config, args, words)
        elif wl in SHARED_WORKLOADS:  # issue 9: naive, sharing off, sharing on
            print(f"== {wl}: {args.prompts} prompts", flush=True)
            res["workloads"][wl] = shared_benchmark(engine, config, args, wl, words)
        elif wl == "adapters":  # issue 11: contenders of its own
            print(f"== adapters: {args.prompts} prompts", flush=True)
            res["workloads"][wl] = adapters_benchmark(engine, args, words)
        if wl in EXTRA_WORKLOADS + SHARED_WORKLOADS + ("adapters",):
            continue
        items = make_workload(wl, args.prompts, args.min_len, args.max_len, args.new_tokens, tok, args.seed, words)
        out: dict = {"prompts": len(items)}
        print(f"== {wl}: {len(items)} prompts", flush=True)
        base_rows = None
        if wl not in ("mixed", "penalties", "logprobs1") and args.batch:  # judged against the engine on fixed, in the same run
            if engine.runner is not None:
                engine.runner.release()  # the engine keeps its cache between calls; not during others' runs
            out["baseline"], base_rows = run_generate(model, tok, items[:args.baseline_prompts], args.batch, eos)
            print("baseline", out["baseline"], flush=True)
        if args.single and wl == "fixed":
            out["single"], single_rows = run_generate(model, tok, items[:args.single], 1, eos)
            out["single"]["match32_vs_baseline"] = match_rate(single_rows, base_rows)
            out["single"]["prefix32_vs_baseline"] = common_prefix(single_rows, base_rows)
            print("single", out["single"], flush=True)
        out["engine"], eng_rows = run_engine(engine, items)
        print("engine", out["engine"], flush=True)
        if base_rows is not None:
            out["ratio"] = round(out["engine"]["output_tok_s"] / out["baseline"]["output_tok_s"], 2)
            if wl != "sampled":  # sampled draws differ from the baseline's by design
                out["match32"] = match_rate(eng_rows, base_rows)
                out["prefix32"] = common_prefix(eng_rows, base_rows)  # mean leading tokens in agreement
        fixed = res["workloads"].get("fixed", {}).get("engine")
        if fixed and wl != "fixed":
            out["vs_fixed"] = round(out["engine"]["output_tok_s"] / fixed["output_tok_s"], 3)
        if "single" in out:
            out["engine_match32_first_single"] = match_rate(eng_rows[:args.single], base_rows[:args.single])
        res["workloads"][wl] = out

    variants = parse_variants(args.variants)
    if variants:
        items = make_workload(args.variant_workload, args.variant_prompts or args.prompts, args.min_len,
                              args.max_len, args.new_tokens, tok, args.seed, words)
        if "engine" not in res["workloads"].get(args.variant_workload, {}) or len(items) != args.prompts:
            variants = {"engine": {}, **variants}  # the default engine on the same prompts, for reference
        if engine.runner is not None:
            engine.runner.release()
        for name, overrides in variants.items():
            v = Engine(dataclasses.replace(config, **overrides), loaded=(model, tok, engine.device, engine.dtype))
            stats, _ = run_engine(v, items)
            if v.runner is not None:
                v.runner.release()
            stats["overrides"] = overrides
            res["variants"][name] = stats
            print("variant", name, stats, flush=True)

    if args.micro and engine.runner is not None and engine.device.type == "cuda":
        res["micro"] = micro(engine, [64, 128, 256, 384, 512], args.max_len + args.new_tokens)

    # The table, last, so it is what a log's tail shows.
    print(f"\n{res['env']}\n{command}")
    print(f"{'workload':8} {'contender':10} {'out tok/s':>10} {'total tok/s':>11} {'wall s':>8} {'peak GB':>8} {'pad':>6}")
    for wl, w in res["workloads"].items():
        if wl in EXTRA_WORKLOADS:
            print(extra_md_row(res, wl))
            continue
        if wl in SHARED_WORKLOADS:
            print(shared_md_row(res, wl))
            continue
        for name in ("baseline", "single", "engine", "engine_base", "engine_adapters", "peft"):
            if name in w:
                c = w[name]
                print(f"{wl:8} {name:10} {c['output_tok_s']:>10} {c['total_tok_s']:>11} {c['wall_s']:>8} "
                      f"{c['peak_reserved_gb']!s:>8} {c['padding_fraction']:>6}")
        if wl == "adapters":
            print(f"adapters engine_adapters/engine_base {w['vs_base']}x (target 0.7)   engine_adapters/peft "
                  f"{w['vs_peft']}x (target 8)   match@32 vs peft {w['match32']}")
            continue
        print(f"{wl:8} engine/baseline {w.get('ratio', '-')}x  vs fixed's engine {w.get('vs_fixed', '-')}x  "
              f"match@32 {w.get('match32', '-')}  mean agreeing prefix {w.get('prefix32', '-')}  "
              f"batch failures {w['engine']['batch_failures']}"
              + (f"   (generate alone vs batched: match@32 {w['single']['match32_vs_baseline']})" if "single" in w else ""))
    for name, v in res["variants"].items():
        print(f"variant {name:14} {v['output_tok_s']:>10} out tok/s  {v['wall_s']} s  peak {v['peak_reserved_gb']} GB")

    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))
    if args.results_md:
        md = Path(args.results_md)
        rows = "".join((md_row_adapters(res) if wl == "adapters" else md_row(res, wl)) + "\n"
                       for wl in res["workloads"] if wl not in EXTRA_WORKLOADS + SHARED_WORKLOADS)
        existing = md.read_text() if md.exists() else ""
        if rows:
            existing += ("" if MD_HEADER.splitlines()[0] in existing else "\n" + MD_HEADER) + rows
        extra = "".join(extra_md_row(res, wl) + "\n" for wl in res["workloads"] if wl in EXTRA_WORKLOADS)
        if extra:
            existing += ("" if EXTRA_MD_HEADER.splitlines()[0] in existing else "\n" + EXTRA_MD_HEADER) + extra
        shared = "".join(shared_md_row(res, wl) + "\n" for wl in res["workloads"] if wl in SHARED_WORKLOADS)
        if shared:
            existing += ("" if SHARED_MD_HEADER.splitlines()[0] in existing else "\n" + SHARED_MD_HEADER) + shared
        md.write_text(existing)
    return res


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")
    main()
