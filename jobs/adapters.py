"""LoRA adapters named on a job: `--adapter NAME=PATH` (a bare PATH is the job-wide default).

Checked and resolved at submit, with no torch or peft: a local PATH must hold adapter_config.json;
anything that is not a local path but looks like `org/name` is a hub id, left for the worker to
fetch. Each stored line carries the name of its adapter, already resolved (the line's own
`adapter`, else an OpenAI body.model equal to a registered name, else the job's default), so the
worker and export read one field.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path

from .exceptions import LLMBatchError
from .inputs import ParsedLine

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_NAME = re.compile(r"^[^/\\\s=]{1,200}$")  # a NAME is not a path: no slashes, no spaces


class AdapterNotFound(LLMBatchError):
    """A local adapter PATH that does not exist or is not a PEFT adapter directory."""


@dataclass(frozen=True)
class Adapters:
    names: dict[str, str] = field(default_factory=dict)  # name -> absolute local path or hub id
    default: str | None = None  # the name every line without its own adapter runs with

    def __bool__(self) -> bool:
        return bool(self.names)


def parse_specs(specs: list[str] | tuple[str, ...]) -> Adapters:
    """`NAME=PATH` or a bare `PATH` (at most one: the default, named by its PATH). ValueError if malformed."""
    names: dict[str, str] = {}
    default = None
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not _NAME.match(name):  # a bare PATH (which may itself contain '=')
            name, path = spec, spec
            if default is not None:
                raise ValueError(f"--adapter {spec!r}: only one adapter can be the default (a bare PATH); "
                                 f"name the others with NAME=PATH")
            default = name
        if not path:
            raise ValueError(f"--adapter {spec!r}: PATH is empty")
        if name in names:
            raise ValueError(f"--adapter {spec!r}: the name {name!r} is given twice")
        names[name] = path
    return Adapters(names, default)


def check_sources(adapters: Adapters) -> Adapters:
    """Local paths made absolute and checked; hub ids kept as they are. Raises AdapterNotFound."""
    out = {}
    for name, path in adapters.names.items():
        p = Path(path).expanduser()
        if p.exists():
            if not (p / "adapter_config.json").is_file():
                raise AdapterNotFound(f"adapter {name!r}: {path} holds no adapter_config.json (not a PEFT adapter)")
            out[name] = str(p.resolve())
        elif _HUB_ID.match(path) and not path.startswith(("./", "../", "~")):
            out[name] = path  # a hub id: the worker downloads it
        else:
            raise AdapterNotFound(f"adapter {name!r}: {path} does not exist")
    return replace(adapters, names=out)


def resolve(parsed: ParsedLine, adapters: Adapters) -> ParsedLine:
    """The line with request["adapter"] set to the name it runs with; a bad line if it names an unknown one."""
    if parsed.error is not None:
        return parsed
    request = parsed.request
    name = request.get("adapter")
    if name is not None and name not in adapters.names:
        known = ", ".join(map(repr, adapters.names)) or "none"
        return replace(parsed, request=None,
                       error=f"line {parsed.line}: adapter {name!r} is not registered on this job "
                             f"(registered: {known}; add it with --adapter {name}=PATH)")
    if name is None:
        body_model = request.get("body_model")
        name = body_model if body_model in adapters.names else adapters.default
    if name is None:
        return parsed
    return replace(parsed, request={**request, "adapter": name})


def source_of(name: str | None, names: dict[str, str] | None) -> str | None:
    """What the engine loads for a stored line's adapter name."""
    if not name:
        return None
    return (names or {}).get(name, name)
