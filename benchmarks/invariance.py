"""Batch invariance (issue 22): a seeded line's tokens alone and in a big batch, a row's logits at several
batch sizes, and the mode's cost, on one loaded NF4 model (the random Llama-3.1-8B of throughput.py).

Phases, in this order; the JSON is rewritten after each, so a run cut short keeps what it finished:
  logits  8 rows' logits (prefill and 4 decode steps, graphs included) at batch 1, 37 and 512 (targets
          at scattered slots among random mates, the padded width set by a long mate), invariant and
          default mode: rows bitwise equal to batch 1's. Then the sampler alone on random logits.
  cost    the `fixed` and `sampled` workloads (throughput.py's) in default mode, then invariant mode.
  lines   --lines seeded lines (temperature 1.0, top_p 0.95, --new-tokens) among --mates others, then
          each alone (invariant mode); lines identical. Alone runs stop at --budget-s (the count says).

  python benchmarks/invariance.py --json-out inv.json            # H200, about 7 minutes
  python benchmarks/invariance.py --smoke --json-out /tmp/i.json  # CPU, bundled small model
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import random
import shlex
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from benchmarks.throughput import (WORD_VOCAB, WORKLOADS, build_random_model, env_info,  # noqa: E402
                                   make_workload, run_engine)
from llmbatch.worker.engine import EngineConfig, Request, SamplingParams, invariant, load_engine  # noqa: E402
from llmbatch.worker.engine.engine import Engine  # noqa: E402
from llmbatch.worker.engine.forward import Runner  # noqa: E402


def set_mode(engine: Engine, on: bool) -> None:
    """The loaded model's modules for this mode (CUDA: invariant.use swaps classes; the CPU's mode is the runner's)."""
    if engine.device.type == "cuda":
        invariant.use(engine.model, on)


# Contenders: (name, invariant mode on, how NF4 runs in it: invariant.NF4_PATHS).
MODES = {"default": (False, "dequant"), "invariant": (True, "dequant"), "invariant_kernel": (True, "kernel")}


def mode_engine(base: Engine, on: bool, nf4_path: str = "dequant") -> Engine:
    invariant.NF4_PATH = nf4_path  # read at call time: before the Engine captures its graphs
    set_mode(base, on)
    config = dataclasses.replace(base.config, batch_invariant=on)
    return Engine(config, loaded=(base.model, base.tokenizer, base.device, base.dtype))


# -- logits ---------------------------------------------------------------------------


def run_logits(runner: Runner, prompts: list[list[int]], steps: int) -> torch.Tensor:
    """Prefill prompts into slots 0.. in one chunk, then greedy decode steps -> logits [rows, steps + 1, V]."""
    k = len(prompts)
    runner.reset()
    for j, p in enumerate(prompts):
        assert runner.reserve(j, len(p) + steps + 1)
    width = max(map(len, prompts))
    dev = runner.device
    ids = torch.tensor([p + [0] * (width - len(p)) for p in prompts], device=dev)
    lengths = torch.tensor([len(p) for p in prompts], device=dev)
    # copy=True: on the CPU, float32 logits' .float().cpu() would be the runner's own tensor, not a copy.
    out = [runner.prefill(0, ids, lengths).to("cpu", torch.float32, copy=True)]
    runner.tokens[:k], runner.pos[:k] = out[0].argmax(-1).to(dev), lengths
    for _ in range(steps):
        out.append(runner.decode(k, int(runner.pos[:k].max())).to("cpu", torch.float32, copy=True))
        runner.tokens[:k] = out[-1].argmax(-1).to(dev)
        runner.pos[:k] += 1
    return torch.stack(out, 1)


