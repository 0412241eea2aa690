"""Tests for jobs.inputs: the JSONL input parser/validator."""

from __future__ import annotations

import io
import json

import pytest

from llmbatch.jobs.exceptions import InputFileError
from llmbatch.jobs.inputs import PARAM_NAMES, ParsedLine, iter_parsed, parse_line, validate_params
from llmbatch.jobs.settings import Limits

LIMITS = Limits(max_file_bytes=10**9, max_line_bytes=4096, max_items_per_job=1000, max_tokens_per_item=1024)


def _jsonl(*objs: object) -> bytes:
    return b"".join((o if isinstance(o, bytes) else json.dumps(o).encode()) + b"\n" for o in objs)


def parse_all(data: bytes, limits: Limits = LIMITS) -> list[ParsedLine]:
    return list(iter_parsed(io.BytesIO(data), limits))


def one(obj: object, line: int = 7) -> ParsedLine:
    raw = obj if isinstance(obj, bytes) else json.dumps(obj).encode()
    return parse_line(raw, line, LIMITS)


def error_of(obj: object, line: int = 7) -> str:
    p = one(obj, line)
    assert p.request is None and p.error is not None, p
    assert p.error.startswith(f"line {line}: "), p.error
    return p.error


CHAT = [{"role": "user", "content": "hi"}]


# ---- the three forms ----------------------------------------------------------------------


def test_prompt_form():
    p = one({"custom_id": "a1", "prompt": "Translate: x", "max_tokens": 5})
    assert p == ParsedLine(7, "a1", {"prompt": "Translate: x", "params": {"max_tokens": 5}}, None)


def test_messages_form_and_default_id():
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": ""}]
    p = one({"messages": msgs}, line=3)
    assert p.custom_id == "line-3" and p.error is None
    assert p.request == {"messages": msgs, "params": {}}


