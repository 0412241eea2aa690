"""Retrieval-augmented answers in bulk, with llmbatch's bundled models on the CPU.

1. Embed every passage of corpus.jsonl in ONE embedding job (all-MiniLM-L6-v2).
2. Embed the questions in one more job and take each one's top-k passages by cosine (numpy).
3. Answer every question from its passages in ONE generation job (SmolLM2-135M-Instruct).

    python examples/rag/rag.py [--k 3] [--out answers.jsonl] [--database-url URL]

The passages were written for this repository (public domain). Everything runs in this process
against a database of its own (a temporary SQLite file unless --database-url): no server, no
broker, no worker. Give `--base-url http://HOST:PORT/v1` to run the same jobs on an llmbatch
deployment instead (its workers must serve both models).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np

from llmbatch.jobs.integrations.client import chat, embed, make_client

HERE = Path(__file__).resolve().parent
EMBED_MODEL = "all-minilm-l6-v2"
CHAT_MODEL = "smollm2-135m-instruct"
SYSTEM = "Answer the question in one short sentence, using only the passages given."


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def top_k(passages: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """passages [P, d], queries [Q, d], unit vectors -> [Q, k] passage indices, best first."""
    scores = queries @ passages.T  # [Q, P] cosine similarities
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def prompt(question: str, passages: list[str]) -> list[dict]:
    context = "\n".join(f"- {p}" for p in passages)
    return [{"role": "system", "content": SYSTEM},
            {"role": "user", "content": f"Passages:\n{context}\n\nQuestion: {question}"}]


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--corpus", type=Path, default=HERE / "corpus.jsonl")
    ap.add_argument("--questions", type=Path, default=HERE / "questions.jsonl")
    ap.add_argument("--k", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--out", type=Path, default=None, help="answers as JSONL (default: stdout)")
    ap.add_argument("--database-url", default=None)
    ap.add_argument("--base-url", default=None, help="an llmbatch server's /v1 URL, instead of in-process")
    args = ap.parse_args(argv)

    tmp = None
    if args.database_url is None and args.base_url is None:
        tmp = tempfile.TemporaryDirectory(prefix="llmbatch-rag-")
        args.database_url = f"sqlite:///{tmp.name}/rag.db"
    embedder = make_client(args.base_url, model=EMBED_MODEL, database_url=args.database_url)
    generator = make_client(args.base_url, model=CHAT_MODEL, database_url=args.database_url)

    corpus = read_jsonl(args.corpus)
    questions = read_jsonl(args.questions)
    print(f"embedding {len(corpus)} passages (one job)", file=sys.stderr)
    passages = np.array(embed(embedder, [p["text"] for p in corpus]), dtype=np.float32)
    print(f"embedding {len(questions)} questions (one job)", file=sys.stderr)
    queries = np.array(embed(embedder, [q["question"] for q in questions]), dtype=np.float32)
    hits = top_k(passages, queries, args.k)

    print(f"answering {len(questions)} questions (one job)", file=sys.stderr)
    conversations = [prompt(q["question"], [corpus[i]["text"] for i in row]) for q, row in zip(questions, hits)]
    bodies = chat(generator, conversations, {"max_tokens": args.max_tokens, "temperature": 0})

    answers = [{"question": q["question"], "passages": [corpus[i]["id"] for i in row],
                "answer": b["choices"][0]["message"]["content"].strip()}
               for q, row, b in zip(questions, hits, bodies)]
    text = "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers)
    if args.out:
        args.out.write_text(text)
    else:
        sys.stdout.write(text)
    if tmp is not None:
        tmp.cleanup()
    return answers


if __name__ == "__main__":
    main()
