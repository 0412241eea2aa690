"""The embedding engine (issue 21): a sentence-transformers model, batched by a token budget.

sentence-transformers loads the model and reads its pooling, normalization and dense layers; this
module only decides what runs together and how. Inputs are tokenized once, sorted by length and
cut into batches whose token count (padded, or unpadded on the varlen path) stays under a budget,
so a batch of short texts holds many rows and a batch of long ones few.

Two forward paths, one result:
- padded: the model's own modules (`SentenceTransformer.forward`) on a length-sorted padded batch.
  Used on the CPU, and for every architecture the varlen path does not know.
- varlen (CUDA, BERT family with mean or CLS pooling): the rows of a batch are packed into one
  sequence with no padding at all and attention runs per row through
  torch.nn.attention.varlen.varlen_attn (FlashAttention's varlen kernel); pooling then takes each
  row's segment. The encoder's own weights and the model's own later modules (Dense, Normalize)
  are used, so the vectors equal the padded path's up to rounding.

Decoder embedding models (Qwen3-Embedding and other last-token-pooling models) load through
sentence-transformers too and run on the padded path in fp16/bf16; the NF4 path of the text
engine is not used for them (see README, "Embeddings").

The engine knows nothing of Celery or the database: requests in, results out, like the text engine.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import numpy as np
import torch

from llmbatch.worker.engine.types import Usage

log = logging.getLogger(__name__)


@dataclass
class EmbedderConfig:
    model: str  # a sentence-transformers folder, a bundled alias (jobs/embeddings.BUNDLED) or a hub id
    device: str = "auto"
    dtype: str = "auto"  # auto: float16 on CUDA, float32 on the CPU
    token_budget: int = 0  # tokens per forward pass; 0: 65,536 on CUDA, 8,192 on the CPU
    varlen: bool = True  # the unpadded path where it applies (CUDA, BERT family)
    max_seq_length: int | None = None  # override the model's context (benchmarks)
    pool_tokens: int = 0  # tokens gathered across requests before one sort-and-batch round; 0: 8 budgets


@dataclass
class EmbedRequest:
    id: Any  # the caller's key, handed back on the result
    inputs: list  # strings, or token-id lists (the model's special tokens are added around them)
    dimensions: int | None = None  # Matryoshka: keep the first N and renormalize


@dataclass
class EmbedResult:
    id: Any
    vectors: np.ndarray | None = None  # [n_inputs, dim] float32
    usage: Usage = field(default_factory=Usage)  # prompt_tokens: every input's tokens, special tokens included
    error_code: str | None = None
    error_message: str | None = None
    started_at: float = 0.0
    finished_at: float = 0.0
    warning: str | None = None

    @property
    def ok(self) -> bool:
        return self.error_code is None


def truncate(vectors: torch.Tensor, dimensions: int | None) -> torch.Tensor:
    """Matryoshka `dimensions`, as OpenAI does it: keep the first N values, then renormalize (L2)."""
    if dimensions is None or dimensions >= vectors.shape[-1]:
        return vectors
    return torch.nn.functional.normalize(vectors[..., :dimensions].float(), dim=-1)


def truncate_np(vectors: np.ndarray, dimensions: int | None) -> np.ndarray:
    """truncate() for a numpy [n, dim] array."""
    if dimensions is None or dimensions >= vectors.shape[-1]:
        return vectors
    cut = vectors[..., :dimensions]
    return (cut / np.linalg.norm(cut, axis=-1, keepdims=True)).astype(np.float32)


def token_batches(lengths: list[int], budget: int, padded: bool) -> list[list[int]]:
    """Cut indices, longest first, into batches of at most `budget` tokens: padded counts rows x
    the longest row (what a padded batch costs), unpadded counts the tokens themselves."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    current: list[int] = []
    cost = 0
    for i in order:
        n = lengths[i]
        new_cost = (len(current) + 1) * lengths[current[0]] if padded and current else cost + n
        if current and new_cost > budget:
            batches.append(current)
            current, new_cost = [], n
        current.append(i)
        cost = new_cost
    if current:
        batches.append(current)
    return batches


