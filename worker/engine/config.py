"""Engine configuration."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


def env_flag(name: str) -> bool:
    """A boolean environment variable: unset or empty is off; anything but 0/1/true/false/yes/no fails."""
    raw = (os.environ.get(name) or "").strip().lower()
    if raw in ("", "0", "false", "no", "off"):
        return False
    if raw in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{name}={os.environ[name]!r}: use 1 (on) or 0 (off)")


@dataclass
class EngineConfig:
    model: str  # a bundled alias, a local path or a hub id
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compute_dtype: str = "auto"  # auto: bfloat16 on GPUs that have it, float16 on others, float32 on CPU
    double_quant: bool = False
    # Who multiplies by the NF4 weights on CUDA: "auto" (the default: our CUDA kernel, nf4_mma.py, at 1-64
    # rows, or our Triton kernel, nf4.py, at 2-64 where that one fails to build; bitsandbytes above), "bnb"
    # (bitsandbytes, the reference; always the CPU path), "cuda" or "triton" (that kernel at every row count:
    # batch-invariant, slower above 64 rows). On an H200 auto (then CUDA at 1-32 rows only) ran `mixed`
    # 1.63x bnb with the same tokens (benchmarks/RESULTS.md, issue 18).
    nf4_kernel: str = field(default_factory=lambda: os.environ.get("LLMBATCH_NF4_KERNEL") or "auto")
    # Batch-invariant mode (issue 22): a row's logits, hence a seeded line's tokens, are bitwise the same
    # whatever its batch mates, slot and the batch's padded width (README, "Reproducibility"). It
    # forces shared_prefix_min=0 (a shared prefix is computed apart from the rest of the prompt, which a
    # line alone never is). Off by default: on an H200 it runs at 0.71-0.76x the default mode.
    batch_invariant: bool = field(default_factory=lambda: env_flag("LLMBATCH_BATCH_INVARIANT"))
    cache_dir: str | None = None  # where converted checkpoints (the bundled GGUF) are kept
    # Batching. Rows decode together in "slots" of a KV cache sized slots x (longest prompt + max_tokens).
    # max_batch_size caps the slots; max_batch_tokens caps slots x columns, and 0 derives it from
    # kv_memory_fraction of the free GPU memory over the KV cache bytes per token.
    max_batch_size: int = 512
    max_batch_tokens: int = 0
    kv_memory_fraction: float = 0.6
    prefill_tokens: int = 16384  # padded prompt tokens per prefill forward
    refill_fraction: float = 0.125  # refill once this share of slots is free (1.0: static batches)
    cuda_graphs: bool = True  # capture the decode step per (rows, columns) bucket; CUDA only
    flush_seconds: float = 1.0  # yield finished results at least this often
    # Prompts sharing at least this many leading tokens share their prefill and KV (0: off); the
    # runner stores up to prefix_slots such prefixes at once, each up to prefix_max_len tokens.
    shared_prefix_min: int = 64
    prefix_slots: int = 4
    prefix_max_len: int = 2048
    # Rows with frequency/presence/repetition penalties decoding at once; their tables (5 bytes x vocab
    # each: 0.6 MB at 128k) are reserved out of the KV budget. More such rows wait for a free table.
    # 0: one per slot (max_batch_size), so a job whose every line has a penalty still fills the batch;
    # at 512 slots and a 128k vocabulary that is 328 MB, about 0.4% of an 8B model's KV cache on an H200.
    penalty_rows: int = 0
    max_adapters: int = 16  # LoRA adapters held at once (LRU); their stacks are allocated at this capacity
    # Test hook: pretend the device runs out of memory for batches bigger than this.
    oom_above_batch: int | None = None

    def __post_init__(self):
        if self.batch_invariant:
            self.shared_prefix_min = 0  # NF4 runs through invariant.py's own path, whatever nf4_kernel says
