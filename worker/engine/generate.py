"""Per-row bookkeeping shared by both decode loops, and the fallback loop for architectures the
slot runner (forward.py) does not know: a left-padded batch through the transformers forward
with a DynamicCache. Rows that finish leave the batch (their KV cache rows are dropped).

I/O-free: tensors and token ids in, token ids out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .sampling import RowSampling, row_seed, sample
from .types import SamplingParams


@dataclass
class RowOutput:
    tokens: list[int] = field(default_factory=list)  # generated ids, the stop token included
    finish_reason: str | None = None  # "stop" | "length"
    stop_text: str | None = None  # the stop string that ended the row, if one did
    started_at: float = 0.0  # when its prompt went in
    finished_at: float = 0.0
    choice: int = 0  # issue 10: which of the request's n choices
    cached: int = 0  # prompt tokens it took from a shared prefix
    logprobs: list | None = None  # issue 10: (token id, logprob, [(id, logprob), ...]) per token, when asked


def positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] mask -> [B, T] position ids, counting from the first real token of each row."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


@torch.inference_mode()
def prefill(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache) -> torch.Tensor:
    """Run the prompts [B, T]; return the last position's logits [B, V]."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions(attention_mask),
                past_key_values=cache, use_cache=True, logits_to_keep=1)
    return out.logits[:, -1, :]


@torch.inference_mode()
def decode_step(model, tokens: torch.Tensor, attention_mask: torch.Tensor, pos: torch.Tensor, cache) -> torch.Tensor:
    """One new token per row: tokens [B], mask [B, T+1], pos [B] -> logits [B, V]."""
    out = model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=pos[:, None],
                past_key_values=cache, use_cache=True)
    return out.logits[:, -1, :]


def check_finished(tokenizer, rows: list[tuple[RowOutput, SamplingParams]], eos_ids: set[int]) -> None:
    """After appending one token to each row: mark the rows that are done stop/length. The stop token counts.

    Stop strings are looked for only in rows that have them, only in the text of their last few
    tokens (a stop string can only be completed by the newest token; an earlier match would have
    stopped the row then), decoded for all such rows in one call.
    """
    tails, tail_rows = [], []
    for row, p in rows:
        t = row.tokens[-1]
        if t in eos_ids and not p.ignore_eos:
            row.finish_reason = "stop"
        elif p.stop:
            window = max(map(len, p.stop)) + 2  # tokens: each holds at least one character, or is special
            tails.append(row.tokens[-window:])
            tail_rows.append((row, p))
        elif len(row.tokens) >= p.max_tokens:
            row.finish_reason = "length"
    if tails:
        for (row, p), tail in zip(tail_rows, tokenizer.batch_decode(tails, skip_special_tokens=True)):
            hit = next((s for s in p.stop if s in tail), None)
            if hit is not None:
                row.finish_reason, row.stop_text = "stop", hit
            elif len(row.tokens) >= p.max_tokens:
                row.finish_reason = "length"
    now = time.time()
    for row, _ in rows:
        if row.finish_reason and not row.finished_at:
            row.finished_at = now


@torch.inference_mode()
def generate_padded(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                    params: list[SamplingParams], eos_ids: set[int]) -> list[RowOutput]:
    """Generate for a left-padded batch until every row hits EOS, a stop string or its max_tokens."""
    device = input_ids.device
    rows = [RowOutput(started_at=time.time()) for _ in params]
    active = list(range(len(params)))  # batch row -> original row
    seeds = [row_seed(p) for p in params]
    sampling = RowSampling.build(params, seeds, device)
    cache = DynamicCache(config=model.config)
    mask = attention_mask
    pos = positions(mask)[:, -1] + 1  # [B] position of the token chosen next
    logits = prefill(model, input_ids, mask, cache)
    while True:
        tokens = sample(logits, sampling, pos)
        for r, t in zip(active, tokens.tolist()):
            rows[r].tokens.append(t)
        check_finished(tokenizer, [(rows[r], params[r]) for r in active], eos_ids)
        keep = [j for j, r in enumerate(active) if not rows[r].finish_reason]
        if not keep:
            return rows
        if len(keep) < len(active):
            active = [active[j] for j in keep]
            idx = torch.tensor(keep, device=device)
            cache.batch_select_indices(idx)
            mask, tokens, pos = mask[idx], tokens[idx], pos[idx]
            sampling = RowSampling.build([params[r] for r in active], [seeds[r] for r in active], device)
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        logits = decode_step(model, tokens, mask, pos, cache)  # the chosen token sits at `pos`
        pos = pos + 1


def decode_output(tokenizer, row: RowOutput, eos_ids: set[int], stops: tuple[str, ...] = ()) -> str:
    ended_by_eos = row.finish_reason == "stop" and row.stop_text is None
    tokens = row.tokens[:-1] if ended_by_eos and row.tokens and row.tokens[-1] in eos_ids else row.tokens
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if row.finish_reason == "length":
        # max_tokens can end between the byte tokens of one character, which decodes to U+FFFD:
        # drop that incomplete character rather than return a replacement mark.
        text = text.rstrip("\ufffd")
    if row.stop_text:
        # Cut at the earliest match of any stop string: the one that ended the row, or another that
        # the same token completed further left.
        cuts = [i for i in (text.find(s) for s in (stops or (row.stop_text,))) if i >= 0]
        text = text[:min(cuts)] if cuts else text
    return text