def test_content_parts_are_joined():
    msgs = [{"role": "user", "name": "bob", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]
    assert one({"messages": msgs}).request == {"messages": [{"role": "user", "content": "a\nb"}], "params": {}}


def test_openai_chat_form():
    body = {"model": "gpt-x", "messages": CHAT, "max_completion_tokens": 9, "temperature": 0, "n": 1, "stream": False, "user": "u"}
    p = one({"custom_id": "c", "method": "POST", "url": "/v1/chat/completions", "body": body})
    assert p.error is None
    assert p.request == {
        "messages": CHAT,
        "params": {"max_tokens": 9, "temperature": 0.0, "n": 1},
        "url": "/v1/chat/completions",
        "body_model": "gpt-x",
    }


def test_openai_completions_form_without_model():
    p = one({"url": "/v1/completions", "body": {"prompt": "Once", "stop": "\n"}})
    assert p.request == {"prompt": "Once", "params": {"stop": ["\n"]}, "url": "/v1/completions", "body_model": None}


def test_openai_body_and_line_params_combine():
    p = one({"url": "/v1/completions", "body": {"prompt": "x", "max_tokens": 3}, "seed": 4})
    assert p.request["params"] == {"max_tokens": 3, "seed": 4}


# ---- params -------------------------------------------------------------------------------


def test_all_params_normalized_in_order():
    p = one({"prompt": "x", "stop": ["a", "b"], "seed": -1, "top_k": 0, "top_p": 1, "temperature": 2, "max_new_tokens": 1024})
    assert p.request["params"] == {"max_tokens": 1024, "temperature": 2.0, "top_p": 1.0, "top_k": 0, "seed": -1, "stop": ["a", "b"]}
    assert tuple(p.request["params"]) == PARAM_NAMES[:6]  # the first six; issue 10 added the rest after them


def test_validate_params_for_cli_flags():
    assert validate_params({"temperature": 0.7, "max_tokens": 10}) == {"max_tokens": 10, "temperature": 0.7}
    assert validate_params({}) == {}
    with pytest.raises(ValueError, match=r"^--temperature: 'temperature' must be between 0 and 2, got 3$"):
        validate_params({"temperature": 3}, "--temperature")
    with pytest.raises(ValueError, match=r"^unknown parameter 'foo'$"):
        validate_params({"foo": 1})
    with pytest.raises(ValueError, match="between 1 and 8"):
        validate_params({"max_tokens": 9}, limits=Limits(max_tokens_per_item=8))


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"temperature": "hot"}, "'temperature' must be a number, got string"),
        ({"temperature": True}, "'temperature' must be a number, got boolean"),
        ({"temperature": None}, "'temperature' must be a number, got null"),
        ({"temperature": -0.1}, "'temperature' must be between 0 and 2, got -0.1"),
        ({"temperature": 2.5}, "'temperature' must be between 0 and 2, got 2.5"),
        ({"top_p": 0}, "'top_p' must be greater than 0 and at most 1, got 0"),
        ({"top_p": 1.5}, "'top_p' must be greater than 0 and at most 1, got 1.5"),
        ({"top_p": [1]}, "'top_p' must be a number, got array"),
        ({"top_k": -1}, "'top_k' must be 0 (off) or a positive integer, got -1"),
        ({"top_k": 1.5}, "'top_k' must be an integer, got 1.5"),
        ({"seed": "1"}, "'seed' must be an integer, got string"),
        ({"seed": 2**64}, "'seed' must fit in 64 bits, got 18446744073709551616"),
        ({"max_tokens": 0}, "'max_tokens' must be between 1 and 1024, got 0"),
        ({"max_tokens": 1025}, "'max_tokens' must be between 1 and 1024, got 1025"),
        ({"max_tokens": True}, "'max_tokens' must be an integer, got boolean"),
        ({"max_new_tokens": 10.0}, "'max_new_tokens' must be an integer, got 10.0"),
        ({"max_tokens": 5, "max_new_tokens": 5}, "give only one of 'max_tokens' and 'max_new_tokens'"),
        ({"stop": ""}, "'stop' must contain only non-empty strings"),
        ({"stop": ["a", ""]}, "'stop' must contain only non-empty strings"),
        ({"stop": ["a", 1]}, "'stop' must contain only non-empty strings"),
        ({"stop": ["a", "b", "c", "d", "e"]}, "'stop' may have at most 4 strings, got 5"),
        ({"stop": {"a": 1}}, "'stop' must be a string or an array of strings, got object"),
    ],
)
def test_bad_params_on_a_line(params, message):
    assert error_of({"custom_id": "k", "prompt": "x", **params}) == f"line 7: {message}"
    assert one({"custom_id": "k", "prompt": "x", **params}).custom_id == "k"  # error keeps the given id


# ---- line errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"prompt": "x", "foo": 1}, "unknown parameter 'foo'"),
        ({"prompt": "x", "max_completion_tokens": 5}, "unknown parameter 'max_completion_tokens'"),
        ({"custom_id": "a"}, "no prompt: expected 'prompt', 'messages', 'input' (embeddings) or an OpenAI 'body'"),
        ({"prompt": ""}, "empty prompt"),
        ({"prompt": " \n\t"}, "empty prompt"),
        ({"prompt": 5}, "'prompt' must be a string, got number"),
        ({"prompt": "x", "messages": CHAT}, "give only one of 'prompt', 'messages', 'input' or 'body', got 'prompt', 'messages'"),
        ({"prompt": "x", "url": "/v1/completions"}, "'url' is only valid with an OpenAI 'body'"),
        ({"custom_id": 5, "prompt": "x"}, "'custom_id' must be a string, got number"),
        ({"custom_id": "", "prompt": "x"}, "'custom_id' must be 1 to 256 characters long"),
        ({"custom_id": "x" * 257, "prompt": "x"}, "'custom_id' must be 1 to 256 characters long"),
        ({"messages": []}, "'messages' must not be empty"),
        ({"messages": "hi"}, "'messages' must be an array, got string"),
        ({"messages": ["hi"]}, "messages[0] must be an object, got string"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]: 'role' must be one of 'system', 'user', 'assistant', got 'tool'"),
        ({"messages": [{"content": "x"}]}, "messages[0]: 'role' must be one of 'system', 'user', 'assistant', got None"),
        ({"messages": [{"role": "user", "content": None}]}, "messages[0]: 'content' must be a string or a non-empty array of text parts, got null"),
        ({"messages": [{"role": "user", "content": []}]}, "messages[0]: 'content' must be a string or a non-empty array of text parts, got array"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "u"}}]}]},
            "messages[0].content[0]: only text parts are supported, got 'image_url'",
        ),
        ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "messages[0]: unsupported key 'tool_calls'"),
    ],
)
def test_bad_lines(obj, message):
    assert error_of(obj) == f"line 7: {message}"