def logits_phase(engine: Engine, sizes: list[int], targets: int, steps: int, rng: random.Random, vocab: int) -> dict:
    """Per mode: for each batch size, how many target rows' logits (all steps) equal their batch-1 logits."""
    def prompt(n: int) -> list[int]:
        return [rng.randrange(vocab) for _ in range(n)]

    mine = [prompt(rng.randint(16, 96)) for _ in range(targets)]
    mates = [prompt(rng.randint(16, 96)) for _ in range(max(sizes))]
    mates[0] = prompt(160)  # a long mate sets the padded width
    res = {}
    for name in ("invariant", "invariant_kernel", "default"):
        on, invariant.NF4_PATH = MODES[name]
        if name == "invariant_kernel" and engine.device.type != "cuda":
            continue  # the CPU's invariant mode dequantizes anyway
        set_mode(engine, on)
        runner = Runner(engine.model, engine.dtype, engine.config.cuda_graphs, invariant=on)
        runner.allocate(max(sizes), max(sizes) * 12, 256)
        alone = [run_logits(runner, [p], steps)[0] for p in mine]
        got = {}
        for size in sizes:
            if size == 1:
                continue
            slots = sorted(rng.sample(range(size), min(targets, size)))  # scattered, first and last among them
            batch = mates[:size]
            for t, s in enumerate(slots):
                batch = batch[:s] + [mine[t]] + batch[s + 1:]
            out = run_logits(runner, batch, steps)
            same = [torch.equal(out[s], alone[t]) for t, s in enumerate(slots)]
            diff = max((out[s] - alone[t]).abs().max().item() for t, s in enumerate(slots))
            got[size] = {"equal": sum(same), "rows": len(slots), "max_abs_diff": diff}
            print(f"logits {name} batch {size}: {sum(same)}/{len(slots)} bitwise, "
                  f"max diff {diff:.3g}", flush=True)
        runner.release()
        res[name] = got
    invariant.NF4_PATH = "dequant"
    return res


def sampler_phase(device: torch.device, vocab: int, sizes: list[int], rng: random.Random) -> dict:
    """The sampler alone (temperature 1.0, top_p 0.95, a seed a row) on random logits: rows of a batch of
    each size that draw what they draw alone, over 16 positions."""
    from llmbatch.worker.engine.sampling import RowSampling, sample

    torch.manual_seed(rng.randrange(1 << 30))
    B = max(sizes)
    logits = torch.randn(B, vocab, device=device) * 3
    params = [SamplingParams(max_tokens=1, temperature=1.0, top_p=0.95, seed=i) for i in range(B)]
    res = {}
    for size in sizes:
        s = RowSampling.build(params[:size], list(range(size)), device)
        same = 0
        for pos in range(16):
            got = sample(logits[:size], s, torch.full((size,), pos, device=device))
            alone = torch.cat([sample(logits[i:i + 1], RowSampling.build([params[i]], [i], device),
                                      torch.tensor([pos], device=device)) for i in range(min(size, 8))])
            same += int((got[:len(alone)] == alone).sum())
        res[size] = {"equal": same, "draws": 16 * min(size, 8)}
    print(f"sampler: {res}", flush=True)
    return res


# -- lines ----------------------------------------------------------------------------


def lines_phase(engine: Engine, args, tok, words: bool, deadline: float) -> dict:
    mine = make_workload("fixed", args.lines, args.min_len, args.max_len, args.new_tokens, tok, args.seed + 1, words)
    mates = make_workload("sampled", args.mates, args.min_len, args.max_len, args.new_tokens, tok, args.seed + 2, words)
    rng = random.Random(args.seed)
    reqs = [Request(id=f"m{i}", prompt=it.text, params=it.params) for i, it in enumerate(mates)]
    for i, it in enumerate(mine):
        params = SamplingParams(max_tokens=args.new_tokens, temperature=1.0, top_p=0.95, seed=10_000 + i,
                                ignore_eos=True)
        reqs.insert(rng.randrange(len(reqs) + 1), Request(id=f"l{i}", prompt=it.text, params=params))
    t = time.perf_counter()
    together = {r.id: r.token_ids for r in engine.generate_all(reqs) if str(r.id).startswith("l")}
    batched_s = time.perf_counter() - t
    same, done, first_diff = 0, 0, []
    t = time.perf_counter()
    for r in reqs:
        if not str(r.id).startswith("l"):
            continue
        if time.perf_counter() > deadline:
            break
        alone = engine.generate_all([r])[0].token_ids
        done += 1
        same += alone == together[r.id]
        if alone != together[r.id]:
            first_diff.append(next((k for k, (a, b) in enumerate(zip(alone, together[r.id])) if a != b), len(alone)))
    res = {"lines": args.lines, "mates": args.mates, "new_tokens": args.new_tokens, "compared": done,
           "identical": same, "first_divergence": first_diff, "batched_s": round(batched_s, 1),
           "alone_s": round(time.perf_counter() - t, 1)}
    print(f"lines: {same}/{done} identical alone vs among {args.mates} ({args.lines} asked)", flush=True)
    return res


