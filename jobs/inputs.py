"""Streaming parser/validator for JSONL input files (see DESIGN.md, "Input lines").

A bad line never raises: it becomes a ParsedLine with `error` set, so the caller can
store it as a failed item (or, with --strict, collect every error and refuse the file).
Only problems with the file as a whole raise InputFileError.
"""

from __future__ import annotations

import functools
import io
import json
import re
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from llmbatch.jobs.exceptions import InputFileError
from llmbatch.jobs.settings import Limits

PARAM_NAMES = ("max_tokens", "temperature", "top_p", "top_k", "seed", "stop",
               # issue 10: the rest of the OpenAI request (DESIGN.md, "more per-line parameters")
               "response_format", "logprobs", "top_logprobs", "n", "frequency_penalty", "presence_penalty",
               "logit_bias", "repetition_penalty")

# Alternative spellings people bring from other tools; each maps to its canonical name.
_ALIASES = {"max_new_tokens": "max_tokens", "max_completion_tokens": "max_tokens"}
_TOP_KEYS = frozenset({"custom_id", "prompt", "messages", "method", "url", "body", "max_new_tokens", "adapter",
                       *PARAM_NAMES, "input", "dimensions", "encoding_format"})
# OpenAI body keys we can honour; stream/user are accepted only where they change nothing.
_BODY_KEYS = frozenset({"model", "messages", "prompt", "max_completion_tokens", "stream", "user", *PARAM_NAMES})
_CHAT_URL, _COMPLETIONS_URL = "/v1/chat/completions", "/v1/completions"
EMBEDDINGS_URL = "/v1/embeddings"  # issue 21
# An embedding line's keys (native: at the top level; OpenAI: in body). `user` changes nothing.
_EMBED_KEYS = frozenset({"input", "dimensions", "encoding_format"})
_EMBED_BODY_KEYS = frozenset({"model", "user", *_EMBED_KEYS})
MAX_INPUTS = 2048  # inputs in one embedding line, as OpenAI's limit
MAX_INPUT_TOKENS = 8192  # token ids in one input given as ids (the model's own context is checked later)
_ENCODINGS = ("float", "base64")
_ROLES = ("system", "user", "assistant")
_BOM = b"\xef\xbb\xbf"
_SNIFF_LINES = 5  # non-blank lines looked at to decide whether the file is JSONL at all
_SKIP_CHUNK = 64 * 1024  # read size while discarding the rest of an over-long line
_MAX_CUSTOM_ID = 256


@dataclass(frozen=True, slots=True)
class ParsedLine:
    line: int  # 1-based physical line number in the file
    custom_id: str  # as given, else f"line-{line}"
    request: dict | None  # normalized request; None when error is set
    error: str | None  # always starts with "line N: "


def _json_type(value: Any) -> str:
    """JSON's name for a value's type, so messages speak the user's language, not Python's."""
    if isinstance(value, bool):  # before int: bool is an int subclass
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    names = {dict: "object", list: "array", str: "string", type(None): "null"}
    return names.get(type(value), type(value).__name__)


# ---- generation parameters -------------------------------------------------------------


def _int(value: Any, key: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):  # True is not 1 here
        got = repr(value) if isinstance(value, float) else _json_type(value)
        raise ValueError(f"{key!r} must be an integer, got {got}")
    return value


def _number(value: Any, key: str) -> int | float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{key!r} must be a number, got {_json_type(value)}")
    return value


def _max_tokens(value: Any, key: str, limits: Limits) -> int:
    v = _int(value, key)
    if not 1 <= v <= limits.max_tokens_per_item:
        raise ValueError(f"{key!r} must be between 1 and {limits.max_tokens_per_item}, got {v}")
    return v


def _temperature(value: Any, key: str, limits: Limits) -> float:
    v = _number(value, key)
    if not 0 <= v <= 2:  # also refuses NaN, whose comparisons are all false
        raise ValueError(f"{key!r} must be between 0 and 2, got {v}")
    return float(v)