URL = "/v1/chat/completions"


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        ({"url": URL, "body": {"messages": CHAT, "logprobs": 2}}, "'logprobs' must be true or false, got number"),
        ({"url": URL, "body": {"messages": CHAT, "max_new_tokens": 5}}, "unsupported parameter 'max_new_tokens' in body"),
        ({"method": "GET", "url": URL, "body": {"messages": CHAT}}, "'method' must be 'POST', got 'GET'"),
        ({"url": "/v1/images", "body": {"prompt": "x"}}, "unsupported url '/v1/images'"),
        ({"body": {"messages": CHAT}}, "missing 'url'"),
        ({"url": URL, "body": "hi"}, "'body' must be an object, got string"),
        ({"url": URL, "body": {"prompt": "x"}}, "body for /v1/chat/completions needs 'messages'"),
        ({"url": URL, "body": {"messages": CHAT, "prompt": "x"}}, "unsupported parameter 'prompt' in body for /v1/chat/completions"),
        ({"url": "/v1/completions", "body": {"messages": CHAT}}, "body for /v1/completions needs 'prompt'"),
        ({"url": "/v1/completions", "body": {"prompt": ["a", "b"]}}, "'prompt' must be a string, got array"),
        ({"url": URL, "body": {"messages": CHAT, "n": 0}}, "'n' must be between 1 and 16, got 0"),
        ({"url": URL, "body": {"messages": CHAT, "n": True}}, "'n' must be an integer, got boolean"),
        ({"url": URL, "body": {"messages": CHAT, "stream": True}}, "'stream' in body must be false"),
        ({"url": URL, "body": {"messages": CHAT, "model": 3}}, "'model' in body must be a string, got number"),
        ({"url": URL, "body": {"messages": CHAT, "temperature": "0"}}, "'temperature' must be a number, got string"),
        (
            {"url": URL, "body": {"messages": CHAT, "max_tokens": 1, "max_completion_tokens": 2}},
            "give only one of 'max_tokens' and 'max_completion_tokens'",
        ),
        ({"url": URL, "body": {"messages": CHAT, "max_tokens": 1}, "max_new_tokens": 2}, "'max_tokens' is given both in 'body' and at the top level"),
        ({"url": URL, "body": {"messages": []}}, "'messages' must not be empty"),
        ({"prompt": "x", "body": {"prompt": "y"}, "url": "/v1/completions"}, "give only one of 'prompt', 'messages', 'input' or 'body'"),
    ],
)
def test_bad_openai_lines(obj, message):
    err = error_of({"custom_id": "o", **obj})
    assert err.startswith(f"line 7: {message}"), err


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b'{"prompt": "x" "y"}', "invalid JSON: Expecting ',' delimiter (column 16)"),
        (b'{"prompt": "caf\xe9"}', "not valid UTF-8 (byte offset 15)"),
        (b"[1, 2]", "expected a JSON object, got array"),
        (b'"just a string"', "expected a JSON object, got string"),
        (b"null", "expected a JSON object, got null"),
        (b'{"prompt": "x", "temperature": NaN}', "invalid JSON: NaN is not valid JSON"),
        (b"[" * 100_000 + b"]" * 100_000, "invalid JSON: nested too deeply"),
    ],
)
def test_undecodable_lines(raw, message):
    p = parse_line(raw, 12, Limits(max_line_bytes=10**6))
    assert (p.custom_id, p.request, p.error) == ("line-12", None, f"line 12: {message}")


def test_parse_line_accepts_trailing_newline():
    assert parse_line(b'{"prompt": "x"}\r\n', 1, LIMITS).request == {"prompt": "x", "params": {}}


# ---- whole files --------------------------------------------------------------------------


