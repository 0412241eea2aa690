"""Per-row bookkeeping shared by both decode loops, and the fallback loop for architectures the
slot runner (runner.py) does not know: a left-padded batch through the transformers forward
with a DynamicCache. Rows that finish leave the batch (their KV cache rows are dropped).

I/O-free: tensors and token ids in, token ids out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache

from .sampling import RowSampling, sample
from .types import SamplingParams


@dataclass
class RowOutput:
    tokens: list[int] = field(default_factory=list)  # generated ids, the stop token included
    finish_reason: str | None = None  # "stop" | "length"
    stop_text: str | None = None  # the stop string that ended the row, if one did
    started_at: float = 0.0  # when its prompt went in
    finished_at: float = 0.0


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


def check_finished(tokenizer, row: RowOutput, p: SamplingParams, eos_ids: set[int]) -> bool:
    """After appending a token: mark the row stop/length if it is done. The stop token counts."""
    t = row.tokens[-1]
    if t in eos_ids and not p.ignore_eos:
        row.finish_reason = "stop"
    elif p.stop and (hit := _hit_stop(tokenizer, row, p.stop)):
        row.finish_reason, row.stop_text = "stop", hit
    elif len(row.tokens) >= p.max_tokens:
        row.finish_reason = "length"
    if row.finish_reason:
        row.finished_at = time.time()
        return True
    return False


def _hit_stop(tokenizer, row: RowOutput, stops: tuple[str, ...]) -> str | None:
    # A stop string can only be completed by the newest token, so decoding a short tail suffices.
    window = max(len(s) for s in stops) + 2
    tail = tokenizer.decode(row.tokens[-window:], skip_special_tokens=True)
    for s in stops:
        if s in tail:
            return s
    return None


@torch.inference_mode()
def generate_padded(model, tokenizer, input_ids: torch.Tensor, attention_mask: torch.Tensor,
             params: list[SamplingParams], eos_ids: set[int]) -> list[RowOutput]:
    """Generate for a left-padded batch until every row hits EOS, a stop string or its max_tokens."""
    device = input_ids.device
    rows = [RowOutput(started_at=time.time()) for _ in params]
    active = list(range(len(params)))  # batch row -> original row
    sampling = RowSampling.build(params, device)
    cache = DynamicCache(config=model.config)
    mask = attention_mask
    pos = positions(mask)[:, -1] + 1
    logits = prefill(model, input_ids, mask, cache)
    while True:
        tokens = sample(logits, sampling)
        finished = []
        for j, (r, t) in enumerate(zip(active, tokens.tolist())):
            rows[r].tokens.append(t)
            if check_finished(tokenizer, rows[r], params[r], eos_ids):
                finished.append(j)
        if len(finished) == len(active):
            return rows
        if finished:
            keep = torch.tensor([j for j in range(len(active)) if j not in set(finished)], device=device)
            cache.batch_select_indices(keep)
            mask, tokens, pos, sampling = mask[keep], tokens[keep], pos[keep], sampling.select(keep)
            active = [active[j] for j in keep.tolist()]
        mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=-1)
        logits = decode_step(model, tokens, mask, pos, cache)
        pos = pos + 1


def decode_output(tokenizer, row: RowOutput, eos_ids: set[int]) -> str:
    ended_by_eos = row.finish_reason == "stop" and row.stop_text is None
    tokens = row.tokens[:-1] if ended_by_eos and row.tokens and row.tokens[-1] in eos_ids else row.tokens
    text = tokenizer.decode(tokens, skip_special_tokens=True)
    if row.finish_reason == "length":
        # max_tokens can end between the byte tokens of one character, which decodes to U+FFFD:
        # drop that incomplete character rather than return a replacement mark.
        text = text.rstrip("\ufffd")
    if row.stop_text:
        text = text[: text.find(row.stop_text)] if row.stop_text in text else text
    return text