# -- cost -----------------------------------------------------------------------------


def cost_phase(engine: Engine, args, tok, words: bool) -> dict:
    res: dict = {}
    for run in args.cost_workloads.split(","):
        wl = run.split(":")[0]  # "fixed:2": the fixed workload again, kept under its own name
        items = make_workload(wl, args.cost_prompts, args.min_len, args.max_len, args.new_tokens, tok, args.seed, words)
        # As many rows as the timed run (invariant.matmul picks its tile by M), a few tokens each.
        warm = make_workload(wl, args.cost_prompts, args.min_len, args.max_len, 4, tok, args.seed + 1, words)
        res[run] = {}
        for name, (on, path) in MODES.items():
            if name == "invariant_kernel" and engine.device.type != "cuda":
                continue
            e = mode_engine(engine, on, path)
            run_engine(e, warm)  # warm-up: Triton compiles (each tile shape), the first graphs are captured
            stats, _ = run_engine(e, items)
            if e.runner is not None:
                e.runner.release()
            res[run][name] = {k: stats[k] for k in ("wall_s", "output_tok_s", "total_tok_s", "peak_reserved_gb")}
            res[run][name]["runner"] = stats.get("runner")  # capture failures and eager steps among them
        r = res[run]
        r["ratio"] = round(r["invariant"]["output_tok_s"] / r["default"]["output_tok_s"], 3)
        if "invariant_kernel" in r:
            r["ratio_kernel"] = round(r["invariant_kernel"]["output_tok_s"] / r["default"]["output_tok_s"], 3)
        print(f"cost {run}: invariant/default {r['ratio']}x {r}", flush=True)
    invariant.NF4_PATH = "dequant"
    return res


def md(res: dict) -> str:
    lg, ln, c, e = res.get("logits", {}), res.get("lines", {}), res.get("cost", {}), res["env"]
    cells = lambda mode: ", ".join(f"{n}: {v['equal']}/{v['rows']}" for n, v in lg.get(mode, {}).items())  # noqa: E731
    ratio = lambda wl: (f"{c[wl]['invariant']['output_tok_s']} / {c[wl]['default']['output_tok_s']} "  # noqa: E731
                        f"(**{c[wl]['ratio']}×**)") if wl in c else "-"
    lines = f"**{ln['identical']}/{ln['compared']}** (of {ln['lines']}, among {ln['mates']})" if ln else "-"
    return (f"| {res['date']} | {e['gpu']} | {res['model']} | {lines} | {cells('invariant') or '-'} | "
            f"{cells('default') or '-'} | {ratio('fixed')} | {ratio('sampled')} | `{res['command']}` |")