def test_blank_lines_are_skipped_but_counted():
    data = b'\n  \n{"prompt": "a"}\n\t\r\n\n{"prompt": "b"}\r\n{"prompt": "c", "temperature": "x"}'  # no final newline
    parsed = parse_all(data)
    assert [(p.line, p.custom_id) for p in parsed] == [(3, "line-3"), (6, "line-6"), (7, "line-7")]
    assert parsed[2].error == "line 7: 'temperature' must be a number, got string"


def test_bom_is_tolerated():
    parsed = parse_all(b'\xef\xbb\xbf{"custom_id": "a", "prompt": "x"}\n{"prompt": "y"}\n')
    assert [(p.custom_id, p.error) for p in parsed] == [("a", None), ("line-2", None)]


def test_duplicate_custom_ids():
    data = _jsonl({"custom_id": "a1", "prompt": "x"}, {"custom_id": "b", "prompt": "x"}, b"", {"custom_id": "a1", "prompt": "y"})
    parsed = parse_all(data)
    assert parsed[2].line == 4 and parsed[2].custom_id == "a1" and parsed[2].request is None
    assert parsed[2].error == "line 4: duplicate custom_id 'a1' (first seen on line 1)"
    assert parsed[0].error is None


def test_explicit_id_clashing_with_a_default_id_is_a_duplicate():
    parsed = parse_all(_jsonl({"prompt": "x"}, {"custom_id": "line-1", "prompt": "y"}))
    assert parsed[1].error == "line 2: duplicate custom_id 'line-1' (first seen on line 1)"


def test_bad_line_keeps_its_own_error_even_if_duplicate():
    parsed = parse_all(_jsonl({"custom_id": "a", "prompt": "x"}, {"custom_id": "a", "prompt": ""}))
    assert parsed[1].error == "line 2: empty prompt"


class TrackingReader(io.BytesIO):
    """Records every read, to prove a long line is never held in memory whole."""

    def __init__(self, data: bytes):
        super().__init__(data)
        self.biggest = 0

    def readline(self, size: int | None = -1) -> bytes:
        assert size is not None and size > 0, "unbounded readline"
        chunk = super().readline(size)
        self.biggest = max(self.biggest, len(chunk))
        return chunk

    def read(self, size: int | None = -1) -> bytes:
        raise AssertionError("iter_parsed must read lines, not the whole file")


def test_overlong_line_is_skipped_without_holding_it():
    limits = Limits(max_file_bytes=10**9, max_line_bytes=100, max_items_per_job=10, max_tokens_per_item=10)
    big = json.dumps({"prompt": "x" * (2 * 1024 * 1024)}).encode()
    fp = TrackingReader(_jsonl({"prompt": "a"}, big, {"custom_id": "after", "prompt": "b"}))
    parsed = list(iter_parsed(fp, limits))
    assert [(p.line, p.custom_id, p.error) for p in parsed] == [
        (1, "line-1", None),
        (2, "line-2", "line 2: line is longer than 100 bytes"),
        (3, "after", None),
    ]
    assert fp.biggest <= 64 * 1024


def test_line_length_limit_boundaries():
    limits = Limits(max_file_bytes=10**9, max_line_bytes=20, max_items_per_job=10, max_tokens_per_item=10)
    exact = b'{"prompt": "abcdef"}'  # 20 bytes, allowed with either line ending and with a BOM
    assert len(exact) == 20
    for data in (exact, exact + b"\n", exact + b"\r\n", b"\xef\xbb\xbf" + exact + b"\r\n" + exact):
        assert all(p.error is None for p in parse_all(data, limits)), data
    over = b'{"prompt": "abcdefg"}'
    for data in (over, over + b"\r\n"):
        assert parse_all(data + b"\n" + exact, limits)[0].error == "line 1: line is longer than 20 bytes"


@pytest.mark.parametrize("data", [b"", b"\n\n  \r\n\t\n", b"\xef\xbb\xbf\n"])
def test_empty_file(data):
    with pytest.raises(InputFileError, match="^input file is empty$"):
        parse_all(data)


def test_csv_is_not_jsonl():
    data = b"custom_id,prompt\na1,hello\na2,world\n"
    with pytest.raises(InputFileError, match="does not look like JSONL: first lines are not JSON") as exc:
        parse_all(data)
    assert exc.value.line_errors[0].startswith("line 1: invalid JSON:")
    assert [e.split(":")[0] for e in exc.value.line_errors] == ["line 1", "line 2", "line 3"]