def _top_p(value: Any, key: str, limits: Limits) -> float:
    v = _number(value, key)
    if not 0 < v <= 1:  # 0 would leave no token to sample from
        raise ValueError(f"{key!r} must be greater than 0 and at most 1, got {v}")
    return float(v)


def _top_k(value: Any, key: str, limits: Limits) -> int:
    v = _int(value, key)
    if v < 0:
        raise ValueError(f"{key!r} must be 0 (off) or a positive integer, got {v}")
    return v


def _seed(value: Any, key: str, limits: Limits) -> int:
    v = _int(value, key)
    if not -(2**63) <= v < 2**64:  # any 64 bits, signed or not: the sampler wraps it (sampling.int64)
        raise ValueError(f"{key!r} must fit in 64 bits, got {v}")
    return v


def _stop(value: Any, key: str, limits: Limits) -> list[str]:
    # Always a list, so the worker has one shape to handle.
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError(f"{key!r} must be a string or an array of strings, got {_json_type(value)}")
    if len(items) > 4:  # OpenAI's limit; each stop string costs a check per generated token
        raise ValueError(f"{key!r} may have at most 4 strings, got {len(items)}")
    for s in items:
        if not isinstance(s, str) or not s:
            raise ValueError(f"{key!r} must contain only non-empty strings")
    return list(items)


def _ranged(low: float, high: float, *, integer: bool = False, open_low: bool = False):
    """A check for a number (or an integer) in [low, high], or (low, high] with open_low."""
    def check(value: Any, key: str, limits: Limits):
        v = _int(value, key) if integer else _number(value, key)
        if not ((low < v) if open_low else (low <= v)) or not v <= high:  # also refuses NaN
            if open_low and high == float("inf"):
                raise ValueError(f"{key!r} must be greater than {low:g}, got {v}")
            raise ValueError(f"{key!r} must be between {low:g} and {high:g}, got {v}")
        return v if integer else float(v)
    return check


def _logprobs(value: Any, key: str, limits: Limits) -> bool:
    # Chat meaning; a /v1/completions line's integer form is read by _completions_logprobs.
    if not isinstance(value, bool):
        raise ValueError(f"{key!r} must be true or false, got {_json_type(value)}")
    return value


def _completions_logprobs(value: Any, key: str) -> int:
    v = _int(value, key)
    if not 0 <= v <= 5:
        raise ValueError(f"{key!r} must be between 0 and 5 for /v1/completions, got {v}")
    return v


def _logit_bias(value: Any, key: str, limits: Limits) -> dict[str, float]:
    if not isinstance(value, dict):
        raise ValueError(f"{key!r} must be an object of token id to bias, got {_json_type(value)}")
    if len(value) > 300:  # OpenAI's limit
        raise ValueError(f"{key!r} may have at most 300 tokens, got {len(value)}")
    out = {}
    for tok, bias in value.items():
        if not tok.isdigit() or len(tok) > 9:  # JSON keys are strings; ids are small non-negative integers
            raise ValueError(f"{key!r}: key {tok!r} is not a token id")
        b = _number(bias, f"{key}[{tok}]")
        if not -100 <= b <= 100:
            raise ValueError(f"{key!r}: bias for token {tok} must be between -100 and 100, got {b}")
        out[str(int(tok))] = float(b)
    return out


_RESPONSE_TYPES = ("text", "json_object", "json_schema")
_SCHEMA_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")


