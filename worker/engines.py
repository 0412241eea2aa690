"""Which engine a worker runs: the real model (a text model, or an embedding model: issue 21), or
`echo` for orchestration tests and benchmarks."""

from __future__ import annotations

import logging
import os
import warnings

from llmbatch.jobs.settings import Settings


def make_engine(model: str, settings: Settings):
    if settings.engine == "echo":
        from llmbatch.worker.echo import EchoEngine

        return EchoEngine()
    # Progress bars of weight loading, a deprecation notice per forward pass and bitsandbytes'
    # note that an optional CPU kernel package is missing only clutter worker logs.
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore", message=r".*past_key_values.*deprecated", category=FutureWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    from llmbatch.worker.embedder import EmbedderConfig, is_embedding_model, load_embedder
    from llmbatch.worker.engine import EngineConfig, load_engine

    hf_logging.disable_progress_bar()
    if is_embedding_model(model):  # issue 21: a sentence-transformers model serves embedding jobs
        return load_embedder(EmbedderConfig(model=model, token_budget=settings.embed_token_budget))
    config = EngineConfig(model=model, cache_dir=str(settings.model_cache), double_quant=settings.double_quant,
                          shared_prefix_min=settings.shared_prefix_min,
                          max_adapters=settings.max_adapters)
    if settings.max_batch_size:
        config.max_batch_size = settings.max_batch_size
    return load_engine(config)