def test_jsonl_sniff_looks_at_five_lines_and_yields_nothing_first():
    bad = b"not json\n" * 5
    it = iter_parsed(io.BytesIO(bad + _jsonl({"prompt": "x"})), LIMITS)
    with pytest.raises(InputFileError, match="does not look like JSONL"):
        next(it)
    # One JSON object among the first five is enough; bad lines become errors.
    parsed = parse_all(b"not json\n" * 3 + b"[1]\n" + _jsonl({"prompt": "x"}) + b"nope\n")
    assert [p.line for p in parsed] == [1, 2, 3, 4, 5, 6]
    assert parsed[3].error == "line 4: expected a JSON object, got array"
    assert parsed[4].error is None
    assert parsed[5].error.startswith("line 6: invalid JSON:")
    # Other JSON values are no evidence: a file of arrays is a JSON document, not JSONL.
    with pytest.raises(InputFileError, match="does not look like JSONL"):
        parse_all(b"[1]\n" * 5 + _jsonl({"prompt": "x"}))


def test_max_items():
    limits = Limits(max_file_bytes=10**9, max_line_bytes=100, max_items_per_job=2, max_tokens_per_item=10)
    assert len(parse_all(_jsonl({"prompt": "a"}, b"", {"prompt": "b"}), limits)) == 2
    with pytest.raises(InputFileError, match="^input file has more than 2 items$"):
        parse_all(_jsonl({"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"}), limits)


class Unseekable(io.BytesIO):
    def seekable(self) -> bool:
        return False


@pytest.mark.parametrize("cls", [io.BytesIO, Unseekable])
def test_max_file_bytes(cls):
    limits = Limits(max_file_bytes=40, max_line_bytes=100, max_items_per_job=10, max_tokens_per_item=10)
    assert len(list(iter_parsed(cls(_jsonl({"prompt": "a"}, {"prompt": "b"})), limits))) == 2  # 32 bytes
    with pytest.raises(InputFileError, match="^input file is larger than 40 bytes$"):
        list(iter_parsed(cls(_jsonl({"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"})), limits))


def test_file_size_counts_skipped_overlong_lines():
    limits = Limits(max_file_bytes=1000, max_line_bytes=10, max_items_per_job=10, max_tokens_per_item=10)
    with pytest.raises(InputFileError, match="larger than 1000 bytes"):
        list(iter_parsed(Unseekable(b"x" * 5000 + b"\n"), limits))


def test_mixed_file_end_to_end():
    data = _jsonl(
        {"custom_id": "p", "prompt": "hello", "max_new_tokens": 4},
        {"custom_id": "m", "messages": CHAT, "stop": "."},
        {"custom_id": "o", "method": "POST", "url": "/v1/completions", "body": {"model": "m", "prompt": "z"}},
        b"oops",
    )
    parsed = parse_all(data)
    assert [p.custom_id for p in parsed] == ["p", "m", "o", "line-4"]
    assert parsed[0].request["params"] == {"max_tokens": 4}
    assert parsed[1].request["params"] == {"stop": ["."]}
    assert parsed[2].request["body_model"] == "m"
    assert parsed[3].error.startswith("line 4: invalid JSON: ")


# ---- issue 10: response_format, logprobs, n, penalties, logit_bias -------------------------

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def test_new_parameters_are_normalized_on_native_and_openai_lines():
    p = one({"prompt": "x", "n": 3, "logprobs": True, "top_logprobs": 2, "frequency_penalty": 0.5,
             "presence_penalty": -1, "repetition_penalty": 1.1, "logit_bias": {"00012": -100},
             "response_format": {"type": "json_schema", "json_schema": {"name": "a_1", "schema": SCHEMA}}})
    assert p.error is None
    assert p.request["params"] == {
        "response_format": {"type": "json_schema", "json_schema": {"name": "a_1", "schema": SCHEMA, "strict": False}},
        "logprobs": True, "top_logprobs": 2, "n": 3, "frequency_penalty": 0.5, "presence_penalty": -1.0,
        "logit_bias": {"12": -100.0}, "repetition_penalty": 1.1}
    chat = one({"url": URL, "body": {"messages": CHAT, "response_format": {"type": "json_object"}, "n": 2}})
    assert chat.request["params"] == {"response_format": {"type": "json_object"}, "n": 2}