def _response_format(value: Any, key: str, limits: Limits) -> dict:
    """{"type": "text" | "json_object" | "json_schema", ...}, normalized; a json_schema's schema is
    checked against its JSON Schema metaschema here (torch-free, cached), the grammar library's own
    compile happens in the worker."""
    if not isinstance(value, dict):
        raise ValueError(f"{key!r} must be an object, got {_json_type(value)}")
    kind = value.get("type")
    if kind not in _RESPONSE_TYPES:
        raise ValueError(f"{key!r}: 'type' must be one of 'text', 'json_object', 'json_schema', got {kind!r}")
    extra = next((k for k in value if k not in ("type", "json_schema")), None)
    if extra is not None or (kind != "json_schema" and "json_schema" in value):
        raise ValueError(f"{key!r}: unsupported key {extra or 'json_schema'!r} for type {kind!r}")
    if kind != "json_schema":
        return {"type": kind}
    spec = value.get("json_schema")
    if not isinstance(spec, dict):
        raise ValueError(f"{key!r}: 'json_schema' must be an object with 'name' and 'schema'")
    extra = next((k for k in spec if k not in ("name", "schema", "strict", "description")), None)
    if extra is not None:
        raise ValueError(f"{key!r}: unsupported key {extra!r} in 'json_schema'")
    name = spec.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.fullmatch(name):
        raise ValueError(f"{key!r}: 'json_schema.name' must be 1 to 64 letters, digits, '_' or '-', got {name!r}")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise ValueError(f"{key!r}: 'json_schema.schema' must be an object, got {_json_type(schema)}")
    strict = spec.get("strict", False)
    if not isinstance(strict, bool) and strict is not None:
        raise ValueError(f"{key!r}: 'json_schema.strict' must be true or false, got {_json_type(strict)}")
    problem = schema_problem(json.dumps(schema, sort_keys=True))
    if problem:
        raise ValueError(f"{key!r}: invalid JSON schema: {problem}")
    return {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": bool(strict)}}


@functools.lru_cache(maxsize=256)  # a million lines with one schema check it once
def schema_problem(schema_text: str) -> str | None:
    """The reason a schema is not valid JSON Schema (its own draft's metaschema), or None."""
    import jsonschema  # pure Python: submit stays free of torch and of the grammar library

    schema = json.loads(schema_text)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.exceptions.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path)
        return f"{e.message}" + (f" (at {where})" if where else "")
    return None


_CHECKS: dict[str, Callable[[Any, str, Limits], Any]] = {
    "max_tokens": _max_tokens,
    "temperature": _temperature,
    "top_p": _top_p,
    "top_k": _top_k,
    "seed": _seed,
    "stop": _stop,
    "response_format": _response_format,
    "logprobs": _logprobs,
    "top_logprobs": _ranged(0, 20, integer=True),
    "n": _ranged(1, 16, integer=True),
    "frequency_penalty": _ranged(-2, 2),
    "presence_penalty": _ranged(-2, 2),
    "logit_bias": _logit_bias,
    "repetition_penalty": _ranged(0, float("inf"), open_low=True),
}


def validate_params(params: dict, where: str = "", *, limits: Limits | None = None,
                    completions: bool = False) -> dict:
    """Check and normalize generation parameters (from a line or from CLI flags).

    Returns only the keys given, under their canonical names, in PARAM_NAMES order.
    Raises ValueError("<where>: <problem>"); callers pass only the flags actually set.
    completions: a /v1/completions body, whose `logprobs` is an integer (0-5): it is stored in the
    chat form, logprobs=true with top_logprobs=N, so the engine sees one shape.
    """
    if not params:
        return {}
    limits = limits or Limits()
    prefix = f"{where}: " if where else ""
    out: dict[str, Any] = {}
    given_as: dict[str, str] = {}  # canonical name -> spelling used, to name both in a clash
    for key, value in params.items():
        name = _ALIASES.get(key, key)
        if name not in _CHECKS:
            raise ValueError(f"{prefix}unknown parameter {key!r}")
        if name in given_as:
            raise ValueError(f"{prefix}give only one of {given_as[name]!r} and {key!r}")
        given_as[name] = key
        try:
            if completions and name == "top_logprobs":
                raise ValueError(f"{key!r} is not a /v1/completions parameter: give 'logprobs' as an integer")
            if completions and name == "logprobs":
                out["logprobs"], out["top_logprobs"] = True, _completions_logprobs(value, key)
                continue
            out[name] = _CHECKS[name](value, key, limits)
        except ValueError as e:
            raise ValueError(prefix + str(e)) from None
    if out.get("top_logprobs") and not out.get("logprobs"):  # as OpenAI: asking for alternatives needs logprobs
        raise ValueError(f"{prefix}'top_logprobs' needs 'logprobs': true")
    return {k: out[k] for k in PARAM_NAMES if k in out}


