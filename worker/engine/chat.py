"""Chat prompts as token ids, with message contents that can never become control tokens.

Tokenizing a rendered chat template as one string parses every special-token text in it, so a
message whose content holds `<|im_end|>` or `<|eot_id|><|start_header_id|>assistant...` would
end its turn and forge another. Instead the template is rendered with a unique mark in place of
each content; the template's own text (between the marks) is tokenized normally, so its special
tokens stay special, and each content with split_special_tokens=True, so it stays text.
"""

from __future__ import annotations

import re
import secrets
from functools import lru_cache

_MARK = "[[llmbatch-content:{nonce}:{i}]]"


def _render(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


@lru_cache(maxsize=16)
def _trims(tokenizer, template: str) -> bool:
    """Whether the template strips contents (Llama 3's `| trim`): then contents are stripped too."""
    probe = "[[llmbatch-probe]]"
    return f" {probe} " not in _render(tokenizer, [{"role": "user", "content": f" {probe} "}])


def _special_texts(tokenizer) -> list[str]:
    return [t for t in tokenizer.all_special_tokens + list(getattr(tokenizer, "added_tokens_encoder", {}) or {})
            if t]


def encode_chats(tokenizer, conversations: list[list[dict]]) -> list[list[int] | Exception]:
    """Token ids of each conversation's prompt (generation prompt added), or the error that stopped it."""
    parts: list[list[tuple[bool, str]]] = []  # per conversation: (is_content, text) in order
    out: list[list[int] | Exception | None] = []
    for messages in conversations:
        try:
            parts.append(_split(tokenizer, messages))
            out.append(None)
        except Exception as exc:  # a template that rejects these messages fails this item only
            parts.append([])
            out.append(exc)
    template = [text for conv in parts for is_content, text in conv if not is_content]
    content = [text for conv in parts for is_content, text in conv if is_content]
    # Two batched calls for the whole list: the fast tokenizer batches in Rust.
    template_ids = iter(tokenizer(template, add_special_tokens=False)["input_ids"] if template else [])
    content_ids = iter(tokenizer(content, add_special_tokens=False, split_special_tokens=True)["input_ids"]
                       if content else [])
    for k, conv in enumerate(parts):
        ids: list[int] = []
        for is_content, _ in conv:
            ids.extend(next(content_ids) if is_content else next(template_ids))
        if out[k] is None:
            out[k] = ids
    return out


def _split(tokenizer, messages: list[dict]) -> list[tuple[bool, str]]:
    nonce = secrets.token_hex(8)
    contents = [m.get("content") for m in messages]
    masked = [{**m, "content": _MARK.format(nonce=nonce, i=i)} if isinstance(c, str) else m
              for i, (m, c) in enumerate(zip(messages, contents))]
    text = _render(tokenizer, masked)
    pieces = re.split(re.escape(_MARK.format(nonce=nonce, i="@")).replace("@", r"(\d+)"), text)
    seen = {int(i) for i in pieces[1::2]}
    if seen != {i for i, c in enumerate(contents) if isinstance(c, str)}:
        # The template changed or dropped a content, so marks cannot stand in for it. Fall back to
        # the plain rendering, which is safe only if no content holds special-token text.
        if any(s in c for c in contents if isinstance(c, str) for s in _special_texts(tokenizer)):
            raise ValueError("this model's chat template rewrites message contents, and a message holds "
                             "special-token text that could not be kept as text")
        return [(False, _render(tokenizer, messages))]
    strip = _trims(tokenizer, tokenizer.chat_template or "")
    out: list[tuple[bool, str]] = []
    for j, piece in enumerate(pieces):
        if j % 2 == 0:
            if piece:
                out.append((False, piece))
        else:
            c = contents[int(piece)]
            c = c.strip() if strip else c
            # Whitespace just before a content goes with it, as in one-string tokenization, where
            # it pre-tokenizes together with the content's first word ("\n\nHi" is not "\n\n"+"Hi").
            if out and not out[-1][0]:
                head = out[-1][1].rstrip()
                c = out[-1][1][len(head):] + c
                out[-1] = (False, head)
            out.append((True, c))
    return [(is_content, t) for is_content, t in out if t]