def test_completions_logprobs_is_an_integer_stored_in_chat_form():
    p = one({"url": "/v1/completions", "body": {"prompt": "x", "logprobs": 3}})
    assert p.request["params"] == {"logprobs": True, "top_logprobs": 3}
    assert one({"url": "/v1/completions", "body": {"prompt": "x", "logprobs": 0}}).request["params"] == {
        "logprobs": True, "top_logprobs": 0}
    assert error_of({"url": "/v1/completions", "body": {"prompt": "x", "logprobs": 6}}) == \
        "line 7: 'logprobs' must be between 0 and 5 for /v1/completions, got 6"
    assert error_of({"url": "/v1/completions", "body": {"prompt": "x", "logprobs": 1, "top_logprobs": 1}}) == \
        "line 7: 'top_logprobs' is not a /v1/completions parameter: give 'logprobs' as an integer"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"n": 0}, "'n' must be between 1 and 16, got 0"),
        ({"n": 17}, "'n' must be between 1 and 16, got 17"),
        ({"n": 2.0}, "'n' must be an integer, got 2.0"),
        ({"top_logprobs": 21, "logprobs": True}, "'top_logprobs' must be between 0 and 20, got 21"),
        ({"top_logprobs": 2}, "'top_logprobs' needs 'logprobs': true"),
        ({"logprobs": "yes"}, "'logprobs' must be true or false, got string"),
        ({"frequency_penalty": 2.5}, "'frequency_penalty' must be between -2 and 2, got 2.5"),
        ({"presence_penalty": -3}, "'presence_penalty' must be between -2 and 2, got -3"),
        ({"repetition_penalty": 0}, "'repetition_penalty' must be greater than 0, got 0"),
        ({"repetition_penalty": -1.5}, "'repetition_penalty' must be greater than 0, got -1.5"),
        ({"logit_bias": [1]}, "'logit_bias' must be an object of token id to bias, got array"),
        ({"logit_bias": {"x": 1}}, "'logit_bias': key 'x' is not a token id"),
        ({"logit_bias": {"-5": 1}}, "'logit_bias': key '-5' is not a token id"),
        ({"logit_bias": {"5": 100.5}}, "'logit_bias': bias for token 5 must be between -100 and 100, got 100.5"),
        ({"logit_bias": {"5": "1"}}, "'logit_bias[5]' must be a number, got string"),
        ({"response_format": "json"}, "'response_format' must be an object, got string"),
        ({"response_format": {"type": "xml"}},
         "'response_format': 'type' must be one of 'text', 'json_object', 'json_schema', got 'xml'"),
        ({"response_format": {"type": "json_object", "schema": {}}},
         "'response_format': unsupported key 'schema' for type 'json_object'"),
        ({"response_format": {"type": "json_schema"}},
         "'response_format': 'json_schema' must be an object with 'name' and 'schema'"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}},
         "'response_format': 'json_schema.name' must be 1 to 64 letters, digits, '_' or '-', got 'a b'"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": []}}},
         "'response_format': 'json_schema.schema' must be an object, got array"),
        ({"response_format": {"type": "json_schema", "json_schema": {"name": "a", "schema": {"type": "frob"}}}},
         "'response_format': invalid JSON schema: 'frob' is not valid under any of the given schemas (at type)"),
        ({"response_format": {"type": "json_schema",
                              "json_schema": {"name": "a", "schema": {"type": "array", "maxItems": -1}}}},
         "'response_format': invalid JSON schema: -1 is less than the minimum of 0 (at maxItems)"),
    ],
)
def test_bad_new_parameters(params, message):
    assert error_of({"prompt": "x", **params}) == f"line 7: {message}"


def test_validate_params_is_shared_by_flags_and_lines():
    from llmbatch.jobs.inputs import validate_params

    with pytest.raises(ValueError, match="^job parameters: 'n' must be between 1 and 16, got 0$"):
        validate_params({"n": 0}, "job parameters")
    assert validate_params({"response_format": {"type": "text"}}) == {"response_format": {"type": "text"}}
