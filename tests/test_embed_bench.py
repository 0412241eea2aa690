"""benchmarks/embed.py runs on the CPU in --smoke mode and its two sides agree."""

from __future__ import annotations

import pytest

from benchmarks import embed


def test_texts_have_the_asked_token_lengths():
    from transformers import AutoTokenizer

    from llmbatch.worker.embedder import resolve_model

    tok = AutoTokenizer.from_pretrained(resolve_model("all-minilm-l6-v2"))
    texts = embed.make_texts(50, 16, 64, seed=1)
    lengths = [len(tok(t)["input_ids"]) for t in texts]
    assert min(lengths) >= 16 and max(lengths) <= 64


@pytest.mark.slow
def test_smoke_run_matches_sentence_transformers():
    rows = embed.main(["--smoke", "--texts", "60"])
    assert [r["model"] for r in rows] == ["all-MiniLM-L6-v2", "BERT tiny (random)"]
    for r in rows:
        assert r["texts"] == 60 and r["min_cosine"] >= 0.9999 and r["ours_texts_per_s"] > 0


@pytest.mark.slow
def test_embed_scale_runs_small(tmp_path, capsys):
    from benchmarks import embed_scale
    from tests.conftest import redis_url

    embed_scale.main(["--lines", "200", "--no-record", "--workdir", str(tmp_path), "--redis-url", redis_url(11),
                      "--formats", "parquet,jsonl"])
    out = capsys.readouterr().out
    assert "| run (echo embed) |" in out and "Parquet: 204 rows in 1 row groups" in out
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "out.parquet")
    assert table.num_rows == 204 and table.column("embedding").null_count == 0
