"""Engine configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class EngineConfig:
    model: str  # a bundled alias, a local path or a hub id
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    compute_dtype: str = "auto"  # auto: bfloat16 on GPUs that have it, float16 on others, float32 on CPU
    double_quant: bool = False
    cache_dir: str | None = None  # where converted checkpoints (the bundled GGUF) are kept
    # Batching: rows per forward pass, and a cap on padded (prompt + new) tokens in one batch.
    # max_batch_tokens=0 derives the cap from free GPU memory and the KV cache bytes per token.
    max_batch_size: int = 64
    max_batch_tokens: int = 0
    # Test hook: pretend the device runs out of memory for batches bigger than this.
    oom_above_batch: int | None = None