class Embedder:
    """Embeds EmbedRequests; `embed` streams results request pool by request pool."""

    def __init__(self, model, config: EmbedderConfig):
        self.st = model  # a SentenceTransformer
        self.config = config
        self.device = next(model.parameters()).device
        first = model[0]
        self.tokenizer = first.tokenizer
        self.lower = bool(getattr(first, "do_lower_case", False))
        self.max_tokens = config.max_seq_length or model.max_seq_length
        dim_of = getattr(model, "get_embedding_dimension", None) or model.get_sentence_embedding_dimension
        self.dim = dim_of()
        self.prefix, self.suffix = _special_tokens(self.tokenizer)
        self.budget = config.token_budget or (65536 if self.device.type == "cuda" else 8192)
        self.type_ids = "token_type_ids" in self.tokenizer.model_input_names
        self.varlen = config.varlen and self.device.type == "cuda" and _varlen_ok(model)
        log.info("embedder %s: %d dimensions, context %d, budget %d tokens, %s path, %s", config.model, self.dim,
                 self.max_tokens, self.budget, "varlen" if self.varlen else "padded",
                 next(model.parameters()).dtype)

    # ---- tokens -------------------------------------------------------------------------

    def tokenize(self, inputs: list) -> list[list[int]]:
        """Token ids with the model's special tokens, never truncated (an input over the context
        fails its line instead of being cut silently)."""
        texts = [x for x in inputs if isinstance(x, str)]
        if self.lower:
            texts = [t.lower() for t in texts]
        encoded = iter(self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
                       if texts else [])
        vocab = len(self.tokenizer)
        out = []
        for x in inputs:
            if isinstance(x, str):
                out.append(next(encoded))
                continue
            bad = next((t for t in x if t >= vocab), None)
            if bad is not None:
                raise ValueError(f"token id {bad} is outside the model's vocabulary of {vocab}")
            out.append(self.prefix + list(x) + self.suffix)
        return out

    # ---- forward ------------------------------------------------------------------------

    @torch.inference_mode()
    def encode_ids(self, ids: list[list[int]]) -> torch.Tensor:
        """[n, dim] float32 on the CPU, in the order given; sorted and batched by the token budget."""
        # Kept on the device until the end: a copy per batch would make the GPU wait on the host each time.
        out = torch.empty(len(ids), self.dim, dtype=torch.float32, device=self.device)
        lengths = [len(x) for x in ids]
        batches = token_batches(lengths, self.budget, padded=not self.varlen)
        for batch in batches:
            rows = [ids[i] for i in batch]
            if self.varlen:
                try:
                    vecs = self._forward_varlen(rows)
                except (RuntimeError, NotImplementedError) as exc:
                    if isinstance(exc, torch.OutOfMemoryError):
                        raise
                    # A kernel this GPU or build lacks: the padded path gives the same vectors.
                    log.warning("varlen attention failed (%s: %s); using the padded path", type(exc).__name__, exc)
                    self.varlen = False
                    return self.encode_ids(ids)
            else:
                vecs = self._forward_padded(rows)
            out[torch.tensor(batch, device=self.device)] = vecs.float()
        return out.cpu()

    def _forward_padded(self, rows: list[list[int]]) -> torch.Tensor:
        longest = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id or 0
        input_ids = torch.full((len(rows), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for j, r in enumerate(rows):
            input_ids[j, :len(r)] = torch.tensor(r)
            mask[j, :len(r)] = 1
        features = {"input_ids": input_ids.to(self.device), "attention_mask": mask.to(self.device)}
        if self.type_ids:
            features["token_type_ids"] = torch.zeros_like(features["input_ids"])
        return self.st.forward(features)["sentence_embedding"]

    def _forward_varlen(self, rows: list[list[int]]) -> torch.Tensor:
        lengths = [len(r) for r in rows]
        total = sum(lengths)
        flat = torch.from_numpy(np.fromiter(itertools.chain.from_iterable(rows), dtype=np.int64, count=total))
        cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(torch.tensor(lengths), 0)
        flat, cu_dev = flat.to(self.device, non_blocking=True), cu.to(self.device, non_blocking=True)
        lens = torch.tensor(lengths, device=self.device)
        # Row of each packed token, and its position within the row: [N]. output_size keeps the host
        # from waiting on the GPU to learn N.
        seg = torch.repeat_interleave(torch.arange(len(rows), device=self.device), lens, output_size=total)
        positions = torch.arange(total, device=self.device) - cu_dev[:-1].long()[seg]
        hidden = bert_varlen(self.st[0].model, flat, positions, cu_dev, max(lengths))  # [N, H]
        mode = self.st[1].pooling_mode
        if mode == "cls":
            pooled = hidden[cu_dev[:-1].long()]
        else:  # mean over each row's segment
            pooled = torch.zeros(len(rows), hidden.shape[-1], dtype=torch.float32, device=self.device)
            pooled.index_add_(0, seg, hidden.float())
            pooled /= lens.float()[:, None]
        features = {"sentence_embedding": pooled.to(hidden.dtype)}
        for module in list(self.st)[2:]:  # Dense, Normalize: the model's own, after pooling
            features = module(features)
        return features["sentence_embedding"]

    # ---- requests -----------------------------------------------------------------------

    def _prepare(self, pool: list[EmbedRequest]) -> tuple[dict[int, EmbedResult], list[tuple[int, list[list[int]]]]]:
        """Tokenize a pool and refuse what cannot run: (failed results by position, [(position, ids)]).

        All of the pool's texts go to the tokenizer in one call: the fast tokenizer spreads a batch over
        every core, while a call per request runs on one (on an H200 that made tokenizing, not the GPU,
        the embedder's bottleneck: 0.8x SentenceTransformer.encode)."""
        texts = [x for req in pool for x in req.inputs if isinstance(x, str)]
        if self.lower:
            texts = [t.lower() for t in texts]
        encoded = iter(self.tokenizer(texts, add_special_tokens=True, truncation=False, verbose=False)["input_ids"]
                       if texts else [])
        failed: dict[int, EmbedResult] = {}
        wanted: list[tuple[int, list[list[int]]]] = []
        for k, req in enumerate(pool):
            mine = [next(encoded) if isinstance(x, str) else None for x in req.inputs]  # keeps `encoded` in step
            try:
                ids = self.tokenize([x for x in req.inputs if not isinstance(x, str)])
            except Exception as exc:  # a token id outside the vocabulary, say
                failed[k] = EmbedResult(req.id, usage=Usage(), error_code="invalid_request",
                                        error_message=f"cannot tokenize the input: {exc}")
                continue
            ids_iter = iter(ids)
            ids = [m if m is not None else next(ids_iter) for m in mine]
            over = next((i for i, x in enumerate(ids) if len(x) > self.max_tokens), None)
            if over is not None:
                failed[k] = EmbedResult(
                    req.id, usage=Usage(), error_code="context_length_exceeded",
                    error_message=f"input {over} has {len(ids[over])} tokens, over the model's context of "
                                  f"{self.max_tokens} tokens")
            elif req.dimensions is not None and req.dimensions > self.dim:
                failed[k] = EmbedResult(
                    req.id, usage=Usage(), error_code="invalid_request",
                    error_message=f"'dimensions' is {req.dimensions}, but the model gives {self.dim}-dimension vectors")
            else:
                wanted.append((k, ids))
        return failed, wanted

    def _run_pool(self, pool: list[EmbedRequest], prepared=None) -> list[EmbedResult]:
        started = time.time()
        results, wanted = prepared if prepared is not None else self._prepare(pool)
        flat = [x for _, ids in wanted for x in ids]
        vectors = self._encode_with_retry(flat) if flat else torch.empty(0, self.dim)
        at = 0
        for k, ids in wanted:
            req = pool[k]
            v = truncate(vectors[at:at + len(ids)], req.dimensions)
            at += len(ids)
            results[k] = EmbedResult(req.id, vectors=v.numpy().astype(np.float32, copy=False),
                                     usage=Usage(prompt_tokens=sum(len(x) for x in ids)))
        finished = time.time()
        out = [results[k] for k in range(len(pool))]
        for r in out:
            r.started_at, r.finished_at = started, finished
        return out

    def _encode_with_retry(self, ids: list[list[int]]) -> torch.Tensor:
        """Out of GPU memory halves the token budget and tries again (it stays halved)."""
        while True:
            try:
                return self.encode_ids(ids)
            except torch.OutOfMemoryError:
                if self.budget <= max(len(x) for x in ids):
                    raise
                torch.cuda.empty_cache()
                self.budget //= 2
                log.warning("out of memory: token budget now %d", self.budget)

    def embed(self, requests: list[EmbedRequest],
              more: Callable[[], list[EmbedRequest]] | None = None) -> Iterator[list[EmbedResult]]:
        """Yield results a pool at a time: requests are gathered up to `pool_tokens` (roughly, by
        characters and ids), so sorting by length spans many requests; `more` refills the queue.
        The next pool is tokenized on a second thread while this one runs (the tokenizer releases
        the GIL), so the GPU does not wait for the CPU between pools."""
        pool_tokens = self.config.pool_tokens or 8 * self.budget
        queue = deque(requests)  # popleft: a list's pop(0) is O(n), quadratic over a 100k-request call

        def next_pool() -> list[EmbedRequest]:
            nonlocal more
            while more is not None and _size(queue) < pool_tokens:
                fresh = more()
                queue.extend(fresh)
                more = more if fresh else None
            pool, size = [], 0
            while queue and (not pool or size < pool_tokens):
                req = queue.popleft()
                pool.append(req)
                size += _request_size(req)
            return pool

        with ThreadPoolExecutor(1, thread_name_prefix="tokenize") as ahead:
            pool = next_pool()
            prepared = ahead.submit(self._prepare, pool) if pool else None
            while pool:
                ready = prepared.result()
                upcoming = next_pool()
                prepared = ahead.submit(self._prepare, upcoming) if upcoming else None
                yield self._run_pool(pool, ready)
                pool = upcoming

    def generate(self, requests, more=None):
        raise RuntimeError(f"this worker holds the embedding model {self.config.model!r}; it cannot generate "
                           "text (a text job's chunk reached an embedding worker)")


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text ([CLS] and [SEP] for BERT), found by
    tokenizing one word with and without them: token-id inputs get the same wrapping as text."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


def _request_size(req: EmbedRequest) -> int:
    # Cheap token estimate before tokenizing: ~4 characters a token.
    return sum(len(x) // 4 + 2 if isinstance(x, str) else len(x) + 2 for x in req.inputs)


def _size(queue) -> int:
    return sum(_request_size(r) for r in queue)


# ---- the unpadded BERT encoder ---------------------------------------------------------------


def _varlen_ok(model) -> bool:
    """The varlen path knows BERT with absolute positions, mean or CLS pooling."""
    try:
        from torch.nn.attention.varlen import varlen_attn  # noqa: F401
    except ImportError:
        return False
    modules = list(model)
    if len(modules) < 2 or type(modules[1]).__name__ != "Pooling" or modules[1].pooling_mode not in ("mean", "cls"):
        return False
    if not getattr(modules[1], "include_prompt", True):
        return False
    cfg = modules[0].model.config
    return cfg.model_type == "bert" and getattr(cfg, "position_embedding_type", "absolute") == "absolute"


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
    """q, k, v: [N, heads, head_dim] of packed rows; cu: [rows + 1] int32 offsets. -> [N, heads, head_dim]."""
    if q.is_cuda:
        from torch.nn.attention.varlen import varlen_attn

        return varlen_attn(q, k, v, cu, cu, max_len, max_len)
    # The CPU (tests): the same maths, one row at a time.
    out = torch.empty_like(q)
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(
            q[a:b].transpose(0, 1), k[a:b].transpose(0, 1), v[a:b].transpose(0, 1)).transpose(0, 1)
    return out


def bert_varlen(bert, ids: torch.Tensor, positions: torch.Tensor, cu: torch.Tensor, max_len: int) -> torch.Tensor:
    """transformers' BertModel forward over packed rows, with no padding: ids, positions [N] -> [N, hidden].

    Written against BertModel's module names (embeddings.word_embeddings, encoder.layer[i].attention.
    self.query, ...); dropout is off at inference, so it is left out.
    """
    emb = bert.embeddings
    x = emb.word_embeddings(ids) + emb.position_embeddings(positions) + emb.token_type_embeddings(torch.zeros_like(ids))
    x = emb.LayerNorm(x)
    heads = bert.config.num_attention_heads
    head_dim = bert.config.hidden_size // heads
    n = ids.shape[0]
    for layer in bert.encoder.layer:
        att = layer.attention
        q = att.self.query(x).view(n, heads, head_dim)
        k = att.self.key(x).view(n, heads, head_dim)
        v = att.self.value(x).view(n, heads, head_dim)
        a = _attend(q, k, v, cu, max_len).reshape(n, heads * head_dim)
        x = att.output.LayerNorm(att.output.dense(a) + x)
        h = layer.intermediate(x)
        x = layer.output.LayerNorm(layer.output.dense(h) + x)
    return x


# ---- loading ---------------------------------------------------------------------------------


def resolve_model(model: str) -> str:
    """A bundled alias -> its folder; anything else as given (a folder, or a hub id)."""
    from llmbatch.jobs.embeddings import model_dir

    path = model_dir(model)
    return str(path) if path is not None else model


def is_embedding_model(model: str) -> bool:
    """A sentence-transformers model: a bundled alias, a local folder, or a hub id whose cached
    snapshot has modules.json (never a download just to ask)."""
    from llmbatch.jobs.embeddings import BUNDLED, model_dir

    if model in BUNDLED or model_dir(model) is not None:
        return True
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model, "modules.json"), str)
    except Exception:  # not a repo id at all
        return False


def load_embedder(config: EmbedderConfig) -> Embedder:
    from sentence_transformers import SentenceTransformer

    device = config.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = config.dtype
    if dtype == "auto":
        dtype = "float16" if device.startswith("cuda") else "float32"
    model = SentenceTransformer(resolve_model(config.model), device=device,
                                model_kwargs={"dtype": getattr(torch, dtype)})
    model.eval()
    if config.max_seq_length:
        model.max_seq_length = config.max_seq_length
    return Embedder(model, config)


def to_embed_request(item_id: Any, request: dict) -> EmbedRequest:
    return EmbedRequest(id=item_id, inputs=request["input"], dimensions=request.get("dimensions"))


def embed_item_result(r: EmbedResult, message: str | None):
    """The row the runner writes for an embedding result (vectors as float32 bytes)."""
    from datetime import datetime, timezone

    from llmbatch.jobs import work
    from llmbatch.jobs.embeddings import pack
    from llmbatch.jobs.models import ItemStatus

    def ts(t: float):
        return datetime.fromtimestamp(t, tz=timezone.utc)

    ok = r.ok and r.vectors is not None
    return work.ItemResult(
        item_id=r.id, status=ItemStatus.succeeded if ok else ItemStatus.failed,
        prompt_tokens=r.usage.prompt_tokens if r.usage else 0, started_at=ts(r.started_at),
        finished_at=ts(r.finished_at), error_code=None if ok else (r.error_code or "engine_error"),
        error_message=message, warning=r.warning, embedding=pack(r.vectors) if ok else None,
        embedding_dim=int(r.vectors.shape[1]) if ok else None)