# ---- prompt / messages / OpenAI body ----------------------------------------------------


def _prompt(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"'prompt' must be a string, got {_json_type(value)}")
    if not value.strip():
        raise ValueError("empty prompt")
    return value


def _messages(value: Any) -> list[dict[str, str]]:
    if not isinstance(value, list):
        raise ValueError(f"'messages' must be an array, got {_json_type(value)}")
    if not value:
        raise ValueError("'messages' must not be empty")
    out = []
    for i, msg in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(msg, dict):
            raise ValueError(f"{where} must be an object, got {_json_type(msg)}")
        # 'name' is harmless and common in OpenAI files; tool calls etc. we cannot honour.
        extra = None if _MESSAGE_KEYS.issuperset(msg) else next(k for k in msg if k not in _MESSAGE_KEYS)
        if extra is not None:
            raise ValueError(f"{where}: unsupported key {extra!r}")
        role = msg.get("role")
        if not isinstance(role, str) or role not in _ROLES:
            raise ValueError(f"{where}: 'role' must be one of 'system', 'user', 'assistant', got {role!r}")
        out.append({"role": role, "content": _content(msg.get("content"), where)})
    return out


def _content(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: 'content' must be a string or a non-empty array of text parts, got {_json_type(value)}")
    texts = []
    for j, part in enumerate(value):
        if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else _json_type(part)
            raise ValueError(f"{where}.content[{j}]: only text parts are supported, got {kind!r}")
        texts.append(part["text"])
    return "\n".join(texts)  # the same join vLLM uses for multi-part text content


# ---- embedding lines (issue 21) ----------------------------------------------------------


def _token_ids(value: list, where: str) -> list[int]:
    if not value:
        raise ValueError(f"{where} must not be empty")
    if len(value) > MAX_INPUT_TOKENS:
        raise ValueError(f"{where} has {len(value)} token ids; at most {MAX_INPUT_TOKENS}")
    for t in value:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < 2**31:
            raise ValueError(f"{where} must hold token ids (integers from 0), got {t!r}")
    return value


def _embed_input(value: Any) -> list[str] | list[list[int]]:
    """OpenAI's `input`: a string, strings, token ids, or lists of token ids -> always a list of
    inputs (strings, or token-id lists), so the worker has one shape to handle."""
    if isinstance(value, str):
        value = [value]
    elif not isinstance(value, list):
        raise ValueError(f"'input' must be a string, an array of strings or an array of token ids, "
                         f"got {_json_type(value)}")
    if not value:
        raise ValueError("'input' must not be empty")
    if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        return [_token_ids(value, "'input'")]  # one input, given as token ids
    if len(value) > MAX_INPUTS:
        raise ValueError(f"too many inputs in one line: {len(value)} (at most {MAX_INPUTS})")
    if all(isinstance(v, str) for v in value):
        for i, v in enumerate(value):
            if not v.strip():
                raise ValueError(f"'input[{i}]' is empty" if len(value) > 1 else "empty input")
        return value
    if all(isinstance(v, list) for v in value):
        return [_token_ids(v, f"'input[{i}]'") for i, v in enumerate(value)]
    raise ValueError("'input' must hold only strings, or only token ids, or only arrays of token ids")


def _embed_options(src: dict) -> dict:
    out: dict[str, Any] = {}
    if src.get("dimensions") is not None:
        d = _int(src["dimensions"], "dimensions")
        if d < 1:
            raise ValueError(f"'dimensions' must be at least 1, got {d}")
        out["dimensions"] = d
    fmt = src.get("encoding_format")
    if fmt is not None:
        if fmt not in _ENCODINGS:
            raise ValueError(f"'encoding_format' must be 'float' or 'base64', got {fmt!r}")
        if fmt != "float":  # float is the default: store only what differs
            out["encoding_format"] = fmt
    return out


def _embedding_request(src: dict) -> dict:
    """An embedding line's fields (native top level, or an OpenAI body), normalized."""
    return {"input": _embed_input(src["input"]), **_embed_options(src)}


def is_embedding(request: dict | None) -> bool:
    """Whether a normalized request asks for vectors rather than text."""
    return request is not None and "input" in request


def _openai_embedding(body: dict, line_params: dict) -> dict:
    bad = None if _EMBED_BODY_KEYS.issuperset(body) else next(k for k in body if k not in _EMBED_BODY_KEYS)
    if bad is not None:
        raise ValueError(f"unsupported parameter {bad!r} in body for {EMBEDDINGS_URL}")
    if line_params:
        raise ValueError(f"{min(line_params)!r} is a generation parameter; an embedding line takes "
                         "'input', 'dimensions' and 'encoding_format'")
    if "input" not in body:
        raise ValueError(f"body for {EMBEDDINGS_URL} needs 'input'")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"'model' in body must be a string, got {_json_type(model)}")
    return {**_embedding_request(body), "url": EMBEDDINGS_URL, "body_model": model}


