"""Which engine a worker runs: the real model, or `echo` for orchestration tests and benchmarks."""

from __future__ import annotations

import os


def make_engine(model: str, kind: str = "model"):
    if kind == "echo":
        from worker.echo import EchoEngine

        return EchoEngine()
    # Progress bars of weight loading only clutter worker logs.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    from worker.engine import EngineConfig, load_engine

    hf_logging.disable_progress_bar()

    return load_engine(EngineConfig(model=model, cache_dir=os.environ.get("LLMBATCH_MODEL_CACHE")))
