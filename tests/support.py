"""Test data and small helpers shared by several test modules."""

from __future__ import annotations

import json
from pathlib import Path


def write_jsonl(path: Path, lines: list) -> Path:
    """Lines given as dicts are JSON-encoded; strings are written as they are (bad lines)."""
    with open(path, "w", encoding="utf-8") as f:
        for line in lines:
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return path


# Three line forms, per-line parameters, and bad lines of several kinds.
MIXED_LINES = [
    {"custom_id": "raw", "prompt": "The capital of France is", "max_tokens": 6},
    {"custom_id": "chat", "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 6},
    '{"custom_id": "broken", "prompt": ',  # invalid JSON
    {"custom_id": "oa-chat", "method": "POST", "url": "/v1/chat/completions",
     "body": {"model": "gpt-4o", "messages": [{"role": "user", "content": "Count to three."}], "max_tokens": 6}},
    {"custom_id": "unknown", "prompt": "hi", "frobnicate": 1},  # unknown parameter
    {"custom_id": "oa-text", "method": "POST", "url": "/v1/completions",
     "body": {"model": "x", "prompt": "1, 2, 3,", "max_tokens": 6, "temperature": 0}},
    {"custom_id": "raw", "prompt": "duplicate id"},  # duplicate custom_id
    {"custom_id": "empty", "prompt": ""},  # empty prompt
    {"prompt": "No id here, so line-9.", "max_tokens": 5, "temperature": 0.7, "seed": 1},
]
MIXED_BAD_LINES = {3: "invalid JSON", 5: "unknown parameter", 7: "duplicate custom_id", 8: "empty prompt"}