def _openai_request(obj: dict, line_params: dict, limits: Limits) -> dict:
    method = obj.get("method", "POST")
    if method != "POST":
        raise ValueError(f"'method' must be 'POST', got {method!r}")
    urls = f"{_CHAT_URL!r}, {_COMPLETIONS_URL!r} or {EMBEDDINGS_URL!r}"
    if "url" not in obj:
        raise ValueError(f"missing 'url': expected {urls}")
    url = obj["url"]
    if url not in (_CHAT_URL, _COMPLETIONS_URL, EMBEDDINGS_URL):
        raise ValueError(f"unsupported url {url!r}: expected {urls}")
    body = obj["body"]
    if not isinstance(body, dict):
        raise ValueError(f"'body' must be an object, got {_json_type(body)}")
    for key in _EMBED_KEYS:
        if key in obj:
            raise ValueError(f"{key!r} belongs in 'body' on an OpenAI line")
    if url == EMBEDDINGS_URL:
        return _openai_embedding(body, line_params)
    bad = None if _BODY_KEYS.issuperset(body) else next(k for k in body if k not in _BODY_KEYS)
    if bad is not None:
        raise ValueError(f"unsupported parameter {bad!r} in body")
    if body.get("stream", False) is not False:
        raise ValueError("'stream' in body must be false: results are written to the output file")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ValueError(f"'model' in body must be a string, got {_json_type(model)}")

    body_params = {k: v for k, v in body.items() if k in _CHECKS or k == "max_completion_tokens"}
    # The same parameter in both places is ambiguous; refuse it rather than guess a winner.
    clash = {_ALIASES.get(k, k) for k in body_params} & {_ALIASES.get(k, k) for k in line_params}
    if clash:
        raise ValueError(f"{min(clash)!r} is given both in 'body' and at the top level")
    params = validate_params({**body_params, **line_params}, limits=limits, completions=url == _COMPLETIONS_URL)

    wanted, other = ("messages", "prompt") if url == _CHAT_URL else ("prompt", "messages")
    if wanted not in body:
        raise ValueError(f"body for {url} needs {wanted!r}")
    if other in body:
        raise ValueError(f"unsupported parameter {other!r} in body for {url}")
    value = _messages(body["messages"]) if wanted == "messages" else _prompt(body["prompt"])
    return {wanted: value, "params": params, "url": url, "body_model": model}


