"""Generation engine: loading, batching and generation. Knows nothing of Celery or the database."""

from .config import EngineConfig
from .types import Request, Result, SamplingParams, Usage

__all__ = ["EngineConfig", "Request", "Result", "SamplingParams", "Usage", "load_engine"]


def load_engine(config: EngineConfig):
    """Import torch and transformers only when a model is really wanted."""
    from .engine import Engine

    return Engine(config)