MD_HEADER = ("| date | GPU | model | seeded lines identical alone vs batched | logits rows bitwise = batch 1 "
             "(invariant) | same (default) | `fixed` out tok/s invariant / default | `sampled` | command |\n"
             "|---|---|---|---|---|---|---|---|---|\n")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="a checkpoint instead of the random Llama-3.1-8B")
    ap.add_argument("--model-dir", default="/tmp/llmbatch-random-llama31-8b")
    ap.add_argument("--layer-std", type=float, default=0.002)
    ap.add_argument("--cache-dir")
    ap.add_argument("--smoke", action="store_true", help="CPU, bundled small model, tiny sizes")
    ap.add_argument("--phases", default="logits,cost,lines")
    ap.add_argument("--lines", type=int, default=64)
    ap.add_argument("--mates", type=int, default=1000)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--min-len", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=512)
    ap.add_argument("--cost-workloads", default="fixed,sampled",
                    help="cost: workloads in order; 'fixed:2' runs fixed again under that name")
    ap.add_argument("--cost-prompts", type=int, default=500, help="prompts of each cost workload")
    ap.add_argument("--sizes", default="1,37,512", help="logits: batch sizes")
    ap.add_argument("--budget-s", type=float, default=400, help="alone runs of the lines phase stop this long "
                                                                "after the start")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", required=True)
    ap.add_argument("--results-md", help="append a row here (default benchmarks/RESULTS.md, none with --smoke)")
    args = ap.parse_args(argv)
    runs = args.cost_workloads.split(",")
    bad = [r for r in runs if r.split(":")[0] not in WORKLOADS]
    if bad or len(set(runs)) < len(runs):
        ap.error(f"--cost-workloads: {', '.join(bad) or 'a name twice'}: names from {', '.join(WORKLOADS)}, "
                 "each once ('fixed:2' runs fixed again)")
    start = time.perf_counter()
    argv = argv if argv is not None else sys.argv[1:]
    command = "python benchmarks/invariance.py " + " ".join(map(shlex.quote, argv))
    if args.smoke:
        args.model = args.model or "smollm2-135m-instruct"
        args.lines, args.mates, args.new_tokens = min(args.lines, 4), min(args.mates, 8), min(args.new_tokens, 8)
        args.min_len, args.max_len, args.cost_prompts = 8, 40, min(args.cost_prompts, 6)
        args.sizes = "1,3,8"
        args.budget_s = float("inf")
    if args.results_md is None and not args.smoke:
        args.results_md = str(Path(__file__).with_name("RESULTS.md"))
    if args.model is None:
        build_random_model(Path(args.model_dir), args.layer_std)
    config = EngineConfig(model=args.model or args.model_dir, cache_dir=args.cache_dir,
                          device="cpu" if args.smoke else "auto")
    engine = load_engine(config)  # default mode; each phase sets the modules' mode itself
    words = args.model is None
    vocab = WORD_VOCAB if words else engine.tokenizer.vocab_size
    res = {"date": datetime.date.today().isoformat(), "command": command, "model": args.model or "random Llama-3.1-8B",
           "env": env_info(engine)}
    out = Path(args.json_out)
    phases = [p for p in args.phases.split(",") if p]
    for phase in phases:
        t = time.perf_counter()
        print(f"== {phase}", flush=True)
        if phase == "logits":
            sizes = [int(s) for s in args.sizes.split(",")]
            res["logits"] = logits_phase(engine, sizes, 8, 4, random.Random(args.seed), vocab)
            res["sampler"] = sampler_phase(engine.device, engine.model.config.vocab_size, sizes,
                                           random.Random(args.seed))
        elif phase == "cost":
            res["cost"] = cost_phase(engine, args, engine.tokenizer, words)
        elif phase == "lines":
            res["lines"] = lines_phase(mode_engine(engine, True), args, engine.tokenizer, words,
                                       start + args.budget_s)
        else:
            ap.error(f"unknown phase {phase!r}: logits, cost, lines")
        res.setdefault("phase_s", {})[phase] = round(time.perf_counter() - t, 1)
        out.write_text(json.dumps(res, indent=1))
    res["total_s"] = round(time.perf_counter() - start, 1)
    out.write_text(json.dumps(res, indent=1))
    print(f"\n{md(res)}")
    if args.results_md:
        path = Path(args.results_md)
        text = path.read_text() if path.exists() else ""
        path.write_text(text + ("" if MD_HEADER.splitlines()[0] in text else "\n" + MD_HEADER) + md(res) + "\n")
    return res


if __name__ == "__main__":
    main()
