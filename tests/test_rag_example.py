"""examples/rag/rag.py runs end to end on the CPU with the bundled models."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def load_example():
    spec = importlib.util.spec_from_file_location("rag_example", ROOT / "examples" / "rag" / "rag.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_top_k_is_by_cosine_best_first():
    rag = load_example()
    passages = np.eye(4, dtype=np.float32)
    queries = np.array([[0.1, 0.9, 0.3, 0], [0, 0, 0.2, 0.8]], dtype=np.float32)
    assert rag.top_k(passages, queries, 2).tolist() == [[1, 2], [3, 2]]


@pytest.mark.slow
def test_the_rag_example_retrieves_and_answers(tmp_path):
    rag = load_example()
    out = tmp_path / "answers.jsonl"
    answers = rag.main(["--database-url", f"sqlite:///{tmp_path / 'rag.db'}", "--out", str(out), "--max-tokens", "16"])
    expected = [json.loads(line)["expected"] for line in (ROOT / "examples/rag/questions.jsonl").read_text().splitlines()]
    assert [json.loads(line) for line in out.read_text().splitlines()] == answers
    assert [a["passages"][0] for a in answers] == expected  # the right passage ranks first for every question
    assert all(a["answer"] for a in answers)  # SmolLM2-135M answered every one (its quality is not under test)
    # The answer to the Everest question comes from its passage.
    assert "Everest" in answers[1]["answer"]