def _request(obj: dict, limits: Limits) -> dict:
    """Normalize one line's object; raises ValueError (without the "line N: " prefix)."""
    unknown = None if _TOP_KEYS.issuperset(obj) else next(k for k in obj if k not in _TOP_KEYS)
    if unknown is not None:
        raise ValueError(f"unknown parameter {unknown!r}")
    sources = [k for k in ("prompt", "messages", "input", "body") if k in obj]
    if not sources:
        raise ValueError("no prompt: expected 'prompt', 'messages', 'input' (embeddings) or an OpenAI 'body'")
    if len(sources) > 1:
        raise ValueError(f"give only one of 'prompt', 'messages', 'input' or 'body', "
                         f"got {', '.join(map(repr, sources))}")
    line_params = {k: v for k, v in obj.items() if k in _PARAM_KEYS} if not _NOT_PARAMS.issuperset(obj) else {}
    if "adapter" in obj:  # issue 11: a name registered on the job (checked against it at submit)
        adapter = obj["adapter"]
        if not isinstance(adapter, str) or not adapter:
            raise ValueError(f"'adapter' must be a non-empty string, got {_json_type(adapter)}")
        if "input" in obj or obj.get("url") == EMBEDDINGS_URL:
            raise ValueError("'adapter' is for generation lines, not embedding lines")
        return {**_request({k: v for k, v in obj.items() if k != "adapter"}, limits), "adapter": adapter}
    if "body" in obj:
        return _openai_request(obj, line_params, limits)
    for key in ("method", "url"):
        if key in obj:
            raise ValueError(f"{key!r} is only valid with an OpenAI 'body'")
    if "input" in obj:  # issue 21: a native embedding line
        if line_params:
            raise ValueError(f"{min(line_params)!r} is a generation parameter; an embedding line takes "
                             "'input', 'dimensions' and 'encoding_format'")
        return _embedding_request(obj)
    for key in ("dimensions", "encoding_format"):
        if key in obj:
            raise ValueError(f"{key!r} is only valid on an embedding line (with 'input')")
    params = validate_params(line_params, limits=limits)
    if "prompt" in obj:
        return {"prompt": _prompt(obj["prompt"]), "params": params}
    return {"messages": _messages(obj["messages"]), "params": params}


def _reject_constant(name: str) -> Any:
    # Python's json accepts NaN/Infinity, which are not JSON and would not round-trip to the DB.
    raise ValueError(f"{name} is not valid JSON")


_decode = json.JSONDecoder(parse_constant=_reject_constant).decode
_MESSAGE_KEYS = frozenset({"role", "content", "name"})
_PARAM_KEYS = frozenset({*PARAM_NAMES, *_ALIASES})
_NOT_PARAMS = _TOP_KEYS - _PARAM_KEYS  # a line with only these keys has no per-line parameters


def _parse(raw: bytes, line: int, limits: Limits) -> tuple[ParsedLine, bool]:
    """parse_line, plus whether the line was a JSON object (for the is-this-JSONL check)."""
    cid = f"line-{line}"

    def fail(msg: str) -> ParsedLine:
        return ParsedLine(line, cid, None, f"line {line}: {msg}")

    raw = raw.rstrip(b"\r\n")
    if len(raw) > limits.max_line_bytes:
        return fail(f"line is longer than {limits.max_line_bytes} bytes"), False
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return fail(f"not valid UTF-8 (byte offset {e.start})"), False
    try:
        if text.startswith("\ufeff"):  # as json.loads words it
            raise json.JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
        obj = _decode(text)  # json.loads(text, parse_constant=_reject_constant), without a decoder per line
    except json.JSONDecodeError as e:
        return fail(f"invalid JSON: {e.msg} (column {e.colno})"), False
    except RecursionError:
        return fail("invalid JSON: nested too deeply"), False
    except ValueError as e:  # NaN/Infinity, or an integer with too many digits
        return fail(f"invalid JSON: {e}"), False
    if not isinstance(obj, dict):
        # Not evidence of JSONL: a file holding one JSON array (or other value) is a JSON document.
        return fail(f"expected a JSON object, got {_json_type(obj)}"), False
    if "custom_id" in obj:
        given = obj["custom_id"]
        if not isinstance(given, str):
            return fail(f"'custom_id' must be a string, got {_json_type(given)}"), True
        if not given or len(given) > _MAX_CUSTOM_ID:
            return fail(f"'custom_id' must be 1 to {_MAX_CUSTOM_ID} characters long"), True
        cid = given  # set before the checks below, so their errors keep the user's id
    try:
        return ParsedLine(line, cid, _request(obj, limits), None), True
    except ValueError as e:
        return fail(str(e)), True


def parse_line(raw: bytes, line: int, limits: Limits) -> ParsedLine:
    """Parse and validate one line (trailing newline allowed); no duplicate tracking."""
    return _parse(raw, line, limits)[0]


