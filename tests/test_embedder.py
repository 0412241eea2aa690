"""The embedding engine (worker/embedder.py) against sentence-transformers' own `encode`, on the CPU."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmbatch.worker.echo import EchoEngine, echo_vector
from llmbatch.worker.embedder import (EmbedderConfig, EmbedRequest, bert_varlen, load_embedder, token_batches,
                                      truncate)

TEXTS = [
    "The cat sat on the mat.",
    "Rome was not built in a day, and neither were its roads, aqueducts and walls.",
    "ok",
    "A much longer passage about the tides: the moon pulls the water of the oceans towards it, and the earth "
    "turns beneath that bulge, so that most coasts see two high tides and two low tides every day. " * 3,
    "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
    "¿Dónde está la biblioteca? 図書館はどこですか。",
]


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def embedder():
    # A small budget, so the texts above run in several length-sorted batches.
    return load_embedder(EmbedderConfig(model="all-minilm-l6-v2", token_budget=160))


def test_vectors_equal_sentence_transformers_encode_fp32(embedder):
    reference = embedder.st.encode(TEXTS, convert_to_numpy=True)
    [results] = list(embedder.embed([EmbedRequest(i, [t]) for i, t in enumerate(TEXTS)]))
    ours = np.concatenate([r.vectors for r in results])
    assert ours.dtype == np.float32 and ours.shape == reference.shape == (len(TEXTS), 384)
    assert cosines(ours, reference).min() >= 0.9999
    assert [r.id for r in results] == list(range(len(TEXTS)))  # input order, whatever the sort did


def test_varlen_forward_equals_the_padded_one(embedder):
    """The unpadded BERT forward (run per row on the CPU; varlen_attn on CUDA) against the model's own."""
    ids = embedder.tokenize(TEXTS)
    padded = embedder.encode_ids(ids).numpy()
    embedder.varlen = True
    try:
        unpadded = embedder.encode_ids(ids).numpy()
    finally:
        embedder.varlen = False
    assert cosines(unpadded, padded).min() >= 0.9999
    # And the raw encoder output matches transformers' BertModel on one row.
    row = torch.tensor(ids[3])
    with torch.inference_mode():
        ours = bert_varlen(embedder.st[0].model, row, torch.arange(len(row)), torch.tensor([0, len(row)],
                                                                                         dtype=torch.int32), len(row))
        theirs = embedder.st[0].model(input_ids=row[None]).last_hidden_state[0]
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_batches_keep_to_the_token_budget():
    lengths = [5, 100, 7, 60, 60, 3, 250]
    for padded in (True, False):
        batches = token_batches(lengths, 128, padded)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
        for b in batches:
            cost = len(b) * max(lengths[i] for i in b) if padded else sum(lengths[i] for i in b)
            assert cost <= 128 or len(b) == 1  # a row over the budget runs alone
            assert [lengths[i] for i in b] == sorted((lengths[i] for i in b), reverse=True)
    assert len(token_batches([10] * 100, 100, padded=True)) == 10


def test_dimensions_truncate_then_renormalize(embedder):
    [results] = list(embedder.embed([EmbedRequest("full", ["Matryoshka dolls nest."]),
                                     EmbedRequest("cut", ["Matryoshka dolls nest."], dimensions=64)]))
    full, cut = results[0].vectors[0], results[1].vectors[0]
    assert cut.shape == (64,)
    np.testing.assert_allclose(np.linalg.norm(cut), 1.0, rtol=1e-5)
    np.testing.assert_allclose(cut, full[:64] / np.linalg.norm(full[:64]), rtol=1e-5, atol=1e-6)
    assert truncate(torch.ones(2, 8), None).shape == (2, 8)


def test_an_input_over_the_context_fails_its_line_only(embedder):
    long = "word " * (embedder.max_tokens + 10)
    [results] = list(embedder.embed([EmbedRequest(1, ["fine"]), EmbedRequest(2, ["fine too", long]),
                                     EmbedRequest(3, ["also fine"]), EmbedRequest(4, ["x"], dimensions=999)]))
    assert [r.ok for r in results] == [True, False, True, False]
    assert results[1].error_code == "context_length_exceeded"
    assert results[1].error_message.startswith(f"input 1 has {embedder.max_tokens + 12} tokens, over the model's "
                                               f"context of {embedder.max_tokens}")
    assert results[3].error_code == "invalid_request" and "384" in results[3].error_message


def test_token_ids_embed_like_their_text(embedder):
    text = "Token ids are accepted, as OpenAI accepts them."
    ids = embedder.tokenizer(text, add_special_tokens=False)["input_ids"]
    [results] = list(embedder.embed([EmbedRequest(1, [text]), EmbedRequest(2, [ids]), EmbedRequest(3, [[10**7]])]))
    np.testing.assert_allclose(results[0].vectors, results[1].vectors, atol=1e-6)
    assert results[0].usage.prompt_tokens == results[1].usage.prompt_tokens == len(ids) + 2  # [CLS] ... [SEP]
    assert results[2].error_code == "invalid_request" and "vocabulary" in results[2].error_message


def test_one_tokenizer_call_per_pool_keeps_mixed_inputs_in_step(embedder):
    """A pool's texts are tokenized in one call; token-id inputs and a failing request in between
    must not shift which text's ids go to which request."""
    text_ids = {t: embedder.tokenizer(t, add_special_tokens=False)["input_ids"] for t in TEXTS[:3]}
    pool = [EmbedRequest("a", [TEXTS[0]]), EmbedRequest("bad", [TEXTS[1], [10**7]]),
            EmbedRequest("mixed", [text_ids[TEXTS[2]], TEXTS[1], text_ids[TEXTS[0]]]), EmbedRequest("b", [TEXTS[2]])]
    alone = {t: next(iter(embedder.embed([EmbedRequest(0, [t])])))[0].vectors[0] for t in TEXTS[:3]}
    [out] = list(embedder.embed(pool))
    assert [r.id for r in out] == ["a", "bad", "mixed", "b"]
    assert out[1].error_code == "invalid_request" and out[1].vectors is None
    expected = {"a": [TEXTS[0]], "mixed": [TEXTS[2], TEXTS[1], TEXTS[0]], "b": [TEXTS[2]]}
    for r in (out[0], out[2], out[3]):
        np.testing.assert_allclose(r.vectors, np.stack([alone[t] for t in expected[r.id]]), atol=1e-5)


def test_more_feeds_further_requests(embedder):
    waves = [[EmbedRequest(10 + i, [f"wave two {i}"]) for i in range(3)], []]
    out = [r for batch in embedder.embed([EmbedRequest(1, ["wave one"])], more=lambda: waves.pop(0)) for r in batch]
    assert sorted(r.id for r in out) == [1, 10, 11, 12] and all(r.ok for r in out)


def test_a_text_job_on_an_embedding_worker_is_a_clear_error(embedder):
    with pytest.raises(RuntimeError, match="cannot generate text"):
        embedder.generate([])


def test_echo_embeddings_are_deterministic_unit_vectors():
    [out] = list(EchoEngine().embed([EmbedRequest(1, ["a b", "c"]), EmbedRequest(2, ["a b"], dimensions=16)]))
    np.testing.assert_allclose(np.linalg.norm(out[0].vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(out[0].vectors[0], echo_vector("a b"))
    assert out[1].vectors.shape == (1, 16) and out[0].usage.prompt_tokens == 3
