"""Embedding throughput (issue 21): llmbatch's embedder against SentenceTransformer.encode, same run.

For each model, the same texts (16-512 tokens, uniformly spread) are embedded twice, in the same
dtype on the same device:

  baseline   SentenceTransformer.encode(texts, batch_size=64)  (it sorts by length itself)
  llmbatch   worker/embedder.Embedder.embed, one request per text: tokenized once, sorted by
             length, batched by a token budget, unpadded (varlen) attention on CUDA for BERT models

Models: all-MiniLM-L6-v2 (the bundled folder; context raised to 512 for both sides) and a
bge-base-sized BERT (12 layers, 768 wide, CLS pooling + normalize) with random weights. Reported:
texts/s of each, the speed-up, and the lowest cosine between the two sides' vectors.

  python benchmarks/embed.py                    # 100,000 texts, CUDA, float16; records RESULTS.md
  python benchmarks/embed.py --smoke            # 300 short texts, tiny models, CPU, float32; no record
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS_MD = ROOT / "benchmarks" / "RESULTS.md"
SECTION = "## Embeddings (issue 21)"

# Everyday words that are one WordPiece token each in BERT's uncased vocabulary, so a text of N
# words is N + 2 tokens ([CLS] ... [SEP]).
WORDS = ("the of and to in is was for on as with by he at from his an were are which this also be had or has "
         "its first their new after who they two her she been other when there all during into school time may "
         "years more most only over city some world would where later up such used many can state about national "
         "out known university united then made through under team while film group year season three part "
         "water light river mountain bread music history people book house road war music game field power "
         "music small large early north south east west king church family life work name series government").split()


def make_texts(n: int, lo: int, hi: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(lo, hi) - 2)) for _ in range(n)]


def bge_sized_folder(out: Path, tokenizer_dir: Path, smoke: bool) -> Path:
    """A sentence-transformers folder: a random-weight BERT of bge-base's shape, CLS pooling, normalize."""
    import torch
    from sentence_transformers import SentenceTransformer, models
    from transformers import AutoTokenizer, BertConfig, BertModel

    torch.manual_seed(0)
    shape = (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128) if smoke
             else dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072))
    hf = out / "hf"
    BertModel(BertConfig(vocab_size=30522, max_position_embeddings=512, **shape)).save_pretrained(hf)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(hf)
    transformer = models.Transformer(str(hf), max_seq_length=512)
    pooling = models.Pooling(shape["hidden_size"], pooling_mode="cls")
    SentenceTransformer(modules=[transformer, pooling, models.Normalize()], device="cpu").save(str(out / "st"))
    return out / "st"


def bench_model(name: str, path: str, texts: list[str], device: str, dtype: str, budget: int) -> dict:
    import numpy as np
    import torch
    from sentence_transformers import SentenceTransformer

    from llmbatch.worker.embedder import EmbedderConfig, EmbedRequest, load_embedder

    def sync():
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    st = SentenceTransformer(path, device=device, model_kwargs={"dtype": getattr(torch, dtype)})
    st.max_seq_length = 512
    st.encode(texts[:256], batch_size=64)  # warm-up: kernels, allocator
    sync()
    t0 = time.perf_counter()
    reference = st.encode(texts, batch_size=64, convert_to_numpy=True)
    sync()
    t_st = time.perf_counter() - t0
    del st
    if device.startswith("cuda"):
        torch.cuda.empty_cache()

    embedder = load_embedder(EmbedderConfig(model=path, device=device, dtype=dtype, token_budget=budget,
                                            max_seq_length=512))
    list(embedder.embed([EmbedRequest(i, [t]) for i, t in enumerate(texts[:256])]))  # warm-up
    sync()
    t0 = time.perf_counter()
    results = [r for batch in embedder.embed([EmbedRequest(i, [t]) for i, t in enumerate(texts)]) for r in batch]
    sync()
    t_ours = time.perf_counter() - t0
    failed = [r for r in results if not r.ok]
    if failed:
        raise SystemExit(f"{name}: {len(failed)} texts failed, e.g. {failed[0].error_message}")
    ours = np.concatenate([r.vectors for r in sorted(results, key=lambda r: r.id)])
    cos = (ours * reference).sum(1) / np.linalg.norm(ours, axis=1) / np.linalg.norm(reference, axis=1)
    tokens = sum(r.usage.prompt_tokens for r in results)
    return {"model": name, "texts": len(texts), "tokens": tokens, "st_s": t_st, "ours_s": t_ours,
            "st_texts_per_s": len(texts) / t_st, "ours_texts_per_s": len(texts) / t_ours,
            "speedup": t_st / t_ours, "min_cosine": float(cos.min()), "path": "varlen" if embedder.varlen else "padded",
            "budget": embedder.budget}


