"""Per-row logits processing on the device, batched: logit_bias, penalties, grammar masks, logprobs.

I/O-free tensor functions; every one takes a [B, V] float32 logits tensor and per-row tensors.
Order (the same as vLLM's): repetition penalty, then frequency/presence penalties, then logit_bias,
then the grammar mask, so a bias can never re-allow a token the grammar forbids.
"""

from __future__ import annotations

import torch


def apply_penalties(logits: torch.Tensor, counts: torch.Tensor, seen: torch.Tensor, frequency: torch.Tensor,
                    presence: torch.Tensor, repetition: torch.Tensor) -> None:
    """In place. counts [B, V] int: times each token was generated; seen [B, V] bool: in the prompt or
    generated; frequency, presence, repetition [B].

    repetition (transformers' RepetitionPenaltyLogitsProcessor): a seen token's logit is divided by the
    penalty when positive and multiplied when negative. frequency / presence (OpenAI):
    logit -= frequency * count + presence * (count > 0), over generated tokens only.
    """
    rep = repetition[:, None]
    penalized = torch.where(logits < 0, logits * rep, logits / rep)
    logits.copy_(torch.where(seen, penalized, logits))
    c = counts.to(logits.dtype)
    logits.sub_(frequency[:, None] * c + presence[:, None] * (c > 0).to(logits.dtype))


def apply_bias(logits: torch.Tensor, rows: torch.Tensor, ids: torch.Tensor, values: torch.Tensor) -> None:
    """In place: logits[rows[i], ids[i]] += values[i]; rows, ids [N] long, values [N] float."""
    logits.index_put_((rows, ids), values, accumulate=True)


_BITS = None


def unpack_bitmask(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    """int32 [R, W] -> bool [R, vocab], True where the token is allowed (bit t % 32 of word t // 32)."""
    global _BITS
    if _BITS is None or _BITS.device != bitmask.device:
        _BITS = (torch.ones(32, dtype=torch.int64) << torch.arange(32)).to(torch.int32).to(bitmask.device)
    return ((bitmask[:, :, None] & _BITS) != 0).reshape(bitmask.shape[0], -1)[:, :vocab]


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor, rows: torch.Tensor) -> None:
    """In place: forbidden tokens of rows[i] (bitmask [R, W] int32 on logits' device) get -inf."""
    allowed = unpack_bitmask(bitmask, logits.shape[1])  # [R, V]
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, k: int):
    """logits [B, V], chosen [B] -> (logprob of chosen [B], top-k logprobs [B, k] sorted descending,
    their ids [B, k]); log-softmax in float32."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    mine = lp.gather(1, chosen[:, None])[:, 0]
    if k <= 0:
        return mine, lp.new_empty(lp.shape[0], 0), chosen.new_empty(lp.shape[0], 0)
    top, ids = lp.topk(k, dim=-1)  # sorted=True
    return mine, top, ids