# ---- whole file --------------------------------------------------------------------------


def _remaining_bytes(fp: typing.BinaryIO) -> int | None:
    """Bytes left in a seekable file, to refuse an oversized file before parsing any of it."""
    try:
        if not fp.seekable():
            return None
        pos = fp.tell()
        end = fp.seek(0, io.SEEK_END)
        fp.seek(pos)
        return end - pos
    except (OSError, ValueError, AttributeError):
        return None


def _physical_lines(fp: typing.BinaryIO, limits: Limits) -> Iterator[tuple[int, bytes | None]]:
    """Yield (line number, content without line ending), or None as content for an over-long line.

    Reads are bounded, so an over-long line (or a file with no newlines) never sits in memory.
    """
    cap = limits.max_line_bytes
    total = 0
    line_no = 0
    while True:
        # +2 leaves room for "\r\n"; the first read also for the BOM we strip.
        size = cap + 2 + (len(_BOM) if line_no == 0 else 0)
        chunk = fp.readline(size)
        if not chunk:
            return
        line_no += 1
        total += len(chunk)
        complete = chunk.endswith(b"\n") or len(chunk) < size  # short read without "\n" = EOF
        if line_no == 1 and chunk.startswith(_BOM):
            chunk = chunk[len(_BOM):]
        while not complete:  # discard the rest of the line, counting its bytes
            rest = fp.readline(_SKIP_CHUNK)
            total += len(rest)
            complete = not rest or rest.endswith(b"\n")
            if total > limits.max_file_bytes:
                break
        if total > limits.max_file_bytes:
            raise InputFileError(f"input file is larger than {limits.max_file_bytes} bytes")
        content = chunk.rstrip(b"\r\n")
        yield line_no, (content if len(content) <= cap else None)


def iter_parsed(fp: typing.BinaryIO, limits: Limits | None = None) -> Iterator[ParsedLine]:
    """Stream ParsedLines from a binary JSONL file, one per non-blank line.

    Raises InputFileError for a file that is empty, too large, has too many items, or is
    not JSONL at all. The last two may be raised after some lines were yielded; the
    caller must then store nothing.
    """
    limits = limits or Limits()
    size = _remaining_bytes(fp)
    if size is not None and size > limits.max_file_bytes:
        raise InputFileError(f"input file is larger than {limits.max_file_bytes} bytes")

    seen: dict[str, int] = {}  # custom_id -> line where it first appeared
    head: list[ParsedLine] | None = []  # held back until we know the file is JSONL
    count = 0
    for line_no, content in _physical_lines(fp, limits):
        if content is None:
            parsed = ParsedLine(line_no, f"line-{line_no}", None, f"line {line_no}: line is longer than {limits.max_line_bytes} bytes")
            is_json = False
        elif not content.strip():
            continue  # blank lines are ignored but still counted for numbering
        else:
            parsed, is_json = _parse(content, line_no, limits)
        count += 1
        if count > limits.max_items_per_job:
            raise InputFileError(f"input file has more than {limits.max_items_per_job} items")

        # Default ids ("line-N") are tracked too: a later explicit "line-N" would clash with them.
        first = seen.setdefault(parsed.custom_id, line_no)
        if first != line_no and parsed.error is None:
            msg = f"line {line_no}: duplicate custom_id {parsed.custom_id!r} (first seen on line {first})"
            parsed = replace(parsed, request=None, error=msg)

        if head is None:
            yield parsed
            continue
        head.append(parsed)
        if is_json:  # one JSON object line is enough evidence: release what we held back
            yield from head
            head = None
        elif len(head) == _SNIFF_LINES:
            _refuse_not_jsonl(head)

    if count == 0:
        raise InputFileError("input file is empty")
    if head is not None:
        _refuse_not_jsonl(head)


def _refuse_not_jsonl(head: list[ParsedLine]) -> typing.NoReturn:
    # A CSV or plain-text file would otherwise become thousands of failed items.
    raise InputFileError(
        "input file does not look like JSONL: first lines are not JSON objects",
        [p.error for p in head if p.error],
    )