def markdown(rows: list[dict], args, device_name: str) -> str:
    lines = [SECTION, "",
             f"{rows[0]['texts']:,} texts of {args.min_tokens}-{args.max_tokens} tokens, {args.dtype} on "
             f"{device_name}; SentenceTransformer.encode(batch_size=64) against llmbatch's embedder "
             f"(token budget {rows[0]['budget']:,}), same run, same dtype; {datetime.date.today()}.",
             f"`python benchmarks/embed.py {' '.join(sys.argv[1:])}`".replace("  ", " "), "",
             "| model | tokens | ST encode texts/s | llmbatch texts/s | speed-up | path | min cosine |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['tokens']:,} | {r['st_texts_per_s']:,.0f} | {r['ours_texts_per_s']:,.0f} | "
                     f"{r['speedup']:.2f}x | {r['path']} | {r['min_cosine']:.5f} |")
    return "\n".join(lines) + "\n"


def record(section: str) -> None:
    text = RESULTS_MD.read_text()
    start = text.find(SECTION + "\n")
    if start >= 0:
        end = text.find("\n## ", start + len(SECTION))
        text = text[:start] + section + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip("\n") + "\n\n" + section
    RESULTS_MD.write_text(text)


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="300 texts of 16-96 tokens, tiny models, CPU, float32")
    ap.add_argument("--texts", type=int, default=None, help="default 100,000 (300 with --smoke)")
    ap.add_argument("--min-tokens", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--budget", type=int, default=0, help="llmbatch's tokens per forward pass (0: its default)")
    ap.add_argument("--models", default="minilm,bge-base")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json-out", type=Path)
    ap.add_argument("--no-record", action="store_true")
    args = ap.parse_args(argv)
    if args.smoke:
        args.max_tokens, args.device, args.dtype, args.no_record = 96, "cpu", "float32", True
    args.texts = args.texts or (300 if args.smoke else 100_000)
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    sys.path.insert(0, str(ROOT))

    import torch

    from llmbatch.worker.embedder import resolve_model

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --smoke (CPU) or --device cpu")
    texts = make_texts(args.texts, args.min_tokens, args.max_tokens, args.seed)
    minilm = resolve_model("all-minilm-l6-v2")
    rows = []
    with tempfile.TemporaryDirectory(prefix="llmbatch-embed-bench-") as tmp:
        for name in args.models.split(","):
            if name == "minilm":
                rows.append(bench_model("all-MiniLM-L6-v2", minilm, texts, args.device, args.dtype, args.budget))
            elif name == "bge-base":
                path = bge_sized_folder(Path(tmp) / "bge", Path(minilm), args.smoke)
                label = "BERT tiny (random)" if args.smoke else "bge-base-sized BERT (random)"
                rows.append(bench_model(label, str(path), texts, args.device, args.dtype, args.budget))
            else:
                raise SystemExit(f"unknown model {name!r}: expected minilm or bge-base")
            print(json.dumps(rows[-1]), file=sys.stderr)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else f"CPU ({os.cpu_count()} cores)"
    section = markdown(rows, args, f"{device_name}, {platform.node()}")
    print(section)
    if args.json_out:
        args.json_out.write_text(json.dumps(rows, indent=2))
    if not args.no_record:
        record(section)
    return rows


if __name__ == "__main__":
    main()
